"""For the WebSocket and JSON-RPC tests: an Autobahn (Twisted) client, a raw handshake prober,
and ``running``, a gateway on a loopback port whose clients are all closed, and waited for
(DESIGN trap 7), before it stops."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import ClientFactory, Protocol

from gatewayd.web.ws import factory_for
from tests.harness import ADMIN, TOKENS_TOML, Running, auth, start_gateway

TIMEOUT = 10.0


class HandshakeRefused(Exception):
    pass


class Client(WebSocketClientProtocol):
    """Collects every message (decoded JSON) in ``inbox``; ``opened`` and ``closed`` fire."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox: DeferredQueue[Any] = DeferredQueue()
        self.opened: Deferred[Client] = Deferred()
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()
        self.protocol_in_use: str | None = None

    def onConnect(self, response: Any) -> None:
        self.protocol_in_use = response.protocol

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.inbox.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(HandshakeRefused(reason))
        if not self.closed.called:
            self.closed.callback((wasClean, code, reason))

    def send(self, obj: Any) -> None:
        self.sendMessage(json.dumps(obj).encode())

    async def recv(self, timeout: float = TIMEOUT) -> Any:
        from twisted.internet import reactor

        d = self.inbox.get()
        d.addTimeout(timeout, reactor)
        return await d

    async def recv_until(
        self, kind: str, *, key: str = "type", timeout: float = TIMEOUT
    ) -> tuple[list[Any], Any]:
        """Every frame up to (not including) the first whose ``key`` is ``kind``, and it."""
        before = []
        while True:
            frame = await self.recv(timeout)
            if isinstance(frame, dict) and frame.get(key) == kind:
                return before, frame
            before.append(frame)

    async def close(self, code: int = 1000) -> tuple[bool, int | None, str | None]:
        from twisted.internet import reactor

        if not self.closed.called:
            self.sendClose(code)
        self.closed.addTimeout(TIMEOUT, reactor)
        return await self.closed


async def connect(
    url: str,
    path: str = "/ws",
    *,
    token: str | None = None,
    protocols: list[str] | None = None,
    headers: dict[str, str] | None = None,
    origin: str | None = None,
) -> Client:
    from twisted.internet import reactor

    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    ws_url = url.replace("http://", "ws://") + path
    factory = WebSocketClientFactory(ws_url, protocols=protocols or [], headers=hdrs, origin=origin)
    factory.protocol = Client
    factory.setProtocolOptions(openHandshakeTimeout=TIMEOUT, closeHandshakeTimeout=2)
    connected: Deferred[Client] = Deferred()
    host, port = ws_url.split("//", 1)[1].split("/", 1)[0].split(":")
    original = factory.buildProtocol

    def build(addr: Any) -> Any:
        p = original(addr)
        p.opened.chainDeferred(connected)
        return p

    factory.buildProtocol = build  # type: ignore[method-assign]
    reactor.connectTCP(host, int(port), factory)  # type: ignore[attr-defined]
    connected.addTimeout(TIMEOUT, reactor)
    return await connected


class _Raw(Protocol):
    def __init__(self, request: bytes, done: Deferred[bytes]) -> None:
        self.request = request
        self.done = done
        self.buf = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        head, sep, body = self.buf.partition(b"\r\n\r\n")
        if sep and (b" 101 " in head.split(b"\r\n", 1)[0] or _complete(head, body)):
            if not self.done.called:
                self.done.callback(self.buf)
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback(self.buf)


def _complete(head: bytes, body: bytes) -> bool:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


async def handshake(
    port: int, path: str, headers: dict[str, str] | None = None, *, upgrade: bool = True
) -> tuple[int, dict[str, str], Any]:
    """Send one raw HTTP handshake; returns (status, lower-cased headers, JSON body or None)."""
    from twisted.internet import reactor

    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if upgrade:
        key = base64.b64encode(os.urandom(16)).decode()
        lines += [
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    done: Deferred[bytes] = Deferred()
    factory = ClientFactory.forProtocol(lambda: _Raw(request, done))  # type: ignore[arg-type]
    reactor.connectTCP("127.0.0.1", port, factory)  # type: ignore[attr-defined]
    done.addTimeout(TIMEOUT, reactor)
    raw = await done
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    hdrs = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        hdrs[name.strip().lower()] = value.strip()
    parsed = json.loads(body) if body and status != 101 else None
    return status, hdrs, parsed


LISTEN = '[gateway]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
BASH = '/tool bash {"command": "echo hi"}'


class Env:
    """A running gateway and the clients a test opened; all closed (and waited for) at the end."""

    def __init__(self, g: Running) -> None:
        self.g = g
        self.clients: list[Client] = []
        self.stopped = False

    @property
    def url(self) -> str:
        return self.g.url

    @property
    def gw(self) -> Any:
        return self.g.gateway

    async def connect(self, path: str = "/ws", token: str | None = ADMIN, **kw: Any) -> Client:
        c = await connect(self.url, path, token=token, **kw)
        self.clients.append(c)
        return c

    async def idle(self) -> None:
        from twisted.internet import reactor

        factory = factory_for(self.gw)
        assert factory is not None
        await factory.when_idle().addTimeout(TIMEOUT, reactor)
        assert self.gw.connections["websocket"] == 0

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.g.stop()

    async def rest(self, method: str, path: str, body: Any = None, token: str = ADMIN) -> Any:
        data = None if body is None else json.dumps(body).encode()
        resp = await treq.request(method, self.url + path, data=data, headers=auth(token))
        raw = await resp.content()
        return resp.code, (json.loads(raw) if raw else None)


@asynccontextmanager
async def running(tmp_path: Any, extra: str = "") -> AsyncIterator[Env]:
    g = await start_gateway(str(tmp_path), LISTEN + extra + TOKENS_TOML)
    env = Env(g)
    try:
        yield env
    finally:
        for c in env.clients:
            if not c.closed.called:
                await c.close()
        try:
            await env.idle()
        finally:
            await env.stop()
