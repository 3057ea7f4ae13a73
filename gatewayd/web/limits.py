"""Exact HTTP limits and deadlines, enforced where Twisted reads the bytes.

Twisted's ``Site`` has only an idle timeout that every byte resets, answers ``100 Continue``
and buffers the whole body before any resource runs, and says 400 to oversized heads
(DESIGN trap 3).  :class:`LimitedChannel` and :class:`LimitedRequest` replace that with:

- an **absolute head deadline**: the request line and headers must arrive within
  ``header_timeout_s`` of the connection opening (or of the previous response); a partial
  head gets 408, an idle keep-alive connection is closed quietly;
- **body caps** decided from ``Content-Length`` before the ``Expect: 100-continue`` branch,
  so an oversized upload gets 413 and never a ``100 Continue``; a chunked body is cut the
  moment it crosses the cap, so nothing past the cap is ever stored;
- a **body stall** timer: more than ``header_timeout_s`` between two reads of a body → 408;
- a **request deadline**: handling that passes ``request_timeout_s`` → 408 (or a close when
  the response has already started), except streams and the routes that wait for a run;
- **sizes**: a request line over 8 KiB → 414, headers over 16 KiB (or 500 fields) → 431.

Every refusal is one JSON error in the contract's shape with ``Connection: close``.  After it
the channel half-closes (plain TCP) and reads and discards for a short linger, so a client
still sending its body sees the answer instead of a reset; then the connection is aborted.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from gatewayd.errors import GatewayError, error_body
from gatewayd.web.common import dumps

REQUEST_LINE_MAX = 8192
HEADERS_MAX = 16384
HEADER_FIELDS_MAX = 500
#: how long a refused connection is read-and-discarded before it is aborted
LINGER_S = 2.0
#: ... and how much of it, at most
LINGER_DISCARD_MAX = 8 * 1024 * 1024
#: a connection asked to close that has not gone after this long is aborted
CLOSE_GRACE_S = 5.0

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}

#: streams: never cut by the request deadline
STREAM_PATHS = frozenset(
    {b"/ws", b"/ws/chat", b"/wamp", b"/api/events", b"/api/chat/stream", b"/api/daemon/logs"}
)
#: routes that wait for a run: bounded by the run's own limits, not by request_timeout_s
RUN_WAIT_PATHS = frozenset(
    {b"/api/chat", b"/api/message", b"/api/agent/wait", b"/tools/invoke", b"/rpc"}
)


def deadline_exempt(method: bytes, path: bytes, headers: Any) -> bool:
    """Streams (SSE, WebSocket) and run waits are not cut by ``request_timeout_s``."""
    if path in STREAM_PATHS or path in RUN_WAIT_PATHS or path.startswith(b"/v1/"):
        return True
    upgrade = headers.getRawHeaders(b"upgrade")
    if upgrade and b"websocket" in upgrade[0].lower():
        return True
    accept = headers.getRawHeaders(b"accept")
    return bool(accept) and b"text/event-stream" in accept[0]


def exempt_from_deadline(request: IRequest) -> None:
    """Let a request outlive ``request_timeout_s`` (streaming resources call this)."""
    cancel = getattr(getattr(request, "channel", None), "cancel_request_deadline", None)
    if cancel is not None:
        cancel()


@attrs.frozen
class Limits:
    """What a channel enforces; the site rebuilds it when the config changes."""

    header_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    #: (method, path) -> the body cap in bytes
    body_limit: Callable[[bytes, bytes], int] = lambda method, path: 65536


def error_response(error: GatewayError, path: bytes | None = None) -> bytes:
    """A whole HTTP/1.1 response for a refusal: the contract's JSON, then close."""
    body = dumps(error_body(error, path))
    lines = [
        b"HTTP/1.1 %d %s" % (error.status, _REASONS.get(error.status, b"Error")),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Cache-Control: no-store",
        b"Connection: close",
    ]
    if error.retry_after is not None:
        lines.append(b"Retry-After: %d" % max(1, error.retry_after))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def utf8_target(path: bytes, host: bytes | None) -> bool:
    """Do the path (percent-decoded) and the Host header decode as UTF-8?

    Klein cannot route (and logs a traceback for) a request that fails this, so the site
    answers such requests with a plain 400 before any resource runs.
    """
    try:
        if not (path.isascii() and b"%" not in path):
            unquote_to_bytes(path).decode("utf-8")
        if host is not None and not host.isascii():
            host.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class LimitedRequest(Request):
    """Keeps the body in memory (the cap bounds it) and counts chunked bodies against it."""

    #: set when the request deadline answered for this request; later writes are dropped
    timed_out = False

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        channel: Any = self.channel
        if channel is None or not channel.body_received(len(data)):
            return
        content: Any = self.content
        content.write(data)

    def write(self, data: bytes) -> None:
        if self.timed_out:
            return
        super().write(data)

    def finish(self) -> None:
        if self.timed_out:
            return
        super().finish()


class LimitedChannel(HTTPChannel):
    """An ``HTTPChannel`` with exact limits; see the module docstring."""

    MAX_LENGTH = REQUEST_LINE_MAX
    #: Twisted's own checks, set past ours so that ours answer (with 431, not 400)
    totalHeadersSize = REQUEST_LINE_MAX + HEADERS_MAX + 1024
    maxHeaders = 1_000_000

    limits = Limits()
    clock: Any = None

    _rejected = False
    _expect_request_line = True
    _header_bytes = 0
    _header_fields = 0
    _body_cap = 0
    _body_seen = 0
    _discarded = 0
    _head_call: IDelayedCall | None = None
    _stall_call: IDelayedCall | None = None
    _request_call: IDelayedCall | None = None
    _abort_call: IDelayedCall | None = None

    # -- hooks the site may override -------------------------------------------------------

    def refused(self, error: GatewayError) -> None:
        """Called once for every refusal (metrics, logs)."""

    # -- life ------------------------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        super().connectionMade()
        self._arm_head_deadline()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self._cancel_timers()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._rejected:
            self._discard(data)
            return
        super().dataReceived(data)

    # -- the head --------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> Any:  # noqa: N802
        if self._rejected:
            return True  # a truthy answer stops LineReceiver's loop
        if self._expect_request_line:
            if len(line) > REQUEST_LINE_MAX:
                self.reject(GatewayError("uri_too_long", "the request line is over 8 KiB"))
                return True
        else:
            self._header_bytes += len(line) + 2
            self._header_fields += 1
            if self._header_bytes > HEADERS_MAX or self._header_fields > HEADER_FIELDS_MAX:
                self.reject(
                    GatewayError("headers_too_large", "the request headers are over 16 KiB")
                )
                return True
        super().lineReceived(line)
        if self._expect_request_line and not getattr(self, "_HTTPChannel__first_line", 0):
            # the request line was taken: header lines may be up to the whole header budget
            self._expect_request_line = False
            self.MAX_LENGTH = HEADERS_MAX
        return self._rejected or None

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        if self._expect_request_line:
            self.reject(GatewayError("uri_too_long", "the request line is over 8 KiB"))
        else:
            self.reject(GatewayError("headers_too_large", "the request headers are over 16 KiB"))

    def allHeadersReceived(self) -> None:  # noqa: N802
        self._cancel(self._head_call)
        self._head_call = None
        length = self.length
        if length != 0:
            path = self._path.split(b"?", 1)[0]
            cap = self.limits.body_limit(self._command, path)
            if length is not None and length > cap:
                # decided before Twisted's 100-continue branch: no "100 Continue" is sent
                self.reject(GatewayError("payload_too_large", f"the body is over {cap} bytes"))
                return
            self._body_cap = cap
            self._body_seen = 0
            self._stall_call = self.clock.callLater(
                self.limits.header_timeout_s, self._body_stalled
            )
        super().allHeadersReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:  # noqa: N802
        self.reject(GatewayError("invalid_request", "malformed HTTP request"))

    # -- the body --------------------------------------------------------------------------

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._rejected:
            self._discard(data)
            return
        if self._stall_call is not None and not self._handlingRequest:
            self._stall_call.reset(self.limits.header_timeout_s)
        super().rawDataReceived(data)

    def body_received(self, size: int) -> bool:
        """Count body bytes; False (and a 413) once a chunked body crosses the cap."""
        if self._rejected:
            return False
        self._body_seen += size
        if self._body_seen > self._body_cap:
            self.reject(
                GatewayError("payload_too_large", f"the body is over {self._body_cap} bytes")
            )
            return False
        return True

    def _finishRequestBody(self, data: bytes) -> None:  # noqa: N802
        if not self._rejected:
            super()._finishRequestBody(data)

    def _body_stalled(self) -> None:
        self._stall_call = None
        self.reject(GatewayError("request_timeout", "the request body stalled"))

    # -- handling --------------------------------------------------------------------------

    def allContentReceived(self) -> None:  # noqa: N802
        if self._rejected:
            return
        self._cancel(self._stall_call)
        self._stall_call = None
        # the next bytes on this connection start a new head
        self._expect_request_line = True
        self.MAX_LENGTH = REQUEST_LINE_MAX
        self._header_bytes = self._header_fields = 0
        request = self.requests[-1]
        path = self._path.split(b"?", 1)[0]
        if not deadline_exempt(self._command, path, request.requestHeaders):
            self._request_call = self.clock.callLater(
                self.limits.request_timeout_s, self._request_overran
            )
        super().allContentReceived()

    def cancel_request_deadline(self) -> None:
        self._cancel(self._request_call)
        self._request_call = None

    def _request_overran(self) -> None:
        self._request_call = None
        if not self.requests or self.transport is None:
            return
        request = self.requests[0]
        started = request.startedWriting
        request.timed_out = True
        if started:
            # part of the answer is out: all that is left to say is goodbye
            self.refused(GatewayError("request_timeout", "the request took too long"))
            self._close(CLOSE_GRACE_S)
        else:
            self.reject(GatewayError("request_timeout", "the request took too long"))

    def requestDone(self, request: Any) -> None:  # noqa: N802
        self._cancel(self._request_call)
        self._request_call = None
        if not self._rejected:
            # armed before Twisted replays pipelined bytes, which may finish a head at once
            self._arm_head_deadline()
        super().requestDone(request)

    # -- deadlines -------------------------------------------------------------------------

    def _arm_head_deadline(self) -> None:
        self._cancel(self._head_call)
        self._head_call = self.clock.callLater(self.limits.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self._head_call = None
        if self.transport is None or self._rejected:
            return
        if self._handlingRequest:
            return
        if self._buffer or not self._expect_request_line:
            self.reject(GatewayError("request_timeout", "the request head did not arrive in time"))
        else:
            self._close(CLOSE_GRACE_S)  # an idle keep-alive connection: just close

    # -- refusing --------------------------------------------------------------------------

    def reject(self, error: GatewayError) -> None:
        """Answer ``error`` with ``Connection: close``, linger briefly, then abort."""
        if self._rejected:
            return
        self._rejected = True
        self._cancel_timers()
        self.length = None  # Twisted's lineReceived must not go on to allContentReceived
        self.setRawMode()
        self.clearLineBuffer()
        self._dataBuffer = []
        transport = self.transport
        if transport is None:
            return
        self.refused(error)
        path = None if self._expect_request_line else getattr(self, "_path", None)
        transport.write(error_response(error, path))
        self._networkProducer.resumeProducing()
        half_close = getattr(transport, "half_close", None)
        if half_close is not None and half_close():
            # FIN after the answer, then keep reading (and dropping) for the linger
            self._abort_later(LINGER_S)
        else:
            self._close(LINGER_S)

    def _discard(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > LINGER_DISCARD_MAX:
            self._abort()

    def _close(self, grace_s: float) -> None:
        if self.transport is None:
            return
        self._cancel_timers()
        self.loseConnection()
        self._abort_later(grace_s)

    def _abort_later(self, grace_s: float) -> None:
        if self._abort_call is None:
            self._abort_call = self.clock.callLater(grace_s, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _cancel_timers(self) -> None:
        for call in (self._head_call, self._stall_call, self._request_call):
            self._cancel(call)
        self._head_call = self._stall_call = self._request_call = None

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()
