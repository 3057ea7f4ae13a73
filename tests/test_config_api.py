"""Config over the API: redaction, ETag/If-Match, merge patches that keep the file's text,
validation, rollback, dry runs, PUT and reload; the daemon log stream; SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gatewayd import config_api
from gatewayd.config import Config, load_config
from gatewayd.events import make_filter
from gatewayd.logs import FileLog, read_json_lines, tail_lines
from tests.harness import ADMIN, CHAT, VIEWER, Running, auth, spawn

ENV_ADMIN = "env-admin-token-0123456789abcdef"
OPENAI_KEY = "sk-test-openai-secret-0123456789"
HOOK_SECRET = "hook-secret-value-0123456789"
NEW_KEY = "new-viewer-token-0123456789abcdef"

CONFIG = f"""# gatewayd test config: keep this comment
[gateway]
listen = ["tcp:0:interface=127.0.0.1"]   # loopback only
max_streams_per_token = 8

[gateway.rate_limit]
rate_per_s = 1000  # generous for tests
burst = 2000

[[gateway.api_keys]]
key = "${{GW_TEST_ADMIN}}"   # from the environment
role = "admin"
name = "env-admin"

[[gateway.api_keys]]
key = "{ADMIN}"
role = "admin"
name = "admin"

[[gateway.api_keys]]
key = "{VIEWER}"
role = "viewer"
name = "viewer"

[[gateway.api_keys]]
key = "{CHAT}"
role = "chat"
name = "chat"

[agent]
# the agent's voice
system_prompt = "hello"
api_key = "{OPENAI_KEY}"

[webhooks.github]
scheme = "github"
secret = "{HOOK_SECRET}"
"""


async def start(tmp_path: Any, text: str = CONFIG, *, with_file: bool = True) -> Running:
    """A gateway on 127.0.0.1:0 from a config file; without one: built-ins and ``--token``."""
    from twisted.internet import reactor

    from gatewayd.tap import compose

    path = str(tmp_path / "gatewayd.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    if with_file:
        service = compose(
            load_config(path), reactor=reactor, state_dir=str(tmp_path / "state"), config_path=path
        )
    else:

        def loopback(config: Config) -> Config:
            gateway = attrs.evolve(config.gateway, listen=("tcp:0:interface=127.0.0.1",))
            return attrs.evolve(config, gateway=gateway)

        service = compose(
            loopback(Config()),
            reactor=reactor,
            state_dir=str(tmp_path / "state"),
            cli_token=ADMIN,
            config_overrides=loopback,
        )
    service.startService()
    await service.ready
    listener = next(s for s in service if s.name and s.name.startswith("listen:"))
    port = await listener._waitingForPort
    return Running(service.gateway, service, port.getHost().port)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_ADMIN", ENV_ADMIN)


def file_text(g: Running) -> str:
    assert g.gateway.config_path is not None
    with open(g.gateway.config_path, encoding="utf-8") as f:
        return f.read()


async def request(
    g: Running,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = ADMIN,
    headers: dict[bytes, list[bytes]] | None = None,
) -> tuple[int, Any, Any]:
    all_headers = dict(auth(token)) if token else {}
    all_headers.update(headers or {})
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    resp = await treq.request(method, g.url + path, data=data, headers=all_headers)
    raw = await resp.content()
    return resp.code, json.loads(raw) if raw else None, resp.headers


def etag(headers: Any) -> str:
    return str(headers.getRawHeaders(b"etag")[0].decode())


@pytest_twisted.ensureDeferred
async def test_get_is_redacted_with_an_etag(tmp_path: Any) -> None:
    g = await start(tmp_path)
    try:
        code, body, headers = await request(g, "GET", "/api/config", token=VIEWER)
        assert code == 200
        tag = etag(headers)
        assert tag.startswith('"') and len(tag) > 10
        assert body["gateway"]["rate_limit"] == {"rate_per_s": 1000.0, "burst": 2000}
        assert body["gateway"]["listen"] == ["tcp:0:interface=127.0.0.1"]
        assert [k["key"] for k in body["gateway"]["api_keys"]] == ["***"] * 4
        assert [k["name"] for k in body["gateway"]["api_keys"]][:2] == ["env-admin", "admin"]
        assert body["agent"]["api_key"] == "***"
        assert body["agent"]["system_prompt"] == "hello"
        assert body["webhooks"]["github"]["secret"] == "***"
        assert body["gateway"]["body_limits"]["/v1/"] == 4194304
        raw = json.dumps(body)
        for secret in (ENV_ADMIN, ADMIN, VIEWER, OPENAI_KEY, HOOK_SECRET):
            assert secret not in raw
        # the same again: the same tag
        code, _, headers = await request(g, "GET", "/api/config", token=VIEWER)
        assert etag(headers) == tag
        code, body, _ = await request(g, "GET", "/api/config", token=CHAT)
        assert code == 403
        code, body, _ = await request(g, "GET", "/api/config", token=None)
        assert code == 401
        code, body, _ = await request(g, "DELETE", "/api/config")
        assert code == 405
        # a token in a query string is redacted in the access log
        code, _, _ = await request(g, "GET", f"/api/status?token={ADMIN}&ticket=abc", token=None)
        assert code == 401
        # the secrets never reached the log either
        with open(os.path.join(g.gateway.state_dir, "gatewayd.log"), encoding="utf-8") as f:
            log = f.read()
        assert "/api/status?token=***&ticket=***" in log
        for secret in (ENV_ADMIN, ADMIN, OPENAI_KEY, HOOK_SECRET):
            assert secret not in log
    finally:
        await g.stop()


def test_redaction_rules() -> None:
    tree = {
        "store": {"url": "postgresql://user:hunter2@db.example/gw"},
        "events": {"url": "redis://:pw0rd@cache:6379/0", "other": "http://plain.example/x"},
        "bridges": {
            "telegram": {
                "bot_token": "123:abc",
                "webhook_secret_token": "s",
                "api_base": "https://api.telegram.org",
            },
            "slack": {"signing_secret": "x", "my_secret": "y", "empty_token": ""},
        },
        "x": {"password": "p", "token": "t", "key": "k", "keys": "not-secret"},
    }
    out = config_api.redact(tree)
    assert out["store"]["url"] == "postgresql://user:***@db.example/gw"
    assert out["events"]["url"] == "redis://:***@cache:6379/0"
    assert out["events"]["other"] == "http://plain.example/x"
    assert out["bridges"]["telegram"] == {
        "bot_token": "***",
        "webhook_secret_token": "***",
        "api_base": "https://api.telegram.org",
    }
    assert out["bridges"]["slack"] == {
        "signing_secret": "***",
        "my_secret": "***",
        "empty_token": "",
    }
    assert out["x"] == {"password": "***", "token": "***", "key": "***", "keys": "not-secret"}


@pytest_twisted.ensureDeferred
async def test_patch_round_trip_keeps_the_files_text(tmp_path: Any) -> None:
    g = await start(tmp_path)
    gw = g.gateway
    try:
        events: list[Any] = []
        sub = gw.bus.subscribe(events.append, make_filter(["config_patched"]))
        _, _, headers = await request(g, "GET", "/api/config")
        tag = etag(headers)
        patch = {
            "gateway": {"rate_limit": {"burst": 3000}, "max_streams_per_token": 4},
            "agent": {
                "system_prompt": "be brief",
                "api_key": "***",
                "tools": {"bash": {"policy": "deny"}},
            },
        }
        code, body, headers = await request(
            g,
            "POST",
            "/api/config/patch",
            patch,
            headers={
                b"If-Match": [tag.encode()],
                b"Content-Type": [b"application/merge-patch+json"],
            },
        )
        assert code == 200, body
        assert body == {
            "applied": [
                "agent.system_prompt",
                "agent.tools.bash.policy",
                "gateway.max_streams_per_token",
                "gateway.rate_limit.burst",
            ],
            "restart_required": [],
        }
        assert etag(headers) != tag
        text = file_text(g)
        for kept in (
            "# gatewayd test config: keep this comment",
            "# loopback only",
            "rate_per_s = 1000  # generous for tests",
            'key = "${GW_TEST_ADMIN}"   # from the environment',
            "# the agent's voice",
            f'api_key = "{OPENAI_KEY}"',
        ):
            assert kept in text, kept
        assert "burst = 3000" in text and 'system_prompt = "be brief"' in text
        # applied live
        assert gw.config.gateway.rate_limit.burst == 3000
        assert gw.config.agent.system_prompt == "be brief"
        assert gw.tool_policies == {"bash": "deny"}
        assert gw.streams.max_per_token == 4
        assert gw.config.agent.api_key == OPENAI_KEY
        sub.cancel()
        assert [e.payload["keys"] for e in events] == [body["applied"]]
        rows = await gw.store.run(
            lambda c: c.execute(
                "SELECT action, detail FROM audit WHERE action LIKE 'config%'"
            ).fetchall()
        )
        assert [r[0] for r in rows] == ["config.patch"]
        assert json.loads(rows[0][1])["keys"] == body["applied"]
        # the new ETag works; the old one is now stale
        code, body, _ = await request(
            g,
            "POST",
            "/api/config/patch",
            {"agent": {"system_prompt": "x"}},
            headers={b"If-Match": [tag.encode()]},
        )
        assert code == 412 and body["error"]["code"] == "precondition_failed"
        assert gw.config.agent.system_prompt == "be brief"
        _, _, headers = await request(g, "GET", "/api/config")
        code, body, _ = await request(
            g,
            "POST",
            "/api/config/patch",
            {"agent": {"system_prompt": None}},
            headers={b"If-Match": [headers.getRawHeaders(b"etag")[0]]},
        )
        assert code == 200 and body["applied"] == ["agent.system_prompt"]
        assert gw.config.agent.system_prompt == ""
        assert "system_prompt" not in file_text(g)
        assert "# the agent's voice" in file_text(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_api_keys_change_live_and_stars_keep_secrets(tmp_path: Any) -> None:
    g = await start(tmp_path)
    gw = g.gateway
    try:
        keys = [
            {"key": "***", "role": "admin", "name": "env-admin"},
            {"key": "***", "role": "admin", "name": "admin"},
            {"key": NEW_KEY, "role": "viewer", "name": "new"},
        ]
        code, body, _ = await request(
            g, "POST", "/api/config/patch", {"gateway": {"api_keys": keys}}
        )
        assert code == 200 and body["applied"] == ["gateway.api_keys"]
        text = file_text(g)
        assert '"${GW_TEST_ADMIN}"' in text and ADMIN in text and NEW_KEY in text
        assert VIEWER not in text and CHAT not in text
        # the new key works at once, the removed ones fail at once
        assert (await request(g, "GET", "/api/status", token=NEW_KEY))[0] == 200
        assert (await request(g, "GET", "/api/status", token=ENV_ADMIN))[0] == 200
        assert (await request(g, "GET", "/api/status", token=VIEWER))[0] == 401
        # "***" where there was no secret is an error naming the key
        code, body, _ = await request(
            g,
            "POST",
            "/api/config/patch",
            {"gateway": {"api_keys": [*keys, {"key": "***", "role": "viewer"}]}},
        )
        assert code == 400 and "gateway.api_keys[3]" in body["error"]["message"]
        assert gw.tokens.authenticate(NEW_KEY) is not None
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_invalid_patches_are_400_naming_the_key(tmp_path: Any) -> None:
    g = await start(tmp_path)
    try:
        before = file_text(g)
        cases = [
            ({"gateway": {"rate_limit": {"burst": -1}}}, "gateway.rate_limit.burst"),
            ({"gateway": {"nope": 1}}, "gateway.nope"),
            ({"agent": {"provider": "nobody"}}, "agent.provider"),
            ({"agent": {"max_retries": "three"}}, "agent.max_retries"),
            ({"gateway": {"listen": ["bogus:endpoint:x"]}}, "gateway.listen"),
            ({"agent": {"workspace": "/"}}, "agent.workspace"),
            ({"store": {"url": "mysql://x"}}, "store.url"),
            ({"agent": {"system_prompt": "${GW_UNSET_VARIABLE_X}"}}, "agent.system_prompt"),
            ({"gateway": {"allowed_origins": ["a", None]}}, "gateway.allowed_origins"),
        ]
        for patch, key in cases:
            code, body, _ = await request(g, "POST", "/api/config/patch", patch)
            assert code == 400, (patch, body)
            assert body["error"]["code"] == "invalid_request"
            assert key in body["error"]["message"], (key, body)
        for raw in (b"[1]", b"nope", b""):
            code, body, _ = await request(g, "POST", "/api/config/patch", raw)
            assert code == 400
        code, body, _ = await request(
            g, "POST", "/api/config/patch", {"a": 1}, headers={b"Content-Type": [b"text/html"]}
        )
        assert code == 400 and "Content-Type" in body["error"]["message"]
        code, body, _ = await request(g, "POST", "/api/config/patch", {}, token=VIEWER)
        assert code == 403
        assert file_text(g) == before
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_a_change_that_cannot_be_applied_rolls_back(tmp_path: Any) -> None:
    g = await start(tmp_path)
    gw = g.gateway
    try:
        before_text, before = file_text(g), gw.config
        seen: list[tuple[Config, Config]] = []

        def refuse(old: Config, new: Config) -> None:
            seen.append((old, new))
            if new.agent.system_prompt == "explode":
                raise RuntimeError("this module cannot take that")

        gw.config_listeners.append(refuse)
        patch = {
            "agent": {"system_prompt": "explode"},
            "gateway": {"api_keys": [{"key": NEW_KEY, "role": "admin"}]},
        }
        code, body, _ = await request(g, "POST", "/api/config/patch", patch)
        assert code == 400, body
        assert "previous config is still running" in body["error"]["message"]
        assert gw.config is before
        assert file_text(g) == before_text
        # the tokens went back too: the old admin works, the new key does not
        assert gw.tokens.authenticate(ADMIN) is not None
        assert gw.tokens.authenticate(NEW_KEY) is None
        assert (await request(g, "GET", "/api/status"))[0] == 200
        # the listener that refused saw the change once and is not asked to undo it
        assert len(seen) == 1 and seen[0][0] is before
        gw.config_listeners.remove(refuse)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_dry_run_changes_nothing(tmp_path: Any) -> None:
    g = await start(tmp_path)
    gw = g.gateway
    try:
        before_text, before = file_text(g), gw.config
        patch = {
            "gateway": {
                "listen": ["tcp:0:interface=127.0.0.1", "unix:/tmp/x.sock"],
                "rate_limit": {"burst": 5},
            },
            "agent": {"api_key": "sk-another-secret-000000000000"},
        }
        code, body, _ = await request(g, "POST", "/api/config/patch?dry_run=1", patch)
        assert code == 200, body
        assert body["dry_run"] is True
        assert body["applied"] == ["agent.api_key", "gateway.rate_limit.burst"]
        assert body["restart_required"] == ["gateway.listen"]
        changes = {c["key"]: (c["old"], c["new"]) for c in body["changes"]}
        assert changes["gateway.rate_limit.burst"] == (2000, 5)
        assert changes["agent.api_key"] == ("***", "***")
        assert "sk-another" not in json.dumps(body)
        assert file_text(g) == before_text and gw.config is before
        # for real: the listener change waits for a restart
        code, body, _ = await request(g, "POST", "/api/config/patch", patch)
        assert code == 200
        assert body["restart_required"] == ["gateway.listen"]
        assert gw.listeners == ["tcp:0:interface=127.0.0.1"]
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_put_and_apply(tmp_path: Any) -> None:
    g = await start(tmp_path)
    gw = g.gateway
    try:
        before = file_text(g)
        code, body, _ = await request(
            g,
            "PUT",
            "/api/config",
            b"[gateway\nbroken = ",
            headers={b"Content-Type": [b"application/toml"]},
        )
        assert code == 400 and "invalid TOML" in body["error"]["message"]
        code, body, _ = await request(g, "PUT", "/api/config", b"[agent]\nprovider = 'x'\n")
        assert code == 400 and "agent.provider" in body["error"]["message"]
        code, body, _ = await request(g, "PUT", "/api/config", b"\xff\xfe")
        assert code == 400
        assert file_text(g) == before
        # a whole new file, validated, applied and written
        new_text = before.replace('system_prompt = "hello"', 'system_prompt = "put"')
        code, body, _ = await request(
            g, "PUT", "/api/config", new_text.encode(), headers={b"If-Match": [b"*"]}
        )
        assert code == 200 and body == {"applied": ["agent.system_prompt"], "restart_required": []}
        assert file_text(g) == new_text and gw.config.agent.system_prompt == "put"
        code, body, _ = await request(
            g, "PUT", "/api/config", new_text.encode(), headers={b"If-Match": [b'"stale"']}
        )
        assert code == 412
        # edited behind the gateway's back, then applied (what SIGHUP does)
        with open(gw.config_path, "w", encoding="utf-8") as f:
            f.write(new_text.replace("burst = 2000", "burst = 7"))
        code, body, _ = await request(g, "POST", "/api/config/apply")
        assert code == 200 and body == {
            "applied": ["gateway.rate_limit.burst"],
            "restart_required": [],
        }
        assert gw.config.gateway.rate_limit.burst == 7
        code, body, _ = await request(g, "POST", "/api/config/apply")
        assert code == 200 and body == {"applied": [], "restart_required": []}
        # a broken file is not applied; the running config stays
        with open(gw.config_path, "w", encoding="utf-8") as f:
            f.write("[gateway]\nburst = ")
        code, body, _ = await request(g, "POST", "/api/config/apply")
        assert code == 400 and gw.config.gateway.rate_limit.burst == 7
        code, body, _ = await request(g, "POST", "/api/config/apply", token=VIEWER)
        assert code == 403
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_without_a_file_changes_are_refused(tmp_path: Any) -> None:
    g = await start(tmp_path, with_file=False)
    try:
        code, body, headers = await request(g, "GET", "/api/config")
        assert code == 200 and etag(headers)
        code, body, _ = await request(
            g, "POST", "/api/config/patch", {"agent": {"system_prompt": "x"}}
        )
        assert code == 409 and "--config" in body["error"]["message"]
        code, body, _ = await request(
            g, "POST", "/api/config/patch?dry_run=1", {"agent": {"system_prompt": "x"}}
        )
        assert code == 200 and body["applied"] == ["agent.system_prompt"]
        code, body, _ = await request(g, "POST", "/api/config/apply")
        assert code == 200 and body == {"applied": [], "restart_required": []}
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_rpc_style_operations(tmp_path: Any) -> None:
    from gatewayd import ops

    g = await start(tmp_path)
    gw = g.gateway
    try:
        admin = gw.tokens.authenticate(ADMIN)
        got = await ops.call(gw, "config.get", admin, {})
        assert got["config"]["agent"]["api_key"] == "***" and got["etag"].startswith('"')
        result = await ops.call(
            gw,
            "config.patch",
            admin,
            {"patch": {"agent": {"system_prompt": "rpc"}}, "if_match": got["etag"]},
        )
        assert result["applied"] == ["agent.system_prompt"]
        result = await ops.call(gw, "config.set", admin, {"toml": file_text(g)})
        assert result == {"applied": [], "restart_required": []}
        result = await ops.call(gw, "config.apply", admin, {})
        assert result == {"applied": [], "restart_required": []}
    finally:
        await g.stop()


# -- the log ------------------------------------------------------------------------------------


def test_file_log_scrubs_secrets_and_rotates(tmp_path: Any) -> None:
    log = FileLog(str(tmp_path), 2000)
    log.set_secrets(["short", "a-very-secret-value-123"])
    log.start()
    try:
        logger = Logger(namespace="test.scrub")
        logger.info("token is {token}", token="a-very-secret-value-123 and short")
        for i in range(40):
            logger.info("line {i} padding padding padding padding", i=i)
    finally:
        log.stop()
    text = "".join(
        open(os.path.join(str(tmp_path), name)).read() for name in os.listdir(str(tmp_path))
    )
    assert "a-very-secret-value-123" not in text and "***" in text
    assert "gatewayd.log.1" in os.listdir(str(tmp_path))
    events = read_json_lines(os.path.join(str(tmp_path), "gatewayd.log"))
    assert events and all("log_time" in e for e in events)
    tail = log.tail(3)
    assert [json.loads(line)["i"] for line in tail] == [37, 38, 39]
    assert 3 < len(log.tail(1000)) < 40  # the current file and the newest rotated one
    assert tail_lines(os.path.join(str(tmp_path), "missing.log"), 5) == []


@pytest_twisted.ensureDeferred
async def test_access_lines_are_written_as_the_json_observer_would(tmp_path: Any) -> None:
    """The access log bypasses the log publisher, but its lines read back as any event."""
    from twisted.logger import LogLevel, eventsFromJSONLogFile, formatEvent

    published: list[dict[str, Any]] = []
    from twisted.logger import globalLogPublisher

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "gatewayd.access":
            published.append(event)

    globalLogPublisher.addObserver(observer)
    g = await start(tmp_path)
    try:
        code, _, _ = await request(g, "GET", f"/api/status?token={ADMIN}")
        assert code == 200
        code, _, _ = await request(g, "GET", "/api/status", token=None)
        assert code == 401
        code, body, _ = await request(g, "POST", "/api/chat", {"message": "hi"})
        assert code == 200
        resp = await treq.get(g.url + "/api/status?" + "x" * 9000, headers=auth(ADMIN))
        assert resp.code == 414
        await resp.content()
        code, _, _ = await request(g, "GET", "/health")  # probes are not logged
    finally:
        await g.stop()
        globalLogPublisher.removeObserver(observer)
    assert published == []  # nothing went through the publisher (nor to standard output)
    with open(os.path.join(str(tmp_path / "state"), "gatewayd.log"), encoding="utf-8") as f:
        events = [e for e in eventsFromJSONLogFile(f) if e["log_namespace"] == "gatewayd.access"]
    assert all(e["log_level"] is LogLevel.info and e["peer"] == "127.0.0.1" for e in events)
    assert all(abs(e["log_time"] - time.time()) < 60 for e in events)
    lines = [formatEvent(e) for e in events]
    assert lines[0].startswith("GET /api/status?token=*** 200 ")
    assert lines[1].startswith("GET /api/status 401 ")
    assert lines[2] == f"POST /api/chat 200 {events[2]['length']}"
    assert lines[3] == "- - 414 refused: uri_too_long"  # refused before it was parsed
    assert len(lines) == 4 and events[2]["length"] > 0


@pytest_twisted.ensureDeferred
async def test_daemon_logs_tail_then_follow(tmp_path: Any) -> None:
    g = await start(tmp_path)
    gw = g.gateway
    try:
        marker = Logger(namespace="test.daemonlogs")
        for i in range(5):
            marker.info("before {i}", i=i)
        code, body, _ = await request(g, "GET", "/api/daemon/logs", token=VIEWER)
        assert code == 403
        code, body, _ = await request(g, "GET", "/api/daemon/logs?lines=x")
        assert code == 400
        # the tail alone
        resp = await treq.get(g.url + "/api/daemon/logs?lines=3&follow=0", headers=auth(ADMIN))
        assert resp.code == 200
        assert resp.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
        text = (await resp.content()).decode()
        frames = [f for f in text.split("\n\n") if f.startswith("event: log")]
        assert len(frames) == 3
        assert text.endswith('event: tail_end\ndata: {"lines":3}\n\n')
        resp = await treq.get(g.url + "/api/daemon/logs?lines=50&follow=0", headers=auth(ADMIN))
        events = [
            json.loads(f.split("data: ", 1)[1])
            for f in (await resp.content()).decode().split("\n\n")
            if f.startswith("event: log")
        ]
        mine = [e["i"] for e in events if e.get("log_namespace") == "test.daemonlogs"]
        assert mine == [0, 1, 2, 3, 4]
        # following: new lines arrive as they are written
        chunks: list[bytes] = []
        arrived: Deferred[None] = Deferred()

        def got(data: bytes) -> None:
            chunks.append(data)
            if b"after-marker" in b"".join(chunks) and not arrived.called:
                arrived.callback(None)

        resp = await treq.get(
            g.url + "/api/daemon/logs?lines=1", headers=auth(ADMIN), unbuffered=True
        )
        assert resp.code == 200
        done = treq.collect(resp, got)
        while b"tail_end" not in b"".join(chunks):
            await _turn()
        assert gw.connections["sse"] == 1
        marker.info("after-marker {n}", n=1)
        await arrived
        gw.streams.close_all("test over")
        await done
        assert gw.connections["sse"] == 0
    finally:
        await g.stop()


async def _turn() -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.01, lambda: None)


# -- SIGHUP, in a real process --------------------------------------------------------------------


def test_sighup_reloads_the_file(tmp_path: Any) -> None:
    proc = spawn(
        str(tmp_path),
        config_text=CONFIG.replace(
            'listen = ["tcp:0:interface=127.0.0.1"]   # loopback only\n', ""
        ),
        env={"GW_TEST_ADMIN": ENV_ADMIN},
    )
    try:
        code, body = proc.request("GET", "/api/config")
        assert code == 200 and body["agent"]["system_prompt"] == "hello"
        path = os.path.join(str(tmp_path), "gatewayd.toml")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace('system_prompt = "hello"', 'system_prompt = "hup"'))
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            code, body = proc.request("GET", "/api/config")
            if body["agent"]["system_prompt"] == "hup":
                break
            time.sleep(0.05)
        assert body["agent"]["system_prompt"] == "hup"
        assert body["gateway"]["listen"] == [f"tcp:{proc.port}:interface=127.0.0.1"]
        # the command line still wins over the file; nothing waits for a restart
        code, body = proc.request("POST", "/api/config/apply", {})
        assert code == 200 and body == {"applied": [], "restart_required": []}
        assert proc.terminate() == 0
    finally:
        proc.kill()


# -- shutdown -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_shutdown_event_comes_before_streams_close(tmp_path: Any) -> None:
    from gatewayd.ops.maintenance import request_shutdown

    g = await start(tmp_path)
    gw = g.gateway
    try:
        chunks: list[bytes] = []
        resp = await treq.get(g.url + "/api/events", headers=auth(ADMIN), unbuffered=True)
        assert resp.code == 200
        ended = treq.collect(resp, chunks.append)
        while not chunks:
            await _turn()
        # /admin/shutdown's path: the event at once, the stop on the next turn
        stopped: list[bool] = []
        gw.stop_process = lambda: stopped.append(True)
        request_shutdown(gw, None, "test")
        assert not stopped
        await _turn()
        assert stopped == [True]
        await g.stop()
        await ended
        text = b"".join(chunks).decode()
        assert "event: shutdown" in text
        assert text.count("event: shutdown") == 1  # announced once, though stopped twice over
        gw.stop_process = None
        with pytest.raises(Exception) as info:
            request_shutdown(gw)
        assert getattr(info.value, "code", "") == "unavailable"
    finally:
        if g.service.running:
            await g.stop()
