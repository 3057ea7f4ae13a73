"""WAMP v2 at /wamp over real loopback sockets, with autobahn-python's own WAMP client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.wamp import ApplicationSession
from autobahn.twisted.websocket import WampWebSocketClientFactory
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.serializer import JsonSerializer
from autobahn.wamp.types import CallOptions, ComponentConfig, PublishOptions
from twisted.internet.defer import Deferred, ensureDeferred

from gatewayd.web.wamp import SERIALIZERS, factory_for
from tests.harness import ADMIN, CHAT, CHAT2, TOKENS_TOML, VIEWER, start_gateway
from tests.wsclient import LISTEN, handshake

TIMEOUT = 10.0
CHAT_KEYS = {"session_id", "run_id", "status", "response", "tools_used", "tokens", "cost_cents"}


class Refused(Exception):
    pass


class Probe(ApplicationSession):
    """Joins with a ticket (or none); ``joined``/``left``/``gone`` fire; events collect."""

    def __init__(self, config: ComponentConfig, ticket: str | None) -> None:
        super().__init__(config)
        self.ticket = ticket
        self.joined: Deferred[Any] = Deferred()
        self.left: Deferred[Any] = Deferred()
        self.gone: Deferred[None] = Deferred()
        self.events: list[dict[str, Any]] = []

    def onConnect(self) -> None:
        if self.ticket is None:
            self.join(self.config.realm)
        else:
            self.join(self.config.realm, authmethods=["ticket"], authid="tester")

    def onChallenge(self, challenge: Any) -> str:
        assert challenge.method == "ticket"
        assert self.ticket is not None
        return self.ticket

    def onJoin(self, details: Any) -> None:
        self.joined.callback(details)

    def onLeave(self, details: Any) -> Any:
        if not self.joined.called:
            self.joined.errback(Refused(details.reason))
        if not self.left.called:
            self.left.callback(details)
        return super().onLeave(details)

    def onDisconnect(self) -> None:
        if not self.joined.called:
            self.joined.errback(Refused("disconnected"))
        if not self.gone.called:
            self.gone.callback(None)
        super().onDisconnect()

    def on_event(self, envelope: dict[str, Any]) -> None:
        self.events.append(envelope)

    async def close(self) -> None:
        from twisted.internet import reactor

        if self.is_attached():
            self.leave()
        await self.gone.addTimeout(TIMEOUT, reactor)


def _serializer(name: str) -> Any:
    return SERIALIZERS[name]()


class Env:
    def __init__(self, g: Any) -> None:
        self.g = g
        self.sessions: list[Probe] = []
        self.stopped = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.g.stop()

    @property
    def gw(self) -> Any:
        return self.g.gateway

    async def connect(
        self,
        ticket: str | None = ADMIN,
        *,
        realm: str = "gatewayd",
        serializer: str = "wamp.2.json",
        headers: dict[str, str] | None = None,
        joined: bool = True,
    ) -> Probe:
        from twisted.internet import reactor

        session = Probe(ComponentConfig(realm), ticket)
        self.sessions.append(session)
        url = self.g.url.replace("http://", "ws://") + "/wamp"
        factory = WampWebSocketClientFactory(
            lambda: session, url=url, serializers=[_serializer(serializer)], headers=headers
        )
        factory.setProtocolOptions(openHandshakeTimeout=TIMEOUT, closeHandshakeTimeout=2)
        reactor.connectTCP("127.0.0.1", self.g.port, factory)  # type: ignore[attr-defined]
        if joined:
            await session.joined.addTimeout(TIMEOUT, reactor)
        return session

    async def idle(self) -> None:
        from twisted.internet import reactor

        factory = factory_for(self.gw)
        assert factory is not None
        await factory.when_idle().addTimeout(TIMEOUT, reactor)
        assert self.gw.connections["websocket"] == 0


@asynccontextmanager
async def running(tmp_path: Any, extra: str = "") -> AsyncIterator[Env]:
    g = await start_gateway(str(tmp_path), LISTEN + extra + TOKENS_TOML)
    env = Env(g)
    try:
        yield env
    finally:
        try:
            for s in env.sessions:
                if not s.gone.called:
                    await s.close()
            await env.idle()
        finally:
            await env.stop()


async def _error(d: Any) -> ApplicationError:
    try:
        await d
    except ApplicationError as e:
        return e
    raise AssertionError("expected an ApplicationError")


# -- joining -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ticket_auth_accept_and_reject(tmp_path: Any) -> None:
    from twisted.internet import reactor

    async with running(tmp_path) as env:
        s = await env.connect(ADMIN)
        welcome = await s.joined
        assert welcome.authrole == "admin"
        assert welcome.authmethod == "ticket"
        assert welcome.realm == "gatewayd"

        bad = await env.connect("not-a-token", joined=False)
        details = await bad.left.addTimeout(TIMEOUT, reactor)
        assert details.reason == "wamp.error.not_authorized"
        with pytest.raises(Refused):
            await bad.joined

        realm = await env.connect(ADMIN, realm="elsewhere", joined=False)
        assert (await realm.left.addTimeout(TIMEOUT, reactor)).reason == "wamp.error.no_such_realm"

        anonymous = await env.connect(None, joined=False)
        details = await anonymous.left.addTimeout(TIMEOUT, reactor)
        assert details.reason == "wamp.error.not_authorized"

        # credentials on the HTTP handshake: HELLO without a ticket is welcome at once
        pre = await env.connect(None, headers={"Authorization": f"Bearer {VIEWER}"})
        welcome = await pre.joined
        assert welcome.authrole == "viewer"
        assert welcome.authmethod == "token"
        assert env.gw.connections["websocket"] == 2  # s and pre: refused ones never counted
        await s.close()
        await pre.close()


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_says_hello_is_closed(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twisted.internet import reactor

    from gatewayd.web import wamp
    from tests.wsclient import connect

    monkeypatch.setattr(wamp, "HELLO_TIMEOUT_S", 0.3)
    async with running(tmp_path) as env:
        client = await connect(env.g.url, "/wamp", protocols=["wamp.2.json"])
        assert client.protocol_in_use == "wamp.2.json"
        abort = await client.recv()  # nothing sent: the server gives up on us
        assert abort[0] == 3 and abort[2] == "wamp.error.timeout"  # ABORT
        _, code, _ = await client.closed.addTimeout(TIMEOUT, reactor)
        assert code == 1008


@pytest_twisted.ensureDeferred
async def test_handshake_refusals(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        port, wamp = env.g.port, {"Sec-WebSocket-Protocol": "wamp.2.json"}
        status, _, body = await handshake(port, "/wamp")
        assert status == 400 and body["error"]["code"] == "invalid_request"
        status, _, body = await handshake(port, "/wamp", {**wamp, "Origin": "https://evil.test"})
        assert status == 403
        status, _, body = await handshake(port, "/wamp", {**wamp, "Authorization": "Bearer nope"})
        assert status == 401 and body["error"]["code"] == "unauthorized"


# -- calls ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_calls_and_error_mapping(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        s = await env.connect(ADMIN)
        health = await s.call("gatewayd.health")
        assert isinstance(health, dict) and health.get("status") == "ok"
        listed = await s.call("gatewayd.sessions.list", limit=5)
        assert isinstance(listed, dict | list)
        # a single dict positional argument works like keyword arguments
        assert await s.call("gatewayd.sessions.list", {"limit": 5}) == listed

        e = await _error(s.call("gatewayd.no.such.thing"))
        assert e.error == "wamp.error.no_such_procedure"
        e = await _error(s.call("other.health"))
        assert e.error == "wamp.error.no_such_procedure"
        e = await _error(s.call("gatewayd.sessions.get", session_id="bad id!"))
        assert e.error == "wamp.error.invalid_argument" and e.args
        e = await _error(s.call("gatewayd.sessions.get", session_id="missing"))
        assert e.error == "gatewayd.error.not_found"
        assert e.kwargs["code"] == "not_found"
        e = await _error(s.call("gatewayd.health", 1, 2))
        assert e.error == "wamp.error.invalid_argument"

        e = await _error(s.publish("gatewayd.events", {}, options=PublishOptions(acknowledge=True)))
        assert e.error == "wamp.error.not_authorized"

        viewer = await env.connect(VIEWER)
        e = await _error(viewer.call("gatewayd.chat.send", message="hi"))
        assert e.error == "wamp.error.not_authorized"


@pytest.mark.parametrize("serializer", sorted(SERIALIZERS))
@pytest_twisted.ensureDeferred
async def test_chat_progress_and_events(tmp_path: Any, serializer: str) -> None:
    from twisted.internet import reactor

    async with running(tmp_path) as env:
        s = await env.connect(ADMIN, serializer=serializer)
        await s.subscribe(s.on_event, "gatewayd.events")
        progress: list[dict[str, Any]] = []
        result = await s.call(
            "gatewayd.chat.send",
            message="hello big world",
            options=CallOptions(on_progress=progress.append),
        )
        assert set(result) == CHAT_KEYS
        assert result["response"] == "hello big world" and result["status"] == "completed"
        deltas = [p["content"] for p in progress if p["type"] == "text_delta"]
        assert "".join(deltas) == "hello big world"
        assert all(p["run_id"] == result["run_id"] for p in progress)

        # EVENTs: the run's events reach the subscriber (run_complete may trail the RESULT)
        for _ in range(100):
            if any(e["type"] == "run_complete" for e in s.events):
                break
            await _tick(reactor)
        types = [e["type"] for e in s.events]
        assert "session_created" in types and "run_complete" in types
        ids = [e["id"] for e in s.events]
        assert ids == sorted(ids)

        # a session topic, then unsubscribe
        seen: list[dict[str, Any]] = []
        sub = await s.subscribe(seen.append, f"gatewayd.session.{result['session_id']}")
        again = await s.call("gatewayd.chat.send", message="again", session_id=result["session_id"])
        for _ in range(100):
            if any(e["type"] == "run_complete" for e in seen):
                break
            await _tick(reactor)
        assert {e["session_id"] for e in seen} == {again["session_id"]}
        await sub.unsubscribe()
        e = await _error(s.subscribe(seen.append, "gatewayd.session.nope"))
        assert e.error == "gatewayd.error.not_found"


async def _tick(reactor: Any) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(0.01, d.callback, None)
    await d


@pytest_twisted.ensureDeferred
async def test_chat_token_sees_only_its_own(tmp_path: Any) -> None:
    from twisted.internet import reactor

    async with running(tmp_path) as env:
        mine = await env.connect(CHAT)
        theirs = await env.connect(CHAT2)
        admin = await env.connect(ADMIN)
        for s in (mine, theirs, admin):
            await s.subscribe(s.on_event, "gatewayd.events")
        done = await theirs.call("gatewayd.chat.send", message="private")
        for _ in range(100):
            if any(e["type"] == "run_complete" for e in admin.events):
                break
            await _tick(reactor)
        assert any(e.get("run_id") == done["run_id"] for e in theirs.events)
        assert mine.events == []
        e = await _error(mine.subscribe(mine.on_event, f"gatewayd.session.{done['session_id']}"))
        assert e.error == "gatewayd.error.not_found"
        e = await _error(mine.call("gatewayd.chat.history", session_id=done["session_id"]))
        assert e.error.startswith("gatewayd.error.") or e.error == "wamp.error.not_authorized"


@pytest_twisted.ensureDeferred
async def test_cancel_skips_the_result(tmp_path: Any) -> None:
    from twisted.internet import reactor

    async with running(tmp_path) as env:
        s = await env.connect(ADMIN)
        d = s.call("gatewayd.chat.send", message="slow enough")
        d.cancel()
        with pytest.raises(Exception):  # noqa: B017 - CancelledError or wamp.error.canceled
            await d
        await _tick(reactor)
        assert (await s.call("gatewayd.health"))["status"] == "ok"


@pytest_twisted.ensureDeferred
async def test_message_over_the_cap_closes_1009(tmp_path: Any) -> None:
    from twisted.internet import reactor

    async with running(tmp_path, "ws_max_message_bytes = 2048\n") as env:
        s = await env.connect(ADMIN)
        proto: Any = s._transport
        with pytest.raises(Exception):  # noqa: B017 - the transport goes away under the call
            await s.call("gatewayd.health", pad="x" * 4096)
        await s.gone.addTimeout(TIMEOUT, reactor)
        assert proto.remoteCloseCode == 1009


@pytest_twisted.ensureDeferred
async def test_rate_limit_errors_then_goodbye(tmp_path: Any) -> None:
    from twisted.internet import reactor

    extra = "[gateway.ws_rate_limit]\nmax_messages = 3\nwindow_ms = 600000\n"
    async with running(tmp_path, extra) as env:
        s = await env.connect(ADMIN)  # HELLO and AUTHENTICATE: two messages
        assert (await s.call("gatewayd.health"))["status"] == "ok"
        e = await _error(s.call("gatewayd.health"))
        assert e.error == "gatewayd.error.rate_limited" and e.kwargs["retry_after_ms"] > 0
        pending = [s.call("gatewayd.health") for _ in range(3)]
        details = await s.left.addTimeout(TIMEOUT, reactor)
        assert details.reason == "wamp.close.killed"
        for d in pending:
            with pytest.raises(ApplicationError):
                await d
        await s.gone.addTimeout(TIMEOUT, reactor)


# -- the router ends sessions --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_revoke_and_shutdown_say_goodbye(tmp_path: Any) -> None:
    from twisted.internet import reactor

    async with running(tmp_path) as env:
        chat = await env.connect(CHAT)
        admin = await env.connect(ADMIN)
        principal = env.gw.tokens.authenticate(CHAT)
        env.gw.streams.revoke(principal.token_id)
        details = await chat.left.addTimeout(TIMEOUT, reactor)
        assert details.reason == "wamp.close.killed"
        await chat.gone.addTimeout(TIMEOUT, reactor)

        stopping = ensureDeferred(env.stop())
        details = await admin.left.addTimeout(TIMEOUT, reactor)
        assert details.reason == "wamp.close.system_shutdown"
        await admin.gone.addTimeout(TIMEOUT, reactor)
        await env.idle()
        await stopping


def test_serializers_available() -> None:
    assert "wamp.2.json" in SERIALIZERS
    assert isinstance(SERIALIZERS["wamp.2.json"](), JsonSerializer)
    pytest.importorskip("msgpack")
    assert "wamp.2.msgpack" in SERIALIZERS


@pytest_twisted.ensureDeferred
async def test_a_slow_consumer_is_dropped(tmp_path: Any, monkeypatch: Any) -> None:
    """A WAMP subscriber that stops reading is cut off once its unsent EVENTs pass the cap;
    the gateway does not buffer for it without end."""
    from twisted.internet import reactor

    from gatewayd.web import ws

    monkeypatch.setattr(ws, "SLOW_CONSUMER_BYTES", 256 * 1024)
    async with running(tmp_path) as env:
        s = await env.connect(ADMIN)
        await s.subscribe(s.on_event, "gatewayd.events")
        factory = factory_for(env.gw)
        assert factory is not None
        server = next(iter(factory.live))
        tcp = s._transport.transport  # the client's socket
        tcp.pauseProducing()  # stop reading: the server's buffers fill up
        blob = "z" * 65536
        sent = 0
        while server in factory.live and sent < 400:
            env.gw.bus.publish("blob", blob=blob)
            sent += 1
        assert server not in factory.live, "the server never gave up"
        assert sent < 400
        assert env.gw.connections["websocket"] == 0
        tcp.resumeProducing()
        await s.gone.addTimeout(TIMEOUT, reactor)
        assert len([e for e in s.events if e["type"] == "blob"]) < sent
