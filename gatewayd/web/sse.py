"""Server-Sent Events: ``GET /api/events`` and the stream machinery ``/api/chat/stream`` shares.

Fan-out is built for many subscribers (DESIGN, performance facts: ``Request.write`` per event
spends two ``epoll_ctl`` calls per write burst and reaches only ~60% of 1,000 subscribers at
100 events/s):

- the hub is the *one* bus subscriber for every ``/api/events`` stream; streams with the same
  filter share a group, so an event is matched once per group and framed once (``id``/
  ``event``/``data`` bytes, plus its HTTP/1.1 chunk) for all of the group's streams;
- frames are coalesced: an event only appends to its groups' pending lists, and one
  ``callLater(0)`` flushes every dirty group once per reactor turn (a burst of deltas is one
  write per stream);
- writes skip ``Request.write``: the stream frames its own chunks and, when the TCP transport
  has nothing buffered, hands the bytes straight to ``socket.send``; only a partial send
  falls back to ``transport.write`` (and so to epoll).  TLS and HTTP/2 use the normal path.

Slow consumers (DESIGN trap 14): each stream is a push producer on its request; while the
transport has paused it, frames go to the stream's own byte-counted backlog, and a stream
whose backlog passes :data:`MAX_BACKLOG_BYTES` is dropped.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import tcp
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from gatewayd.auth import Principal
from gatewayd.errors import GatewayError, invalid
from gatewayd.events import Event, EventFilter, make_filter
from gatewayd.ops import ID_RE
from gatewayd.streams import StreamHandle
from gatewayd.web.common import (
    as_gateway_error,
    authenticate,
    dumps,
    query_args,
    render_error,
)
from gatewayd.web.limits import exempt_from_deadline

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()

#: a stream whose unsent backlog passes this many bytes is disconnected (CONTRACT §6, §8);
#: read at each send, so tests may lower it
MAX_BACKLOG_BYTES = 8 * 1024 * 1024
RETRY_MS = 3000
RETRY = b"retry: %d\n\n" % RETRY_MS
KEEPALIVE = b": keep-alive\n\n"
CONTENT_TYPE = b"text/event-stream"
_LAST_ID = re.compile(r"\d{1,18}")


def to_chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk; built once per flush and shared by every chunked stream."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def event_frame(event: Event) -> bytes:
    """``id``/``event``/``data`` for one event; the JSON is the event's own, encoded once."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, event.type.encode(), event.encoded())


def named_frame(name: str, data: Any) -> bytes:
    """An event without an id (``reset``, and the chat stream's own events)."""
    body = data if isinstance(data, bytes) else dumps(data)
    return b"event: %s\ndata: %s\n\n" % (name.encode(), body)


def reset_frame(last_id: int) -> bytes:
    """``reset``: the server does not know the client's id; it carries the current last id.

    The frame has ``id: <last_id>`` too, so a browser's ``EventSource`` resumes from there on
    its next reconnect instead of sending the unknown id again.
    """
    return b"id: %d\nevent: reset\ndata: %s\n\n" % (last_id, dumps({"last_event_id": last_id}))


KEEPALIVE_CHUNK = to_chunk(KEEPALIVE)


def _direct_transport(transport: Any) -> Any:
    """The TCP transport under ``transport`` when bytes may skip its buffer, else None.

    Plain forwarding wrappers (the site's per-connection counter) are looked through; a
    wrapper that rewrites bytes (TLS is a ``ProtocolWrapper`` too) or a TCP transport after
    ``startTLS`` stops the search: those keep the ordinary write path.
    """
    while isinstance(transport, ProtocolWrapper):
        kind = type(transport)
        if kind.write is not ProtocolWrapper.write or (
            kind.writeSequence is not ProtocolWrapper.writeSequence
        ):
            return None
        transport = transport.transport
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    if not all(hasattr(transport, a) for a in ("_tempDataLen", "dataBuffer", "offset", "socket")):
        return None
    return transport


@implementer(IPushProducer)
class SSEStream:
    """One open text/event-stream response: framing, writing, backlog, and its ending.

    Ends exactly once, whichever comes first: the client goes away, the stream is closed
    (revoked token, shutdown, the chat run finished) or dropped (slow consumer).
    """

    def __init__(self, request: IRequest, hub: EventHub) -> None:
        self.request = cast(Request, request)
        self.hub = hub
        self.handle: StreamHandle | None = None
        self.closed = False
        self.started = False
        self.paused = False
        self.chunked = False
        #: frames queued for the next flush (chat streams), or before the response started
        self.pending: list[bytes] = []
        self.backlog: deque[bytes] = deque()
        self.backlog_bytes = 0
        self.sent = 0
        #: set when the hub should end this stream at shutdown (``/api/events``)
        self.ends_at_shutdown = False
        self._ended: list[Callable[[], None]] = []
        self._transport: Any = None
        self._tcp: Any = None
        self.request.notifyFinish().addErrback(self._lost)
        exempt_from_deadline(request)  # a stream outlives request_timeout_s

    # -- starting ----------------------------------------------------------------------------

    def begin(self, first: bytes = b"") -> None:
        """Send the headers (and ``first``), then anything queued before the start."""
        if self.closed:
            return
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(first)  # headers; decides chunked or not
        self.started = True
        channel = getattr(request, "channel", None)
        if isinstance(channel, HTTPChannel) and channel.transport is not None:
            self._transport = channel.transport
            self.chunked = bool(request.chunked)
            self._tcp = _direct_transport(self._transport)
            set_no_delay = getattr(self._tcp or self._transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                try:
                    set_no_delay(True)  # a stream of small frames: do not wait on Nagle
                except OSError:
                    pass
        request.registerProducer(self, True)
        self.hub.opened(self)
        if self.pending:
            self.flush()

    def on_end(self, callback: Callable[[], None]) -> None:
        self._ended.append(callback)

    # -- writing -----------------------------------------------------------------------------

    def send(self, raw: bytes, chunk: bytes | None = None) -> None:
        """Write one or more whole frames now (or into the backlog while paused)."""
        if self.closed:
            return
        data = raw if not self.chunked else (chunk if chunk is not None else to_chunk(raw))
        self.sent += len(raw)
        if self.paused or self.backlog:
            self.backlog.append(data)
            self.backlog_bytes += len(data)
            if self.backlog_bytes > MAX_BACKLOG_BYTES:
                self.drop("slow consumer")
            return
        self._write(data)

    def queue(self, frame: bytes) -> None:
        """Send ``frame`` with the others of this reactor turn (one write for a burst)."""
        if self.closed:
            return
        self.pending.append(frame)
        if self.started and len(self.pending) == 1:
            self.hub.dirty(self)

    def flush(self) -> None:
        if self.pending and self.started:
            pending, self.pending = self.pending, []
            self.send(pending[0] if len(pending) == 1 else b"".join(pending))

    def _write(self, data: bytes) -> None:
        t = self._tcp
        if t is not None:
            # the transport has nothing queued: the socket may take it now, with no epoll
            if (
                not t._tempDataLen
                and t.offset == len(t.dataBuffer)
                and t.connected
                and not (t.disconnecting or t._writeDisconnected)
            ):
                try:
                    sent = t.socket.send(data)
                except OSError:  # EAGAIN, or a broken peer Twisted will notice itself
                    sent = 0
                if sent == len(data):
                    return
                if sent:
                    data = data[sent:]
            t.write(data)
        elif self._transport is not None:
            self._transport.write(data)
        else:
            self.request.write(data)

    # -- IPushProducer: the transport tells us when its buffer is full ----------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.backlog and not self.paused and not self.closed:
            data = self.backlog.popleft()
            self.backlog_bytes -= len(data)
            self._write(data)

    def stopProducing(self) -> None:
        self._end()

    # -- ending ------------------------------------------------------------------------------

    def close(
        self,
        reason: str = "closed",
        *,
        lose_connection: bool = True,
        error: GatewayError | None = None,
    ) -> None:
        """End the response cleanly (last chunk), then close the connection by default.

        The signature fits :meth:`gatewayd.streams.StreamRegistry.open`'s ``close`` callback
        (revoked token, shutdown).  A stream that never started answers ``error`` (or why
        it closed) as plain JSON instead.
        """
        if self.closed:
            return
        request = self.request
        channel = getattr(request, "channel", None)
        started = self.started
        if started and not request._disconnected:
            # the backlog is bounded by MAX_BACKLOG_BYTES: hand it over, so a slow reader
            # still gets the last frames (a chat stream's ``done``) before the end
            while self.backlog:
                self._write(self.backlog.popleft())
        self._end()
        if request._disconnected or request.finished:
            return
        if not started:  # the response never began: say why in the usual error shape
            if error is None:
                revoked = reason == "token revoked"
                error = GatewayError("unauthorized" if revoked else "unavailable", reason)
            request.write(render_error(request, error))
        else:
            request.sentLength = self.sent
        request.finish()
        if lose_connection and isinstance(channel, HTTPChannel):
            channel.loseConnection()

    def drop(self, reason: str) -> None:
        """Disconnect at once (slow consumer): the frames still owed are not worth waiting on."""
        if self.closed:
            return
        _log.info("dropping SSE stream: {reason}", reason=reason)
        transport = self._transport
        self._end()
        if transport is not None:
            transport.abortConnection()
        elif not self.request._disconnected:
            self.request.loseConnection()

    def _lost(self, failure: Failure) -> None:
        self._end()

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.backlog.clear()
        self.backlog_bytes = 0
        self.pending = []
        request = self.request
        if request.producer is self:
            if request.channel is not None:
                request.unregisterProducer()
            else:  # the connection is gone, and the channel with it
                request.producer = None
        self.hub.closed(self)
        if self.handle is not None:
            self.handle.release()
        callbacks, self._ended = self._ended, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _log.failure("SSE end callback failed")


class _Group:
    """Streams with one filter: an event is matched and framed once for all of them."""

    __slots__ = ("filter", "members", "joiners", "pending")

    def __init__(self, flt: EventFilter) -> None:
        self.filter = flt
        self.members: dict[SSEStream, None] = {}
        #: streams that joined while frames were pending: they get only ids after theirs
        self.joiners: dict[SSEStream, int] = {}
        self.pending: list[tuple[int, bytes]] = []


class EventHub:
    """The one bus subscriber behind every SSE stream; flushes once per reactor turn."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self._reactor = gw.reactor
        self._clock = gw.clock
        self._groups: dict[EventFilter, _Group] = {}
        self._member_of: dict[SSEStream, _Group] = {}
        self._dirty_groups: list[_Group] = []
        self._dirty_streams: list[SSEStream] = []
        self._flush_call: Any = None
        self._keepalive_call: Any = None
        #: every started stream (events and chat), for keep-alives
        self._streams: dict[SSEStream, None] = {}
        self.closing = False
        self._subscription = gw.bus.subscribe(self._on_event)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    # -- events in ---------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        frame = None
        for group in self._groups.values():
            if group.filter.matches(event):
                if frame is None:
                    frame = event_frame(event)
                if not group.pending:
                    self._dirty_groups.append(group)
                group.pending.append((event.id, frame))
        if event.type == "shutdown":
            self.closing = True
            self._schedule()
        elif frame is not None:
            self._schedule()

    def dirty(self, stream: SSEStream) -> None:
        self._dirty_streams.append(stream)
        self._schedule()

    def _schedule(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        groups, self._dirty_groups = self._dirty_groups, []
        for group in groups:
            pending, group.pending = group.pending, []
            if not pending:
                continue
            raw = pending[0][1] if len(pending) == 1 else b"".join(f for _, f in pending)
            chunk = to_chunk(raw)
            for stream in list(group.members):
                stream.send(raw, chunk)
            if group.joiners:
                joiners, group.joiners = group.joiners, {}
                for stream, after in joiners.items():
                    own = b"".join(f for i, f in pending if i > after)
                    if own:
                        stream.send(own)
                    if not stream.closed:
                        group.members[stream] = None
        streams, self._dirty_streams = self._dirty_streams, []
        for stream in streams:
            stream.flush()
        if self.closing:
            self.close_all("the gateway is shutting down")

    # -- streams -----------------------------------------------------------------------------

    def start_events(self, stream: SSEStream, flt: EventFilter, after_id: int | None) -> None:
        """Begin an ``/api/events`` stream: retry, replay (or reset), then live events.

        Replay and joining happen in one synchronous step, so no event can fall between
        them; frames of this turn not yet flushed are filtered by id (no duplicates).
        """
        bus = self._gw.bus
        stream.ends_at_shutdown = True
        stream.begin(RETRY)
        if stream.closed:
            return
        last = bus.last_id
        if after_id is not None:
            replayed = bus.replay(after_id, flt)
            if replayed is None:
                stream.send(reset_frame(last))
            elif replayed:
                stream.send(b"".join(event_frame(e) for e in replayed))
        if stream.closed:
            return
        group = self._groups.get(flt)
        if group is None:
            group = self._groups[flt] = _Group(flt)
        if group.pending:
            group.joiners[stream] = last
        else:
            group.members[stream] = None
        self._member_of[stream] = group

    def opened(self, stream: SSEStream) -> None:
        self._streams[stream] = None
        if self._keepalive_call is None:
            self._keepalive_call = self._clock.callLater(
                self._gw.config.gateway.sse_keepalive_s, self._keepalive
            )

    def closed(self, stream: SSEStream) -> None:
        self._streams.pop(stream, None)
        group = self._member_of.pop(stream, None)
        if group is not None:
            group.members.pop(stream, None)
            group.joiners.pop(stream, None)
            if not group.members and not group.joiners and self._groups.get(group.filter) is group:
                del self._groups[group.filter]
        if not self._streams and self._keepalive_call is not None:
            if self._keepalive_call.active():
                self._keepalive_call.cancel()
            self._keepalive_call = None

    def _keepalive(self) -> None:
        self._keepalive_call = None
        for stream in list(self._streams):
            stream.send(KEEPALIVE, KEEPALIVE_CHUNK)
        if self._streams:
            self._keepalive_call = self._clock.callLater(
                self._gw.config.gateway.sse_keepalive_s, self._keepalive
            )

    def close_all(self, reason: str) -> None:
        """End every ``/api/events`` stream (shutdown); chat streams end with their run."""
        for stream in list(self._streams):
            if stream.ends_at_shutdown:
                stream.close(reason)

    def stop(self) -> None:
        """Forget the bus and every timer (used by tests that build a hub by hand)."""
        self._subscription.cancel()
        for call in (self._flush_call, self._keepalive_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._keepalive_call = None


def last_event_id(request: IRequest, args: dict[str, str]) -> int | None:
    """``Last-Event-ID`` (what a reconnecting EventSource sends) beats ``?last_event_id=``."""
    header = request.getHeader(b"last-event-id")
    if header is not None:
        try:
            value = header.decode("ascii").strip()
        except UnicodeDecodeError:
            raise invalid("Last-Event-ID: must be an event id (an integer)") from None
        where = "Last-Event-ID"
    elif "last_event_id" in args:
        value, where = args["last_event_id"].strip(), "last_event_id"
    else:
        return None
    if not value:
        return None
    if not _LAST_ID.fullmatch(value):
        raise invalid(f"{where}: must be an event id (an integer)")
    return int(value)


def method_not_allowed(request: IRequest, allow: str) -> bytes:
    return render_error(
        request,
        GatewayError("method_not_allowed", f"this path serves {allow} only", data={"allow": allow}),
    )


class EventsResource(Resource):
    """``GET /api/events``: the event bus as SSE (read scope; chat tokens see their own)."""

    isLeaf = True

    def __init__(self, gw: Gateway, hub: EventHub) -> None:
        super().__init__()
        self._gw = gw
        self._hub = hub

    def render(self, request: IRequest) -> bytes | int:
        if request.method != b"GET":
            return method_not_allowed(request, "GET")
        gw = self._gw
        try:
            principal = authenticate(gw, request, streaming=True)
            if principal is None:
                raise GatewayError(
                    "unauthorized", "a valid bearer token (or ?token=, ?ticket=) is required"
                )
            if not principal.can("own"):
                raise GatewayError("forbidden", "the event stream needs the read scope")
            args = query_args(request)
            session_id = args.get("session_id") or None
            if session_id is not None and not ID_RE.fullmatch(session_id):
                raise invalid("session_id: must match [A-Za-z0-9._:-]{1,128}")
            after = last_event_id(request, args)
        except GatewayError as e:
            return render_error(request, e)
        types = [t for t in (p.strip() for p in args.get("types", "").split(",")) if t]
        if session_id is not None and principal.own_only:
            # another token's session is 404 to a chat token, as everywhere (a store lookup)
            d = ensureDeferred(self._checked(request, principal, types, session_id, after))
            d.addErrback(lambda f: _log.failure("event stream failed", f))
            return NOT_DONE_YET
        flt = make_filter(types, session_id, principal.owner_filter)
        return self._open(request, principal, flt, after)

    async def _checked(
        self,
        request: IRequest,
        principal: Principal,
        types: list[str],
        session_id: str,
        after: int | None,
    ) -> None:
        from gatewayd.ops.events import subscription_filter

        answer: bytes | int
        try:
            flt = await subscription_filter(self._gw, principal, types or None, session_id)
        except Exception:
            answer = render_error(request, as_gateway_error(Failure(), "/api/events"))
        else:
            if getattr(request, "_disconnected", False):
                return  # the client left during the lookup
            answer = self._open(request, principal, flt, after)
        if isinstance(answer, bytes) and not getattr(request, "_disconnected", False):
            request.write(answer)
            request.finish()

    def _open(
        self, request: IRequest, principal: Principal, flt: EventFilter, after: int | None
    ) -> bytes | int:
        try:
            if self._hub.closing:
                raise GatewayError("unavailable", "the gateway is shutting down")
            stream = SSEStream(request, self._hub)
            stream.handle = self._gw.streams.open(principal, "sse", stream.close)
        except GatewayError as e:
            return render_error(request, e)
        self._hub.start_events(stream, flt, after)
        return NOT_DONE_YET


def sse_resources(gw: Gateway) -> dict[bytes, Resource]:
    """The SSE paths for the root's fixed-path table, sharing one hub per gateway."""
    from gatewayd.web.sse_chat import ChatStreamResource

    hub = EventHub(gw)
    return {
        b"/api/events": EventsResource(gw, hub),
        b"/api/chat/stream": ChatStreamResource(gw, hub),
    }
