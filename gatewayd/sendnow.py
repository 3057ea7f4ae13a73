"""Send what a TCP connection holds now, instead of on the reactor's next turn.

Twisted buffers every write until the reactor polls again, so a write waits for everything
else the current turn still does (the rest of an upstream chunk's deltas, the store hand-off,
the handler's own bookkeeping).  Where latency is the point, an upstream request the model
is waiting for or the first token of a stream, :func:`send_now` asks the connection to write
at once through its own ``doWrite`` (``IWriteDescriptor``), exactly what the reactor would
call next: a partial send leaves the rest to the reactor, an error is met again (and handled)
when the reactor next polls, and a connection that is closing is left alone.

Wrapped transports (the site's protocol wrapper, TLS) write through to their TCP connection
synchronously, so the connection underneath is the one flushed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

#: how many wrapper layers are looked through (policies wrapper, TLS, ...)
_MAX_DEPTH = 4


def tcp_connection(transport: Any) -> tcp.Connection | None:
    """The TCP connection under ``transport`` (itself, or under a few wrappers), if any."""
    for _ in range(_MAX_DEPTH):
        if isinstance(transport, tcp.Connection):
            return transport
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


def send_now(transport: Any) -> None:
    """Write ``transport``'s buffered bytes to its socket now, as far as the socket takes them."""
    conn = tcp_connection(transport)
    if (
        conn is None
        or not conn.connected
        or conn.disconnecting
        or conn._writeDisconnecting
        or conn._writeDisconnected
        or not (conn._tempDataLen or conn.offset < len(conn.dataBuffer))
    ):
        return
    conn.doWrite()
