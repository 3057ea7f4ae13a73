"""send_now: a TCP connection's buffered bytes reach the peer before the reactor polls again."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from gatewayd.sendnow import send_now, tcp_connection


class Kept(Protocol):
    def __init__(self, seen: Deferred[Any]) -> None:
        self.seen = seen

    def connectionMade(self) -> None:  # noqa: N802
        if not self.seen.called:
            self.seen.callback(self)


async def pair() -> tuple[Any, Any, Any]:
    """A loopback connection: (listening port, server protocol, client protocol)."""
    server_seen: Deferred[Any] = Deferred()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        WrappingFactory(Factory.forProtocol(lambda: Kept(server_seen)))
    )
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        Factory.forProtocol(lambda: Kept(Deferred()))
    )
    server = await server_seen
    return port, server, client


def peek(transport: Any) -> bytes:
    conn = tcp_connection(transport)
    assert conn is not None
    try:
        return conn.socket.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # type: ignore[no-any-return]
    except BlockingIOError:
        return b""


async def close(port: Any, *protocols: Any) -> None:
    lost = []
    for p in protocols:
        d: Deferred[None] = Deferred()
        p.connectionLost = lambda reason, d=d: d.callback(None)
        lost.append(d)
        p.transport.abortConnection()
    for d in lost:
        await d
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_buffered_bytes_leave_now_through_a_wrapper() -> None:
    port, server, client = await pair()
    try:
        # the server's transport is a policies wrapper, as the site's is
        assert isinstance(server.transport, ProtocolWrapper)
        server.transport.write(b"first token")
        assert peek(client.transport) == b""  # a plain write waits for the reactor
        send_now(server.transport)
        assert peek(client.transport) == b"first token"
        assert tcp_connection(server.transport)._tempDataLen == 0  # type: ignore[union-attr]
        send_now(server.transport)  # nothing buffered: nothing happens
        assert peek(client.transport) == b"first token"
    finally:
        await close(port, server, client)


@pytest_twisted.ensureDeferred
async def test_a_closing_connection_is_left_to_the_reactor() -> None:
    port, server, client = await pair()
    try:
        client.transport.write(b"late")
        client.transport.loseConnection()
        send_now(client.transport)
        assert peek(server.transport) == b""
    finally:
        await close(port, server)


def test_what_is_not_tcp_is_ignored() -> None:
    send_now(None)
    send_now(object())
    assert tcp_connection(None) is None
