"""Server-Sent Events over loopback: ``/api/events`` and ``/api/chat/stream``."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss

from gatewayd.auth import Principal, hash_token
from gatewayd.events import EventBus, make_filter
from gatewayd.web import sse
from tests.harness import ADMIN, CHAT, CHAT2, TOKENS_TOML, VIEWER, Running, auth, start_gateway

TIMEOUT = 5.0


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _client() -> HTTPClient:
    """treq without keep-alive: every connection closes with its response."""
    pool = HTTPConnectionPool(_reactor(), persistent=False)
    return HTTPClient(Agent(_reactor(), pool=pool))


def _config(extra: str = "", keepalive: float = 15.0) -> str:
    listen = 'listen = ["tcp:0:interface=127.0.0.1"]'
    return f"[gateway]\n{listen}\nsse_keepalive_s = {keepalive}\n{extra}\n" + TOKENS_TOML


async def _until(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll a condition on the reactor (never a bare sleep) until it holds or time runs out."""
    waited = 0.0
    while not check():
        if waited >= timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(_reactor(), 0.01, lambda: None)
        waited += 0.01


class Frames(protocol.Protocol):
    """A streaming reader: parses the SSE body into frames as they arrive."""

    def __init__(self) -> None:
        self.raw = b""
        self._buf = b""
        self.frames: list[dict[str, Any]] = []
        self.ended: Deferred[str] = Deferred()
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], Deferred[dict[str, Any]]]] = []
        self._seen = 0

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self._buf += data
        while b"\n\n" in self._buf:
            block, self._buf = self._buf.split(b"\n\n", 1)
            frame: dict[str, Any] = {}
            for line in block.decode().split("\n"):
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                frame[name or "comment"] = value
            if "data" in frame:
                try:
                    frame["json"] = json.loads(frame["data"])
                except ValueError:
                    pass
            self.frames.append(frame)
        self._check()

    def _check(self) -> None:
        for predicate, d in list(self._waiters):
            for frame in self.frames[self._seen :]:
                if predicate(frame):
                    self._waiters.remove((predicate, d))
                    d.callback(frame)
                    break

    def connectionLost(self, reason: Any = None) -> None:
        ok = reason is None or reason.check(ResponseDone, PotentialDataLoss)
        self.ended.callback("done" if ok else "lost")

    def events(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if "event" in f]

    def ids(self) -> list[int]:
        return [int(f["id"]) for f in self.frames if "id" in f and f.get("event") != "reset"]

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        for frame in self.frames:
            if predicate(frame):
                return frame
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiters.append((predicate, d))
        d.addTimeout(timeout, _reactor())
        return await d

    async def wait_event(self, type: str, **match: Any) -> dict[str, Any]:
        def wanted(f: dict[str, Any]) -> bool:
            payload = f.get("json")
            return (
                f.get("event") == type
                and isinstance(payload, dict)
                and all(payload.get(k) == v for k, v in match.items())
            )

        return await self.wait_for(wanted)

    async def wait_end(self, timeout: float = TIMEOUT) -> str:
        self.ended.addTimeout(timeout, _reactor())
        return await self.ended

    def disconnect(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()


async def stream_awaiting_approval(
    g: Running, token: str | None = ADMIN, content: str = "x", **extra: str
) -> tuple[Frames, dict[str, Any]]:
    """POST /api/chat/stream with a message whose run asks to write a file; returns the reader
    and the ``approval_requested`` frame once the run waits on it."""
    tool = json.dumps({"path": "approval.txt", "content": content})
    _, reader = await open_stream(
        g,
        "/api/chat/stream",
        token=token,
        method="POST",
        body={"message": f"/tool write_file {tool}", **extra},
    )
    return reader, await reader.wait_event("approval_requested")


async def open_stream(
    g: Running,
    path: str = "/api/events",
    token: str | None = ADMIN,
    *,
    method: str = "GET",
    body: Any = None,
    headers: dict[bytes, list[bytes]] | None = None,
) -> tuple[Any, Frames]:
    """Request a stream; the response and its reader (started only for a 200)."""
    hdrs = dict(auth(token)) if token else {}
    hdrs.update(headers or {})
    data = json.dumps(body).encode() if body is not None else None
    d = _client().request(method, g.url + path, data=data, headers=hdrs, unbuffered=True)
    d.addTimeout(TIMEOUT, _reactor())
    resp = await d
    reader = Frames()
    if resp.code == 200:
        resp.deliverBody(reader)
    return resp, reader


async def expect_error(g: Running, path: str, status: int, code: str, **kw: Any) -> Any:
    resp, _ = await open_stream(g, path, **kw)
    body = json.loads(await resp.content())
    assert resp.code == status, body
    assert body["error"]["code"] == code
    assert resp.headers.getRawHeaders(b"content-type") == [b"application/json"]
    return resp


async def call(g: Running, method: str, path: str, body: Any = None, token: str = ADMIN) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    resp = await _client().request(method, g.url + path, data=data, headers=auth(token))
    return resp.code, json.loads(await resp.content())


def _sse_count(g: Running) -> int:
    return int(g.gateway.connections["sse"])


async def _closed(g: Running) -> None:
    await _until(lambda: _sse_count(g) == 0, "the SSE streams to close")


# -- /api/events ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_frames_headers_retry_and_keepalive(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), _config(keepalive=0.2))
    try:
        resp, reader = await open_stream(g)
        assert resp.code == 200
        h = resp.headers
        assert h.getRawHeaders(b"content-type") == [b"text/event-stream"]
        assert h.getRawHeaders(b"cache-control") == [b"no-cache"]
        assert h.getRawHeaders(b"x-accel-buffering") == [b"no"]
        await reader.wait_for(lambda f: "retry" in f)
        assert reader.raw.startswith(b"retry: 3000\n\n")
        assert _sse_count(g) == 1
        event = g.gateway.bus.publish("session_created", session_id="s1", owner="x", title="t")
        frame = await reader.wait_event("session_created")
        expected = b"id: %d\nevent: session_created\ndata: %s\n\n" % (event.id, event.encoded())
        assert expected in reader.raw
        assert frame["json"] == {
            "id": event.id,
            "type": "session_created",
            "ts": frame["json"]["ts"],
            "session_id": "s1",
            "title": "t",
        }
        assert "owner" not in frame["json"]
        await reader.wait_for(lambda f: f.get("comment") == "keep-alive")
        assert b"\n: keep-alive\n\n" in reader.raw
        reader.disconnect()
        await reader.wait_end()
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_type_and_session_filters(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        _, typed = await open_stream(g, "/api/events?types=cron_fired,session_deleted")
        _, session = await open_stream(g, "/api/events?session_id=s1")
        _, both = await open_stream(g, "/api/events?session_id=s1&types=session_deleted")
        bus = g.gateway.bus
        bus.publish("cron_fired", job_id="j", name="n")  # no session
        bus.publish("session_created", session_id="s1", title="")
        bus.publish("session_created", session_id="s2", title="")
        bus.publish("session_deleted", session_id="s2")
        bus.publish("session_deleted", session_id="s1")
        await typed.wait_event("session_deleted", session_id="s1")
        await session.wait_event("session_deleted", session_id="s1")
        await both.wait_event("session_deleted", session_id="s1")
        assert [(f["event"], f["json"].get("session_id")) for f in typed.events()] == [
            ("cron_fired", None),
            ("session_deleted", "s2"),
            ("session_deleted", "s1"),
        ]
        assert [(f["event"], f["json"]["session_id"]) for f in session.events()] == [
            ("session_created", "s1"),
            ("session_deleted", "s1"),
        ]
        assert [f["event"] for f in both.events()] == ["session_deleted"]
        for reader in (typed, session, both):
            reader.disconnect()
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_chat_token_sees_only_its_own_events(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        _, mine = await open_stream(g, token=CHAT)
        _, theirs = await open_stream(g, token=CHAT2)
        _, admin = await open_stream(g, token=ADMIN)
        code, body = await call(g, "POST", "/api/chat", {"message": "hello you"}, CHAT)
        assert code == 200
        run_id = body["run_id"]
        await mine.wait_event("run_complete", run_id=run_id)
        await admin.wait_event("run_complete", run_id=run_id)
        # a marker for CHAT2 proves its stream is live and saw nothing of CHAT's run
        code, other = await call(g, "POST", "/api/chat", {"message": "x"}, CHAT2)
        await theirs.wait_event("run_complete", run_id=other["run_id"])
        assert all(f["json"].get("run_id") != run_id for f in theirs.events())
        assert all(f["json"].get("run_id") != other["run_id"] for f in mine.events())
        kinds = [f["event"] for f in mine.events() if f["json"].get("run_id") == run_id]
        assert kinds[0] == "run_started" and kinds[-1] == "run_complete"
        assert "text_delta" in kinds
        # a global event (no owner) is not a chat token's to see
        g.gateway.bus.publish("cron_fired", job_id="j", name="n")
        await admin.wait_event("cron_fired")
        code, _ = await call(g, "POST", "/api/chat", {"message": "sync"}, CHAT)
        await mine.wait_event("run_complete", response="sync")
        assert all(f["event"] != "cron_fired" for f in mine.events())
        # naming another token's session is 404 (never an empty stream); its own works
        sid = body["session_id"]
        await expect_error(g, f"/api/events?session_id={sid}", 404, "not_found", token=CHAT2)
        _, own = await open_stream(g, f"/api/events?session_id={sid}", token=CHAT)
        code, _ = await call(g, "POST", "/api/chat", {"message": "x", "session_id": sid}, CHAT)
        await own.wait_event("run_complete", session_id=sid)
        for reader in (mine, theirs, admin, own):
            reader.disconnect()
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_resume_replays_without_gaps_or_duplicates(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        bus = g.gateway.bus
        ids = [bus.publish("cron_fired", job_id=f"j{i}", name="n").id for i in range(6)]
        by_header = {b"Last-Event-ID": [str(ids[1]).encode()]}
        _, a = await open_stream(g, headers=by_header)
        _, b = await open_stream(g, f"/api/events?last_event_id={ids[3]}")
        # the header wins over the query (a reconnecting EventSource sends the newer id)
        _, c = await open_stream(
            g, f"/api/events?last_event_id={ids[0]}", headers={b"Last-Event-ID": [b"%d" % ids[4]]}
        )
        _, typed = await open_stream(g, f"/api/events?types=session_deleted&last_event_id={ids[0]}")
        live = [bus.publish("cron_fired", job_id=f"l{i}", name="n").id for i in range(3)]
        last = bus.publish("session_deleted", session_id="s").id
        for reader in (a, b, c, typed):
            await reader.wait_for(lambda f: f.get("id") == str(last))
        assert a.ids() == ids[2:] + live + [last]
        assert b.ids() == ids[4:] + live + [last]
        assert c.ids() == ids[5:] + live + [last]
        assert typed.ids() == [last]
        # resuming at the newest id replays nothing and misses nothing
        _, d = await open_stream(g, f"/api/events?last_event_id={last}")
        nxt = bus.publish("cron_fired", job_id="x", name="n").id
        await d.wait_for(lambda f: f.get("id") == str(nxt))
        assert d.ids() == [nxt]
        assert all(f.get("event") != "reset" for r in (a, b, c, d) for f in r.frames)
        for reader in (a, b, c, d, typed):
            reader.disconnect()
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_reset_for_unknown_ids(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), "[events]\nreplay_buffer = 5\n" + TOKENS_TOML)
    try:
        bus = g.gateway.bus
        ids = [bus.publish("cron_fired", job_id=f"j{i}", name="n").id for i in range(20)]
        current = bus.last_id
        # too old (fell out of the buffer), and newer than any id the server handed out
        for after in (ids[2], current + 100):
            _, reader = await open_stream(g, f"/api/events?last_event_id={after}")
            frame = await reader.wait_event("reset")
            assert frame["json"] == {"last_event_id": current}
            assert frame["id"] == str(current)
            assert reader.raw.startswith(b"retry: 3000\n\n")
            nxt = bus.publish("cron_fired", job_id="after", name="n").id
            await reader.wait_for(lambda f, n=nxt: f.get("id") == str(n))
            assert reader.ids() == [nxt]
            current = nxt
            reader.disconnect()
        # the id in the buffer's oldest slot still resumes
        oldest = bus.replay(bus.last_id - 5)
        assert oldest is not None
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_refusals_come_before_the_stream(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), _config("max_streams_per_token = 2"))
    try:
        resp = await expect_error(g, "/api/events", 401, "unauthorized", token=None)
        assert resp.headers.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer")
        await expect_error(g, "/api/events", 401, "unauthorized", token="wrong-token-0123456789")
        await expect_error(
            g, "/api/events?token=wrong-token-0123456789", 401, "unauthorized", token=None
        )
        # a credential that holds neither read nor chat
        g.gateway.tokens.add_stored(
            hash_token("no-scope-token-0123456789"), Principal("tok_none", "anonymous")
        )
        await expect_error(g, "/api/events", 403, "forbidden", token="no-scope-token-0123456789")
        await expect_error(g, "/api/events?last_event_id=abc", 400, "invalid_request")
        await expect_error(g, "/api/events?session_id=no%20spaces", 400, "invalid_request")
        resp = await expect_error(g, "/api/events", 405, "method_not_allowed", method="POST")
        assert resp.headers.getRawHeaders(b"allow") == [b"GET"]
        _, one = await open_stream(g, token=CHAT)
        _, two = await open_stream(g, f"/api/events?token={CHAT}", token=None)
        resp = await expect_error(g, "/api/events", 429, "too_many_streams", token=CHAT)
        assert resp.headers.getRawHeaders(b"retry-after") is not None
        # chat streams count against the same cap
        await expect_error(g, "/api/chat/stream?message=hi", 429, "too_many_streams", token=CHAT)
        _, other = await open_stream(g, token=ADMIN)  # another token is not affected
        assert _sse_count(g) == 3
        for reader in (one, two, other):
            reader.disconnect()
        await _closed(g)
        _, again = await open_stream(g, token=CHAT)
        await again.wait_for(lambda f: "retry" in f)
        again.disconnect()
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_ticket_is_single_use(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        code, body = await call(g, "POST", "/api/tickets", {}, CHAT)
        assert code == 201
        ticket = body["ticket"]
        resp, reader = await open_stream(g, f"/api/events?ticket={ticket}", token=None)
        assert resp.code == 200
        await reader.wait_for(lambda f: "retry" in f)
        # the ticket carries the chat token's scoping
        code, _ = await call(g, "POST", "/api/chat", {"message": "mine"}, CHAT)
        await reader.wait_event("run_complete", response="mine")
        await expect_error(g, f"/api/events?ticket={ticket}", 401, "unauthorized", token=None)
        reader.disconnect()
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_revoking_the_token_closes_its_streams(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        secret = "revocable-token-0123456789abcdef"
        g.gateway.tokens.add_stored(hash_token(secret), Principal("tok_rev", "operator", "r"))
        _, doomed = await open_stream(g, token=secret)
        chat, asked = await stream_awaiting_approval(g, token=secret)
        _, kept = await open_stream(g, token=ADMIN)
        await doomed.wait_for(lambda f: "retry" in f)
        assert _sse_count(g) == 3
        g.gateway.tokens.remove_stored("tok_rev")
        assert await doomed.wait_end() == "done"  # a clean end of the response
        assert await chat.wait_end() == "done"
        await _until(lambda: _sse_count(g) == 1, "the revoked streams to close")
        await expect_error(g, "/api/events", 401, "unauthorized", token=secret)
        # the other token's stream is untouched, and the run goes on without its client
        nxt = g.gateway.bus.publish("cron_fired", job_id="j", name="n").id
        await kept.wait_for(lambda f: f.get("id") == str(nxt))
        await g.gateway.approvals.resolve(
            Principal("static", "admin"), asked["json"]["approval_id"], "deny", "no"
        )
        run = await g.gateway.runs.wait(asked["json"]["run_id"])
        assert run.status == "completed"
        kept.disconnect()
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_shutdown_ends_streams(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    stopped = False
    try:
        _, a = await open_stream(g)
        _, b = await open_stream(g, "/api/events?types=cron_fired", token=CHAT)
        await a.wait_for(lambda f: "retry" in f)
        await b.wait_for(lambda f: "retry" in f)
        d = g.stop()
        stopped = True
        assert await a.wait_end() == "done"
        assert await b.wait_end() == "done"
        await d
        assert _sse_count(g) == 0
        assert any(f.get("event") == "shutdown" for f in a.frames)
    finally:
        if not stopped:
            await g.stop()


class _Raw(protocol.Protocol):
    """A bare socket client: sends one request, keeps every byte it gets."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


def _capture_streams(monkeypatch: pytest.MonkeyPatch) -> list[sse.SSEStream]:
    seen: list[sse.SSEStream] = []
    opened = sse.EventHub.opened

    def spy(hub: sse.EventHub, stream: sse.SSEStream) -> None:
        seen.append(stream)
        opened(hub, stream)

    monkeypatch.setattr(sse.EventHub, "opened", spy)
    return seen


@pytest_twisted.ensureDeferred
async def test_write_paths_chunked_direct_and_http10(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    streams = _capture_streams(monkeypatch)
    g = await start_gateway(str(tmp_path))
    old = _Raw(b"GET /api/events HTTP/1.0\r\nAuthorization: Bearer %s\r\n\r\n" % ADMIN.encode())
    await connectProtocol(TCP4ClientEndpoint(_reactor(), "127.0.0.1", g.port), old)
    try:
        _, new = await open_stream(g)
        await _until(lambda: len(streams) == 2 and b"retry: 3000" in old.data, "both streams")
        await new.wait_for(lambda f: "retry" in f)
        # plain TCP: frames skip Twisted's write buffer (no epoll round trip per write)
        assert all(s._tcp is not None for s in streams)
        assert sorted(s.chunked for s in streams) == [False, True]
        event = g.gateway.bus.publish("cron_fired", job_id="j", name="n")
        frame = sse.event_frame(event)
        await new.wait_for(lambda f: f.get("id") == str(event.id))
        await _until(lambda: frame in old.data, "the HTTP/1.0 frame")
        head, _, body = old.data.partition(b"\r\n\r\n")
        assert b"chunked" not in head.lower()
        assert body == sse.RETRY + frame  # no chunk framing on HTTP/1.0
        assert frame in new.raw
        new.disconnect()
        assert old.transport is not None
        old.transport.loseConnection()
        await old.lost
        await _closed(g)
    finally:
        await g.stop()


class _Stalled(protocol.Protocol):
    """Asks for the stream, then never reads: the server's backlog must grow."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        handle = self.transport.getHandle()  # type: ignore[attr-defined]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.write(self.request)
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_slow_consumer_is_dropped(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    monkeypatch.setattr(sse, "MAX_BACKLOG_BYTES", 256 * 1024)
    g = await start_gateway(str(tmp_path))
    stalled = _Stalled(
        b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n\r\n"
        % ADMIN.encode()
    )
    await connectProtocol(TCP4ClientEndpoint(_reactor(), "127.0.0.1", g.port), stalled)
    try:
        await _until(lambda: _sse_count(g) == 1, "the stalled stream to open")
        _, healthy = await open_stream(g, "/api/events?types=cron_fired")
        big = "x" * 64 * 1024
        for _ in range(2000):  # at most ~128 MiB: far more than any socket buffers
            g.gateway.bus.publish("text_delta", content=big)
            await deferLater(_reactor(), 0, lambda: None)
            if _sse_count(g) == 1:
                break
        assert _sse_count(g) == 1, "the slow consumer was not dropped"
        nxt = g.gateway.bus.publish("cron_fired", job_id="j", name="n").id
        await healthy.wait_for(lambda f: f.get("id") == str(nxt))
        code, body = await call(g, "GET", "/api/status")
        assert code == 200
        healthy.disconnect()
        await _closed(g)
    finally:
        if stalled.transport is not None:
            stalled.transport.abortConnection()  # type: ignore[attr-defined]
        await stalled.lost
        await g.stop()


# -- /api/chat/stream ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_chat_stream_get_tokens_and_done(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        message = "hello  streaming world, word by word"
        resp, reader = await open_stream(
            g,
            "/api/chat/stream?message=hello%20%20streaming%20world,%20word%20by%20word",
            token=CHAT,
        )
        assert resp.code == 200
        assert resp.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
        assert await reader.wait_end() == "done"
        events = reader.events()
        tokens = [f["json"]["content"] for f in events if f["event"] == "token"]
        assert len(tokens) == 6
        assert all(set(f["json"]) == {"content"} for f in events if f["event"] == "token")
        assert events[-1]["event"] == "done"
        done = events[-1]["json"]
        assert "".join(tokens) == done["response"] == message
        assert set(done) == {
            "session_id",
            "run_id",
            "status",
            "response",
            "tools_used",
            "tokens",
            "cost_cents",
        }
        assert done["status"] == "completed" and done["tools_used"] == []
        code, run = await call(g, "GET", f"/api/runs/{done['run_id']}", token=CHAT)
        assert code == 200 and run["response"] == message
        # it continues a session like /api/chat does
        _, more = await open_stream(
            g, f"/api/chat/stream?message=again&session_id={done['session_id']}", token=CHAT
        )
        await more.wait_end()
        assert more.events()[-1]["json"]["session_id"] == done["session_id"]
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_chat_stream_post_with_tools(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        resp, reader = await open_stream(
            g,
            "/api/chat/stream",
            token=CHAT,
            method="POST",
            body={"message": "/tool list_dir {}", "sessionKey": "tools-1"},
        )
        assert resp.code == 200
        assert await reader.wait_end() == "done"
        events = reader.events()
        kinds = [f["event"] for f in events]
        assert kinds[:2] == ["tool_start", "tool_end"]
        assert kinds[-1] == "done"
        start, end = events[0]["json"], events[1]["json"]
        assert start["type"] == "tool_start" and start["tool"] == "list_dir"
        assert start["session_id"] == "tools-1" and "run_id" in start and "id" in start
        assert end["call_id"] == start["call_id"] and end["is_error"] is False
        done = events[-1]["json"]
        assert done["tools_used"] == ["list_dir"] and done["session_id"] == "tools-1"
        tokens = "".join(f["json"]["content"] for f in events if f["event"] == "token")
        assert tokens == done["response"]
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_chat_stream_refusals_are_json(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), "[agent]\nmax_queue_per_session = 1\n" + TOKENS_TOML)
    try:
        path = "/api/chat/stream"
        await expect_error(g, path + "?message=hi", 401, "unauthorized", token=None)
        await expect_error(g, path + "?message=hi", 403, "forbidden", token=VIEWER)
        await expect_error(g, path, 400, "invalid_request")
        await expect_error(g, path + "?message=%20", 400, "invalid_request")
        await expect_error(g, path, 400, "invalid_request", method="POST", body=["not", "object"])
        await expect_error(g, path, 400, "invalid_request", method="POST", body={"message": 3})
        await expect_error(g, path, 400, "invalid_request", method="POST")
        await expect_error(g, path, 405, "method_not_allowed", method="DELETE")
        # another token's session is 404, never joined
        code, mine = await call(g, "POST", "/api/chat", {"message": "mine"}, CHAT)
        await expect_error(
            g, f"{path}?message=x&session_id={mine['session_id']}", 404, "not_found", token=CHAT2
        )
        # a busy session's full queue is 429 before any stream starts
        busy, asked = await stream_awaiting_approval(g, session_id="busy")
        await expect_error(g, f"{path}?message=more&session_id=busy", 429, "queue_full")
        await g.gateway.approvals.resolve(
            Principal("static", "admin"), asked["json"]["approval_id"], "deny", None
        )
        await busy.wait_end()
        assert busy.events()[-1]["event"] == "done"
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_chat_stream_budget_exceeded_is_429(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        runs = g.gateway.runs
        runs._over_budget = lambda: True  # the day's budget is spent
        await expect_error(g, "/api/chat/stream?message=hi", 429, "budget_exceeded")
        await _closed(g)
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_disconnect_does_not_abort_the_run(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        reader, asked = await stream_awaiting_approval(g, token=CHAT, content="kept")
        run_id = asked["json"]["run_id"]
        reader.disconnect()
        await reader.wait_end()
        await _closed(g)
        live = g.gateway.runs.live(run_id)
        assert live is not None and not live.aborted
        assert live.listeners == []  # the stream let go of the run
        await g.gateway.approvals.resolve(
            Principal("static", "admin"), asked["json"]["approval_id"], "approve", None
        )
        run = await g.gateway.runs.wait(run_id)
        assert run.status == "completed"
        code, body = await call(g, "GET", f"/api/runs/{run_id}", token=CHAT)
        assert code == 200 and body["status"] == "completed"
        assert body["tools_used"] == ["write_file"]
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_chat_stream_error_event_on_abort(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        reader, asked = await stream_awaiting_approval(g, token=CHAT)
        code, _ = await call(g, "POST", f"/api/runs/{asked['json']['run_id']}/abort", {}, CHAT)
        assert code == 202
        assert await reader.wait_end() == "done"
        last = reader.events()[-1]
        assert last["event"] == "error"
        assert set(last["json"]) == {"error"}
        assert last["json"]["error"]["code"] == "conflict"
        assert "aborted" in last["json"]["error"]["message"]
        await _closed(g)
    finally:
        await g.stop()


# -- the hub, in memory ---------------------------------------------------------------------------


class _FakeRequest:
    """Just enough of a Request for SSEStream in "request mode" (no HTTP channel)."""

    method = b"GET"
    channel = None
    chunked = 0
    _disconnected = False
    finished = 0
    sentLength = 0

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.code = 0
        self.headers: dict[bytes, bytes] = {}
        self._finish: Deferred[None] = Deferred()

    def notifyFinish(self) -> Deferred[None]:
        return self._finish

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def finish(self) -> None:
        self.finished = 1

    def loseConnection(self) -> None:
        self._disconnected = True


class _FakeGateway:
    def __init__(self, clock: Clock) -> None:
        from gatewayd.config import parse_config

        self.reactor = self.clock = clock
        self.bus = EventBus(clock)
        self.config = parse_config("[gateway]\nsse_keepalive_s = 5\n", {})


def test_hub_joins_mid_turn_without_duplicates_and_bounds_the_backlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    gw = _FakeGateway(clock)
    hub = sse.EventHub(gw)  # type: ignore[arg-type]
    early = _FakeRequest()
    first = sse.SSEStream(early, hub)  # type: ignore[arg-type]
    hub.start_events(first, make_filter(), None)
    e1 = gw.bus.publish("cron_fired", job_id="a", name="n")  # pending, not yet flushed
    late = _FakeRequest()
    second = sse.SSEStream(late, hub)  # type: ignore[arg-type]
    hub.start_events(second, make_filter(), 0)  # replays e1 itself
    e2 = gw.bus.publish("cron_fired", job_id="b", name="n")
    clock.advance(0)
    f1, f2 = sse.event_frame(e1), sse.event_frame(e2)
    assert b"".join(early.written) == sse.RETRY + f1 + f2
    assert b"".join(late.written) == sse.RETRY + f1 + f2
    # paused by the transport: frames wait in the stream's own counted backlog
    first.pauseProducing()
    e3 = gw.bus.publish("cron_fired", job_id="c", name="n")
    clock.advance(0)
    assert first.backlog_bytes == len(sse.event_frame(e3))
    first.resumeProducing()
    assert first.backlog_bytes == 0 and early.written[-1] == sse.event_frame(e3)
    # past the limit the stream is dropped, and the others carry on
    monkeypatch.setattr(sse, "MAX_BACKLOG_BYTES", 1000)
    first.pauseProducing()
    for _ in range(10):
        gw.bus.publish("cron_fired", job_id="x" * 100, name="n")
        clock.advance(0)
    assert first.closed and not second.closed
    assert hub.stream_count == 1
    # keep-alives for whoever is left; the timer stops with the last stream
    clock.advance(5)
    assert late.written[-1] == sse.KEEPALIVE
    # a clean close still hands over what a paused stream owes (a chat stream's "done")
    second.pauseProducing()
    owed = gw.bus.publish("cron_fired", job_id="owed", name="n")
    clock.advance(0)
    assert late.written[-1] == sse.KEEPALIVE
    second.close("done")
    assert late.written[-1] == sse.event_frame(owed)
    assert late.finished and hub.stream_count == 0
    assert clock.getDelayedCalls() == []
    hub.stop()
