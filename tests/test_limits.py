"""HTTP limits and deadlines: the channel in memory on a Clock, then raw sockets on a real server.

The in-memory tests drive :class:`gatewayd.web.site.GatewaySite` with a ``StringTransport``
and a ``Clock``, so every deadline is exact and nothing waits.  The socket tests run the real
service tree on a loopback port (and, for memory, a real ``twistd`` process) and talk to it
with blocking stdlib sockets in a thread, every read bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gatewayd.web.limits import Limits, exempt_from_deadline
from gatewayd.web.site import GatewaySite
from tests.harness import ADMIN, TOKENS_TOML, spawn, start_gateway

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- in memory ----------------------------------------------------------------------------------


class Echo(Resource):
    """Answers the body length; ``/hang`` never answers; ``/stream`` exempts itself."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hanging: list[Any] = []

    def render(self, request: Any) -> bytes | int:
        if request.path in (b"/hang", b"/api/chat"):
            self.hanging.append(request)
            return NOT_DONE_YET
        if request.path == b"/stream":
            exempt_from_deadline(request)
            self.hanging.append(request)
            return NOT_DONE_YET
        return b"len=%d" % len(request.content.read())


class Mem:
    def __init__(self, cap: int = 100, header_s: float = 1.0, request_s: float = 5.0) -> None:
        self.clock = Clock()
        self.resource = Echo()
        self.site = GatewaySite(self.resource, clock=self.clock, reactor=MemoryReactorClock())
        self.site.limits = Limits(header_s, request_s, lambda m, p: cap)

    def connect(self) -> tuple[Any, StringTransport]:
        conn = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        conn.makeConnection(transport)
        return conn, transport


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def json_of(data: bytes) -> Any:
    return json.loads(data.partition(b"\r\n\r\n")[2])


def assert_refused(transport: StringTransport, status: int, code: str) -> None:
    data = transport.value()
    assert status_of(data) == status, data
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert b"connection: close" in head
    assert b"content-type: application/json" in head
    assert json_of(data) == {"error": {"code": code, "message": json_of(data)["error"]["message"]}}
    assert transport.disconnecting


def test_oversized_content_length_is_413_without_100_continue() -> None:
    m = Mem(cap=100)
    conn, t = m.connect()
    conn.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 10485760\r\n\r\n"
    )
    assert b"100 Continue" not in t.value()
    assert_refused(t, 413, "payload_too_large")


def test_body_within_the_cap_gets_100_continue_and_is_served() -> None:
    m = Mem(cap=100)
    conn, t = m.connect()
    conn.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n"
    )
    assert t.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.dataReceived(b"a" * 100)
    assert t.value().endswith(b"len=100")


def test_chunked_body_is_cut_as_it_crosses_the_cap() -> None:
    m = Mem(cap=100)
    conn, t = m.connect()
    conn.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert t.value() == b""
    conn.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert_refused(t, 413, "payload_too_large")
    # whatever else the client sends is read and dropped, never stored or parsed
    channel = conn.wrappedProtocol
    request = channel.requests[-1]
    assert request.content.tell() == 64
    conn.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert t.value().count(b"HTTP/1.1") == 1
    m.clock.advance(10)  # the linger ends in an abort
    assert t.disconnecting


def test_chunked_body_within_the_cap_is_served() -> None:
    m = Mem(cap=100)
    conn, t = m.connect()
    conn.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.dataReceived(b"32\r\n" + b"a" * 50 + b"\r\n32\r\n" + b"b" * 50 + b"\r\n0\r\n\r\n")
    assert t.value().endswith(b"len=100")


def test_request_line_over_8k_is_414() -> None:
    m = Mem()
    conn, t = m.connect()
    conn.dataReceived(b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_refused(t, 414, "uri_too_long")


def test_request_line_over_8k_without_an_end_is_414_at_once() -> None:
    m = Mem()
    conn, t = m.connect()
    conn.dataReceived(b"GET /" + b"a" * 9000)
    assert_refused(t, 414, "uri_too_long")


def test_a_request_line_just_under_8k_is_fine() -> None:
    m = Mem()
    conn, t = m.connect()
    line = b"GET /" + b"a" * (8192 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == 8192
    conn.dataReceived(line + b"\r\nHost: a\r\n\r\n")
    assert status_of(t.value()) == 200


@pytest.mark.parametrize(
    "headers",
    [
        [b"X-Big: " + b"a" * 17000],  # one header line over the budget
        [b"X-H%d: %s" % (i, b"a" * 1000) for i in range(17)],  # many that add up
        [b"X-%d: 1" % i for i in range(600)],  # too many fields
    ],
    ids=["one-line", "sum", "count"],
)
def test_headers_over_16k_are_431(headers: list[bytes]) -> None:
    m = Mem()
    conn, t = m.connect()
    conn.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"\r\n".join(headers) + b"\r\n\r\n")
    assert_refused(t, 431, "headers_too_large")


def test_headers_just_under_16k_are_fine() -> None:
    m = Mem()
    conn, t = m.connect()
    conn.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 16000 + b"\r\n\r\n")
    assert status_of(t.value()) == 200


def test_malformed_requests_are_400_in_the_contract_shape() -> None:
    for head in (
        b"NONSENSE\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    ):
        m = Mem()
        conn, t = m.connect()
        conn.dataReceived(head)
        assert_refused(t, 400, "invalid_request")


def test_slow_head_gets_408_at_the_absolute_deadline() -> None:
    m = Mem(header_s=1.0)
    conn, t = m.connect()
    for _ in range(9):  # a byte every 0.1 s resets nothing
        conn.dataReceived(b"G")
        m.clock.advance(0.1)
    assert t.value() == b""
    m.clock.advance(0.11)
    assert_refused(t, 408, "request_timeout")


def test_idle_connection_is_closed_quietly_at_the_deadline() -> None:
    m = Mem(header_s=1.0)
    conn, t = m.connect()
    conn.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(t.value()) == 200
    t.clear()
    m.clock.advance(0.99)
    assert not t.disconnecting
    m.clock.advance(0.02)  # keep-alive ends with the next head's deadline, without a word
    assert t.value() == b"" and t.disconnecting


def test_stalled_body_gets_408() -> None:
    m = Mem(header_s=1.0)
    conn, t = m.connect()
    conn.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    for _ in range(5):  # progress keeps it going
        m.clock.advance(0.9)
        conn.dataReceived(b"a")
    assert t.value() == b""
    m.clock.advance(1.0)
    assert_refused(t, 408, "request_timeout")


def test_request_deadline_answers_408_and_drops_the_late_answer() -> None:
    m = Mem(request_s=5.0)
    conn, t = m.connect()
    conn.dataReceived(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
    m.clock.advance(4.9)
    assert t.value() == b""
    m.clock.advance(0.2)
    assert_refused(t, 408, "request_timeout")
    request = m.resource.hanging[0]
    request.write(b"late")
    request.finish()
    assert b"late" not in t.value()


@pytest.mark.parametrize("path", [b"/stream", b"/api/chat"])
def test_streams_and_run_waits_are_not_cut(path: bytes) -> None:
    m = Mem(request_s=5.0)
    conn, t = m.connect()
    method = b"POST" if path == b"/api/chat" else b"GET"
    conn.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    m.clock.advance(60)
    assert t.value() == b"" and not t.disconnecting
    request = m.resource.hanging[0]
    request.write(b"done")
    request.finish()
    assert t.value().endswith(b"done\r\n0\r\n\r\n")


def test_pipelined_requests_are_answered_in_order() -> None:
    m = Mem()
    conn, t = m.connect()
    conn.dataReceived(
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nz"
    )
    assert t.value().count(b"HTTP/1.1 200") == 2
    assert t.value().endswith(b"len=1")


def test_connections_are_counted_and_released() -> None:
    m = Mem()
    conns = [m.connect() for _ in range(3)]
    assert len(m.site.channels) == 3 and m.site.open_by_host == {"127.0.0.1": 3}
    for conn, _t in conns:
        conn.connectionLost(None)
    assert not m.site.channels and m.site.open_by_host == {}


# --- raw sockets against the real service tree ---------------------------------------------------

LIMITS_TOML = (
    """
[gateway]
listen = ["tcp:0:interface=127.0.0.1:backlog=1024"]
header_timeout_s = 1
request_timeout_s = 2
max_connections_per_ip = 230
"""
    + TOKENS_TOML
)


def exchange(
    port: int, data: bytes, *, timeout: float = 5.0, shut: bool = False
) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes (or ``timeout``); (reply, seconds taken)."""
    started = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except ConnectionError:  # refused at accept
        return b"", time.monotonic() - started
    with s:
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except ConnectionError:
            return b"", time.monotonic() - started
        chunks = []
        deadline = started + timeout
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
    from twisted.internet.threads import deferToThread

    return deferToThread(fn, *args, **kw)


def get(path: str, token: str | None = ADMIN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_real_socket_limits(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), LIMITS_TOML)
    try:
        # 413 before the body, no 100 Continue, for a 10 MiB Content-Length
        head = (
            b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + ADMIN.encode()
            + b"\r\nExpect: 100-continue\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10485760\r\n\r\n"
        )
        reply, took = await in_thread(exchange, g.port, head)
        assert reply.startswith(b"HTTP/1.1 413 "), reply
        assert b"100 Continue" not in reply and b"Connection: close" in reply
        assert json_of(reply)["error"]["code"] == "payload_too_large"

        # slow-loris: a byte every 0.2 s, closed within header_timeout_s + 1 s
        def loris() -> tuple[bytes, float]:
            started = time.monotonic()
            head = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40
            with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
                s.settimeout(0.2)
                for byte in head:
                    try:
                        s.sendall(bytes([byte]))
                        return s.recv(65536), time.monotonic() - started  # answer or close
                    except TimeoutError:
                        continue  # still waiting: drip the next byte
                    except OSError:
                        break
            return b"", time.monotonic() - started

        reply, took = await in_thread(loris)
        assert took < 2.0, took
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408 "), reply

        # 431 and 414, and the server is healthy afterwards
        big = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n"
        reply, _ = await in_thread(exchange, g.port, big)
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]
        long_uri = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        reply, _ = await in_thread(exchange, g.port, long_uri)
        assert reply.startswith(b"HTTP/1.1 414 "), reply[:80]
        reply, _ = await in_thread(exchange, g.port, get("/api/status"))
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    finally:
        await g.stop()


class Idle(Protocol):
    """A client that connects and says nothing; ``lost`` fires when the server drops it."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.lost.callback(None)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition on the reactor (bounded), for server-side effects of client actions."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await deferLater(reactor, 0.01, lambda: None)


async def open_idle(port: int, n: int) -> list[Idle]:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    protos = [Idle() for _ in range(n)]
    await DeferredList([connectProtocol(endpoint, p) for p in protos], fireOnOneErrback=True)
    return protos


@pytest_twisted.ensureDeferred
async def test_idle_sockets_do_not_starve_health(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), LIMITS_TOML.replace("header_timeout_s = 1", ""))
    idle: list[Idle] = []
    try:
        site = g.service.sites[0]
        idle += await open_idle(g.port, 200)
        await until(lambda: len(site.channels) >= 200)  # the server has accepted them all
        reply, took = await in_thread(exchange, g.port, get("/health", None))
        assert reply.startswith(b"HTTP/1.1 200 ") and took < 1.0, (reply[:80], took)
        # past max_connections_per_ip (230) a connection is closed at accept, unanswered
        more = await open_idle(g.port, 40)
        idle += more
        await DeferredList([p.lost for p in more[-10:]])
        await until(lambda: site.refusals.get("too_many_connections", 0) >= 10)
        assert len(site.channels) == 230
        reply, took = await in_thread(exchange, g.port, get("/health", None))
        assert reply == b"", reply
    finally:
        for p in idle:
            if p.transport is not None and not p.lost.called:
                p.transport.abortConnection()
        await DeferredList([p.lost for p in idle])
        await g.stop()


def test_chunked_upload_is_cut_and_server_memory_stays_flat(tmp_path: Any) -> None:
    """Stream up to 1 GiB chunked at a real twistd process; it cuts at the cap, RSS flat."""
    proc = spawn(str(tmp_path), env=child_env())
    try:
        rss_before = _rss_kib(proc.proc.pid)
        chunk = b"a" * 65536
        frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        sent = 0
        reply = b""
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as s:
            s.sendall(
                b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                + ADMIN.encode()
                + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            s.settimeout(10)
            try:
                while sent < 1 << 30 and time.monotonic() - started < 30:
                    s.sendall(frame)
                    sent += len(chunk)
            except OSError:
                pass
            try:
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    reply += data
            except OSError:
                pass
        rss_after = _rss_kib(proc.proc.pid)
        print(
            f"chunked upload: sent {sent} bytes before the cut; gateway RSS "
            f"{rss_before} KiB -> {rss_after} KiB"
        )
        assert sent < 64 << 20, sent  # cut long before 1 GiB (linger discards ≤ 8 MiB)
        assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 413 "), reply[:100]
        assert proc.request("GET", "/api/status")[0] == 200
    finally:
        proc.terminate()


def child_env() -> dict[str, str]:
    """The repo first on the child's path, so modules added since the last install import."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": REPO + (os.pathsep + path if path else "")}


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest_twisted.ensureDeferred
async def test_body_caps_come_from_routes_hooks_and_prefixes(tmp_path: Any) -> None:
    text = LIMITS_TOML + '\n[webhooks.small]\nsecret = "s3cret-s3cret"\nbody_limit_bytes = 2048\n'
    g = await start_gateway(str(tmp_path), text)
    try:
        cap = g.service.sites[0].body_limit
        assert cap(b"POST", b"/api/chat") == 65536
        assert cap(b"PUT", b"/api/config") == 1048576  # the route's own
        assert cap(b"POST", b"/v1/chat/completions") == 4194304
        assert cap(b"POST", b"/hooks/small") == 2048  # the hook's own
        assert cap(b"POST", b"/hooks/other") == 1048576
        head = b"PUT /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
        reply, _ = await in_thread(exchange, g.port, head % (1048577,))
        assert reply.startswith(b"HTTP/1.1 413 "), reply[:80]
        reply, _ = await in_thread(exchange, g.port, head % (70000,), timeout=0.5)
        assert reply == b""  # within the cap: the server waits for the body
    finally:
        await g.stop()
