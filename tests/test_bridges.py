"""Chat bridges against the real service tree, with stand-in platform APIs on loopback.

Telegram, Slack and Discord deliveries are signed as the platforms sign them; the stand-ins
record what the bridges send back. The outbound webhook's receiver fails on cue, and IRC runs
against a tiny ``twisted.words`` server.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import nacl.signing
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import ensureDeferred
from twisted.logger import globalLogPublisher

from gatewayd.bridges.base import REFUSAL, chunks, session_key
from gatewayd.bridges.http import BridgeHTTP, DeliveryError
from gatewayd.config import ConfigError, parse_config
from gatewayd.webhooks import sign, sign_discord, verify
from tests.bridge_standins import (
    IrcServer,
    Listening,
    PlatformStandIn,
    listen,
    wait_until,
    wait_until_async,
)
from tests.harness import ADMIN, CHAT, OPERATOR, TOKENS_TOML, VIEWER, Running, auth, start_gateway

BOT_TOKEN = "123456:TEST-telegram-bot-token-secret"
TG_SECRET = "tg-webhook-secret-token"
SLACK_TOKEN = "xoxb-test-slack-bot-token"
SLACK_SECRET = "slack-signing-secret"
DISCORD_SEED = bytes(range(32))
DISCORD_PUBLIC = nacl.signing.SigningKey(DISCORD_SEED).verify_key.encode().hex()
OUT_SECRET = "whsec_" + base64.b64encode(b"outbound-webhook-test-key").decode()
FAST = """
[gateway.rate_limit]
rate_per_s = 1000
burst = 1000
"""


def bridges_toml(api: str, out: str, backoff: float = 0.02) -> str:
    return f"""
[bridges.telegram]
bot_token = "{BOT_TOKEN}"
webhook_secret_token = "{TG_SECRET}"
api_base = "{api}"
allowed_users = ["42", "@carol"]
default_target = "1001"

[bridges.slack]
bot_token = "{SLACK_TOKEN}"
signing_secret = "{SLACK_SECRET}"
api_base = "{api}"
allowed_users = ["U123"]
default_target = "C999"

[bridges.discord]
public_key = "{DISCORD_PUBLIC}"
application_id = "app123"
bot_token = "discord-bot-token"
api_base = "{api}"
allowed_users = ["*"]

[bridges.webhook]
url = "{out}/receive"
secret = "{OUT_SECRET}"
max_attempts = 3
backoff_base_s = {backoff}

[webhooks.alerts]
scheme = "github"
secret = "alerts-secret"
channel = "slack"
"""


class World:
    """A gateway with every HTTP bridge, a platform stand-in and an outbound receiver."""

    def __init__(self) -> None:
        self.api = PlatformStandIn()
        self.out = PlatformStandIn()
        self.api_server: Listening | None = None
        self.out_server: Listening | None = None
        self.g: Running | None = None

    async def start(self, state_dir: str, backoff: float = 0.02) -> Running:
        self.api_server = self.api_server or listen(self.api)
        self.out_server = self.out_server or listen(self.out)
        bridges = bridges_toml(self.api_server.url, self.out_server.url, backoff)
        text = TOKENS_TOML + FAST + bridges
        self.g = await start_gateway(state_dir, text)
        return self.g

    async def stop(self) -> None:
        if self.g is not None:
            await self.g.stop()
        for server in (self.api_server, self.out_server):
            if server is not None:
                await server.stop()


async def post(
    g: Running, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    resp = await treq.post(g.url + path, body, headers=headers or {})
    raw = await resp.content()
    return resp.code, json.loads(raw) if raw else None


async def api(g: Running, method: str, path: str, obj: Any = None, token: str = ADMIN) -> Any:
    data = None if obj is None else json.dumps(obj).encode()
    resp = await treq.request(method, g.url + path, data=data, headers=auth(token))
    raw = await resp.content()
    return resp.code, json.loads(raw) if raw else None


async def runs(g: Running) -> int:
    def q(conn: Any) -> int:
        return int(conn.execute("SELECT count(*) FROM runs").fetchone()[0])

    return int(await g.gateway.store.run(q))


async def channel(g: Running, name: str) -> dict[str, Any]:
    code, body = await api(g, "GET", "/api/channels", token=VIEWER)
    assert code == 200
    found: dict[str, Any] = next(c for c in body["channels"] if c["name"] == name)
    return found


async def idle(g: Running) -> None:
    await wait_until(lambda: g.gateway.runs.active_count == 0, what="runs to finish")


# -- Telegram ------------------------------------------------------------------------------------


def tg_update(update_id: int, user: int, chat: int, text: str, username: str = "") -> bytes:
    sender: dict[str, Any] = {"id": user, "is_bot": False, "first_name": "T"}
    if username:
        sender["username"] = username
    return json.dumps(
        {
            "update_id": update_id,
            "message": {
                "message_id": update_id,
                "from": sender,
                "text": text,
                "chat": {"id": chat, "type": "private"},
                "date": int(time.time()),
            },
        }
    ).encode()


TG_HEADERS = {"X-Telegram-Bot-Api-Secret-Token": TG_SECRET, "Content-Type": "application/json"}


@pytest_twisted.ensureDeferred
async def test_telegram_round_trip(tmp_path: Any) -> None:
    w = World()
    try:
        g = await w.start(str(tmp_path))
        code, _ = await post(
            g, "/bridges/telegram", tg_update(1, 42, 42, "hello telegram"), TG_HEADERS
        )
        assert code == 200
        [sent] = await w.api.wait_for(1, "/sendMessage")
        assert sent.path == f"/bot{BOT_TOKEN}/sendMessage"
        assert sent.json == {"chat_id": 42, "text": "hello telegram"}
        # Telegram re-sends the same update: no second run
        code, _ = await post(
            g, "/bridges/telegram", tg_update(1, 42, 42, "hello telegram"), TG_HEADERS
        )
        assert code == 200 and await runs(g) == 1
        # wrong and missing secret tokens
        bad = {**TG_HEADERS, "X-Telegram-Bot-Api-Secret-Token": "nope"}
        code, err = await post(g, "/bridges/telegram", tg_update(2, 42, 42, "x"), bad)
        assert (code, err["error"]["code"]) == (401, "invalid_signature")
        code, err = await post(g, "/bridges/telegram", tg_update(3, 42, 42, "x"), {})
        assert (code, err["error"]["code"]) == (401, "missing_signature")
        # someone not on the allow list: a short refusal, no run
        code, _ = await post(g, "/bridges/telegram", tg_update(4, 7, 7, "let me in"), TG_HEADERS)
        assert code == 200
        refusal = (await w.api.wait_for(2, "/sendMessage"))[1]
        assert refusal.json == {"chat_id": 7, "text": REFUSAL}
        assert await runs(g) == 1
        # allowed by username; one session per chat, owned by the bridge
        await post(g, "/bridges/telegram", tg_update(5, 9, 42, "again", "carol"), TG_HEADERS)
        third = (await w.api.wait_for(3, "/sendMessage"))[2]
        assert third.json == {"chat_id": 42, "text": "again"}
        session = await g.gateway.store.get_session(session_key("telegram", "42"))
        assert session is not None and session.owner == "bridge:telegram"
        history = await g.gateway.store.history(session.id)
        assert [m.content for m in history] == ["hello telegram"] * 2 + ["again"] * 2
        await idle(g)
        stats = await channel(g, "telegram")
        assert stats == {
            "name": "telegram",
            "state": "running",
            "received": 3,
            "sent": 3,
            "errors": 2,
            "last_error": "inbound: missing_signature",
        }
        # a chat token that made "telegram:31" first never gets to read that chat
        code, own = await api(
            g, "POST", "/api/agent", {"message": "mine", "session_id": "telegram:31"}, token=CHAT
        )
        assert code == 202 and own["session_id"] == "telegram:31"
        await post(g, "/bridges/telegram", tg_update(7, 9, 31, "private", "carol"), TG_HEADERS)
        assert (await w.api.wait_for(4, "/sendMessage"))[3].json == {
            "chat_id": 31,
            "text": "private",
        }
        await idle(g)
        history = await g.gateway.store.history("telegram:31")
        assert "private" not in [m.content for m in history]
        code, mine = await api(g, "GET", "/api/sessions", token=CHAT)
        assert [s["id"] for s in mine["sessions"]] == ["telegram:31"]
        # a failing Bot API: the error is counted, and never shows the bot token
        w.api.fail_next(1, 502)
        await post(g, "/bridges/telegram", tg_update(6, 42, 42, "fails"), TG_HEADERS)
        await w.api.wait_for(5, "/sendMessage")
        await wait_until(
            lambda: g.gateway is not None and _errors(g, "telegram") == 3,
            what="the error to be counted",
        )
        stats = await channel(g, "telegram")
        assert "HTTP 502" in stats["last_error"] and BOT_TOKEN not in stats["last_error"]
    finally:
        await w.stop()


def _errors(g: Running, name: str) -> int:
    from gatewayd.bridges import manager_for

    return manager_for(g.gateway).bridges[name].stats.errors


# -- Slack ---------------------------------------------------------------------------------------


def slack_signed(body: bytes, ts: int | None = None) -> dict[str, str]:
    headers = sign("slack", SLACK_SECRET, body, timestamp=int(time.time()) if ts is None else ts)
    return {**headers, "Content-Type": "application/json"}


def slack_event(event_id: str, event: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "type": "event_callback",
            "event_id": event_id,
            "team_id": "T1",
            "authorizations": [{"user_id": "UBOT", "is_bot": True}],
            "event": event,
        }
    ).encode()


@pytest_twisted.ensureDeferred
async def test_slack_round_trip(tmp_path: Any) -> None:
    w = World()
    try:
        g = await w.start(str(tmp_path))
        body = json.dumps({"type": "url_verification", "challenge": "ch4ll3nge"}).encode()
        assert await post(g, "/bridges/slack/events", body, slack_signed(body)) == (
            200,
            {"challenge": "ch4ll3nge"},
        )
        message = {
            "type": "message",
            "user": "U123",
            "text": "hi slack",
            "channel": "D1",
            "ts": "1.1",
            "channel_type": "im",
        }
        body = slack_event("Ev1", message)
        code, _ = await post(g, "/bridges/slack/events", body, slack_signed(body))
        assert code == 200
        [sent] = await w.api.wait_for(1, "/chat.postMessage")
        assert sent.json == {"channel": "D1", "text": "hi slack"}
        assert sent.headers["authorization"] == f"Bearer {SLACK_TOKEN}"
        # Slack retries the same event: deduplicated by event_id
        retry = {**slack_signed(body), "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "t"}
        assert (await post(g, "/bridges/slack/events", body, retry))[0] == 200
        # the bot's own messages and bot posts are ignored
        for n, event in enumerate(
            [
                {**message, "user": "UBOT", "text": "my own answer"},
                {**message, "bot_id": "B1", "text": "a bot post"},
                {**message, "subtype": "message_changed"},
            ]
        ):
            body = slack_event(f"EvBot{n}", event)
            assert (await post(g, "/bridges/slack/events", body, slack_signed(body)))[0] == 200
        assert await runs(g) == 1
        # a mention in a thread: its own conversation, answered in the thread
        mention = {
            "type": "app_mention",
            "user": "U123",
            "text": "<@UBOT> in a thread",
            "channel": "C5",
            "ts": "6.6",
            "thread_ts": "5.5",
        }
        body = slack_event("Ev2", mention)
        assert (await post(g, "/bridges/slack/events", body, slack_signed(body)))[0] == 200
        second = (await w.api.wait_for(2, "/chat.postMessage"))[1]
        assert second.json == {"channel": "C5", "text": "in a thread", "thread_ts": "5.5"}
        assert await g.gateway.store.get_session(session_key("slack", "C5/5.5")) is not None
        # stale, tampered, missing, and a user who is not allowed
        body = slack_event("Ev3", message)
        code, err = await post(
            g, "/bridges/slack/events", body, slack_signed(body, int(time.time()) - 3600)
        )
        assert (code, err["error"]["code"]) == (401, "stale_signature")
        code, err = await post(g, "/bridges/slack/events", body + b" ", slack_signed(body))
        assert (code, err["error"]["code"]) == (401, "invalid_signature")
        code, err = await post(g, "/bridges/slack/events", body, {})
        assert (code, err["error"]["code"]) == (401, "missing_signature")
        body = slack_event("Ev4", {**message, "user": "U999", "text": "me too"})
        assert (await post(g, "/bridges/slack/events", body, slack_signed(body)))[0] == 200
        third = (await w.api.wait_for(3, "/chat.postMessage"))[2]
        assert third.json == {"channel": "D1", "text": REFUSAL}
        assert await runs(g) == 2
        await idle(g)
    finally:
        await w.stop()


# -- Discord -------------------------------------------------------------------------------------


def discord_signed(body: bytes, ts: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if ts is None else ts
    return {
        **sign_discord(DISCORD_SEED.hex(), body, timestamp=stamp),
        "Content-Type": "application/json",
    }


@pytest_twisted.ensureDeferred
async def test_discord_round_trip(tmp_path: Any) -> None:
    w = World()
    try:
        g = await w.start(str(tmp_path))
        ping = json.dumps({"type": 1, "id": "p1", "application_id": "app123"}).encode()
        assert await post(g, "/bridges/discord/interactions", ping, discord_signed(ping)) == (
            200,
            {"type": 1},
        )
        code, err = await post(
            g, "/bridges/discord/interactions", ping + b" ", discord_signed(ping)
        )
        assert (code, err["error"]["code"]) == (401, "invalid_signature")
        code, err = await post(
            g, "/bridges/discord/interactions", ping, discord_signed(ping, int(time.time()) - 3600)
        )
        assert (code, err["error"]["code"]) == (401, "stale_signature")
        command = json.dumps(
            {
                "type": 2,
                "id": "i1",
                "application_id": "app123",
                "token": "interaction-tok-1",
                "channel_id": "CH1",
                "member": {"user": {"id": "u1", "username": "dan"}},
                "data": {
                    "name": "ask",
                    "options": [
                        {"name": "q", "type": 3, "value": "hello"},
                        {"name": "n", "type": 4, "value": 3},
                        {"name": "more", "type": 3, "value": "discord"},
                    ],
                },
            }
        ).encode()
        code, answer = await post(
            g, "/bridges/discord/interactions", command, discord_signed(command)
        )
        assert (code, answer) == (200, {"type": 5})
        [follow] = await w.api.wait_for(1, "/webhooks/")
        assert follow.path == "/webhooks/app123/interaction-tok-1"
        assert follow.json == {"content": "hello discord"}
        session = await g.gateway.store.get_session(session_key("discord", "CH1"))
        assert session is not None and session.owner == "bridge:discord"
        assert await runs(g) == 1
        await idle(g)
    finally:
        await w.stop()


# -- outbound webhook ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_outbound_webhook_retries_then_delivers_once(tmp_path: Any) -> None:
    w = World()
    try:
        g = await w.start(str(tmp_path))
        w.out.fail_next(2, 500)
        code, answer = await api(
            g, "POST", "/api/send", {"channel": "webhook", "text": "ping"}, token=OPERATOR
        )
        assert (code, answer["status"]) == (200, "queued")
        tries = await w.out.wait_for(3, "/receive")
        await wait_until(lambda: _sent(g, "webhook") == 1, what="the delivery to be counted")
        assert len(w.out.requests) == 3
        assert len({t.headers["webhook-id"] for t in tries}) == 1  # one message, three tries
        last = tries[-1]
        verified = verify("standard", OUT_SECRET, last.headers, last.body, now=time.time())
        assert verified.delivery_id == last.headers["webhook-id"]
        assert last.json["text"] == "ping" and last.json["channel"] == "webhook"
        stats = await channel(g, "webhook")
        assert (stats["sent"], stats["errors"]) == (1, 2)
        # a viewer may look, not send
        code, err = await api(
            g, "POST", "/api/send", {"channel": "webhook", "text": "x"}, token=VIEWER
        )
        assert (code, err["error"]["code"]) == (403, "forbidden")
    finally:
        await w.stop()


def _sent(g: Running, name: str) -> int:
    from gatewayd.bridges import manager_for

    return manager_for(g.gateway).bridges[name].stats.sent


@pytest_twisted.ensureDeferred
async def test_outbound_dead_letter_listed_and_replayed(tmp_path: Any) -> None:
    w = World()
    try:
        g = await w.start(str(tmp_path))
        w.out.always_fail = 503
        code, woke = await api(
            g, "POST", "/api/hooks/wake", {"prompt": "dead letter me", "channel": "webhook"}
        )
        assert code == 202

        async def letters() -> list[dict[str, Any]]:
            code, body = await api(g, "GET", "/api/dead-letters", token=OPERATOR)
            assert code == 200
            found: list[dict[str, Any]] = body["dead_letters"]
            return found

        [letter] = await wait_until_async(letters, what="the dead letter")
        assert letter["attempts"] == 3 and "503" in letter["last_error"]
        assert letter["payload"]["text"] == "dead letter me"
        assert letter["payload"]["run_id"] == woke["run_id"]
        assert len(w.out.requests) == 3
        # the receiver is back: replay delivers it and it leaves the list
        w.out.always_fail = None
        code, replayed = await api(
            g, "POST", f"/api/dead-letters/{letter['id']}/replay", token=OPERATOR
        )
        assert (code, replayed["status"]) == (200, "delivered")
        fourth = w.out.requests[3]
        assert fourth.headers["webhook-id"] == letter["id"]
        verify("standard", OUT_SECRET, fourth.headers, fourth.body, now=time.time())
        assert await letters() == []
        code, err = await api(g, "POST", f"/api/dead-letters/{letter['id']}/replay")
        assert (code, err["error"]["code"]) == (404, "not_found")
    finally:
        await w.stop()


@pytest_twisted.ensureDeferred
async def test_outbound_messages_waiting_at_shutdown_are_dead_lettered(tmp_path: Any) -> None:
    w = World()
    try:
        g = await w.start(str(tmp_path), backoff=60)
        w.out.always_fail = 500
        code, answer = await api(g, "POST", "/api/send", {"channel": "webhook", "text": "later"})
        assert (code, answer["status"]) == (200, "queued")
        await g.stop()  # the retry is 60 s away: stopping must not wait for it
        w.g = g = await w.start(str(tmp_path))
        code, body = await api(g, "GET", "/api/dead-letters")
        [letter] = body["dead_letters"]
        assert letter["payload"]["text"] == "later" and letter["attempts"] == 1
        assert "stopped" in letter["last_error"]
    finally:
        await w.stop()


# -- channels of runs: wake, hooks, send ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_wake_hook_and_send_route_answers_to_bridges(tmp_path: Any) -> None:
    w = World()
    try:
        g = await w.start(str(tmp_path))
        code, _ = await api(
            g, "POST", "/api/hooks/wake", {"prompt": "wake and tell", "channel": "telegram"}
        )
        assert code == 202
        [sent] = await w.api.wait_for(1, "/sendMessage")
        assert sent.json == {"chat_id": 1001, "text": "wake and tell"}  # the default_target
        code, _ = await api(
            g, "POST", "/api/hooks/wake", {"prompt": "to a chat", "channel": "telegram:555"}
        )
        assert code == 202
        assert (await w.api.wait_for(2, "/sendMessage"))[1].json == {
            "chat_id": 555,
            "text": "to a chat",
        }
        # a hook with channel = "slack" answers in the slack default_target
        body = b'{"alert": "disk full"}'
        headers = sign("github", "alerts-secret", body, timestamp=0, delivery_id="a-1")
        code, answer = await post(g, "/hooks/alerts", body, headers)
        assert code == 202
        [posted] = await w.api.wait_for(1, "/chat.postMessage")
        assert posted.json == {"channel": "C999", "text": f"Webhook alerts:\n{body.decode()}"}
        # heartbeat alerts carry heartbeat.channel; the bridges say them there
        g.gateway.bus.publish("heartbeat_alert", check="disk", message="low", channel="slack:C7")
        assert (await w.api.wait_for(2, "/chat.postMessage"))[1].json == {
            "channel": "C7",
            "text": "Heartbeat alert (disk): low",
        }
        # send: straight to a platform
        code, answer = await api(
            g, "POST", "/api/send", {"channel": "telegram:77", "text": "direct"}
        )
        assert (code, answer) == (200, {"channel": "telegram", "target": "77", "status": "sent"})
        assert (await w.api.wait_for(3, "/sendMessage"))[2].json == {
            "chat_id": 77,
            "text": "direct",
        }
        for bad in ({"channel": "nowhere", "text": "x"}, {"channel": "discord", "text": "x"}):
            code, err = await api(g, "POST", "/api/send", bad)
            assert (code, err["error"]["code"]) == (400, "invalid_request"), bad
        code, err = await api(g, "POST", "/api/hooks/wake", {"prompt": "x", "channel": "nope"})
        assert (code, err["error"]["code"]) == (400, "invalid_request")
        code, body_ = await api(g, "GET", "/api/channels", token=VIEWER)
        assert [c["name"] for c in body_["channels"]] == ["telegram", "slack", "discord", "webhook"]
        await idle(g)
    finally:
        await w.stop()


# -- IRC -----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_irc_answers_messages_addressed_to_its_nick(tmp_path: Any) -> None:
    server = IrcServer()
    endpoint = server.start()
    g = None
    try:
        g = await start_gateway(
            str(tmp_path),
            TOKENS_TOML
            + f"""
[bridges.irc]
endpoint = "{endpoint}"
nick = "gatewayd"
channels = ["#test", "#other"]
allowed_users = ["alice"]
default_target = "#other"
""",
        )
        await wait_until(lambda: ("gatewayd", "#other") in server.joined, what="the joins")
        assert ("gatewayd", "#test") in server.joined
        server.say("bob!b@127.0.0.1", "#test", "just chatting, nobody asked the bot")
        server.say("alice!a@127.0.0.1", "#test", "gatewayd: hello irc")
        assert await server.wait_for_message("hello irc") == (
            "gatewayd",
            "#test",
            "alice: hello irc",
        )
        server.say("bob!b@127.0.0.1", "#test", "gatewayd, me too")
        assert await server.wait_for_message("not allowed") == (
            "gatewayd",
            "#test",
            f"bob: {REFUSAL}",
        )
        server.say("alice!a@127.0.0.1", "gatewayd", "a private word")
        assert await server.wait_for_message("private") == ("gatewayd", "alice", "a private word")
        assert await runs(g) == 2
        code, _ = await api(g, "POST", "/api/hooks/wake", {"prompt": "wake irc", "channel": "irc"})
        assert code == 202
        assert await server.wait_for_message("wake irc") == ("gatewayd", "#other", "wake irc")
        stats = await channel(g, "irc")
        assert stats["state"] == "connected" and stats["received"] == 3
        await idle(g)
    finally:
        if g is not None:
            await g.stop()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_odd_but_signed_bodies_never_fail_with_500(tmp_path: Any) -> None:
    w = World()
    odd: list[Any] = [
        [],
        "text",
        5,
        None,
        {"type": {"x": 1}},
        {"update_id": "1", "message": {"chat": {"id": [1]}, "text": 5, "from": "me"}},
        {"update_id": 2, "message": {"chat": {"id": True}, "text": "hi"}},
        {
            "type": "event_callback",
            "event_id": 5,
            "authorizations": 7,
            "event": {"type": "message", "text": ["x"], "channel": {}},
        },
        {
            "type": "event_callback",
            "event": {"type": "app_mention", "text": "<@U1>", "channel": "C1", "user": "U123"},
        },
        {"type": 2, "token": "t", "data": {"options": "nope"}, "member": []},
        {"type": 2, "token": "t", "data": {"name": 5, "options": [{"type": 3}, 7]}},
        {"type": 3, "token": "t"},
    ]
    try:
        g = await w.start(str(tmp_path))
        for doc in odd:
            body = json.dumps(doc).encode()
            for path, headers in (
                ("/bridges/telegram", TG_HEADERS),
                ("/bridges/slack/events", slack_signed(body)),
                ("/bridges/discord/interactions", discord_signed(body)),
            ):
                code, answer = await post(g, path, body, headers)
                assert code < 500, (path, doc, answer)
        for path, headers in (
            ("/bridges/telegram", TG_HEADERS),
            ("/bridges/slack/events", slack_signed(b"\xff{")),
            ("/bridges/discord/interactions", discord_signed(b"\xff{")),
        ):
            code, answer = await post(g, path, b"\xff{", headers)
            assert (code, answer["error"]["code"]) == (400, "invalid_request")
        assert await runs(g) == 0
    finally:
        await w.stop()


# -- start-up checks -----------------------------------------------------------------------------


def test_bridges_that_cannot_work_are_refused(tmp_path: Any) -> None:
    from twisted.internet import reactor

    from gatewayd.tap import compose

    cases = {
        '[bridges.discord]\npublic_key = "abcd"\napplication_id = "1"\n': "public_key",
        '[bridges.webhook]\nurl = "http://127.0.0.1:9/x"\nsecret = "plain"\n': "whsec_",
        '[bridges.webhook]\nurl = "ftp://x/y"\nsecret = "whsec_c2VjcmV0"\n': "http",
        '[bridges.irc]\nendpoint = "bogus:thing"\n': "bridges.irc.endpoint",
        '[bridges.telegram]\nbot_token = "t"\nwebhook_secret_token = ""\n': "webhook_secret",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            compose(parse_config(TOKENS_TOML + text, {}), reactor=reactor, state_dir=str(tmp_path))


@pytest_twisted.ensureDeferred
async def test_empty_allow_list_warns_and_refuses(tmp_path: Any) -> None:
    api_stand_in = PlatformStandIn()
    server = listen(api_stand_in)
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if "allowed_users" in str(event.get("log_format", "")):
            seen.append(event["log_format"])

    globalLogPublisher.addObserver(observe)
    g = None
    try:
        g = await start_gateway(
            str(tmp_path),
            TOKENS_TOML
            + f"""
[bridges.telegram]
bot_token = "{BOT_TOKEN}"
webhook_secret_token = "{TG_SECRET}"
api_base = "{server.url}"
""",
        )
        assert seen, "no start-up warning about the empty allow list"
        await post(g, "/bridges/telegram", tg_update(1, 42, 42, "anyone?"), TG_HEADERS)
        [refusal] = await api_stand_in.wait_for(1, "/sendMessage")
        assert refusal.json["text"] == REFUSAL
        assert await runs(g) == 0
    finally:
        globalLogPublisher.removeObserver(observe)
        if g is not None:
            await g.stop()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_bridge_http_times_out_scrubs_secrets_and_cancels_on_close() -> None:
    from twisted.internet import reactor

    from tests.harness import free_port

    stand_in = PlatformStandIn()
    stand_in.hang = True
    server = listen(stand_in)
    http = BridgeHTTP(reactor, timeout_s=0.2)
    try:
        with pytest.raises(DeliveryError, match="call: no answer within 0.2s"):
            await http.post(server.url + "/botSECRET/x", b"{}", {}, what="call")
        with pytest.raises(DeliveryError) as info:
            await http.post(
                f"http://127.0.0.1:{free_port()}/botSECRET/x",
                b"{}",
                {},
                what="call",
                secrets=("SECRET",),
            )
        assert "SECRET" not in str(info.value)
        pending = ensureDeferred(http.post(server.url + "/slow", b"{}", {}, what="call"))
        await stand_in.wait_for(2)
        await http.close()
        with pytest.raises(DeliveryError, match="cancelled"):
            await pending
        with pytest.raises(DeliveryError, match="stopped"):
            await http.post(server.url + "/after", b"{}", {}, what="call")
    finally:
        await http.close()
        await server.stop()


def test_chunks_split_long_answers() -> None:
    assert chunks("short", 10) == ["short"]
    assert chunks("", 10) == [""]
    assert chunks("line one\nline two\nthree", 12) == ["line one", "line two", "three"]
    assert chunks("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert session_key("irc", "#chan") != session_key("irc", "_chan")
    assert session_key("telegram", "-100123") == "telegram:-100123"
