"""WebSocket ``/ws`` and ``/ws/chat``: Autobahn under twisted.web, typed frames or JSON-RPC.

The HTTP half of the handshake (Origin, credentials, session ownership, the stream cap) is
decided before the upgrade in :mod:`gatewayd.web.ws_handshake`; then the transport is handed
to a :class:`GatewayWsProtocol`, registered with ``gw.streams`` so revoking its token closes it
(1008) and a stopping gateway says going-away (1001, DESIGN trap 10).  Typed frames are in
:mod:`gatewayd.web.ws_typed`, JSON-RPC in :mod:`gatewayd.web.rpc`.

Limits: messages over ``ws_max_message_bytes`` close 1009 and invalid UTF-8 1007 (Autobahn,
with ``failByDrop`` off so the peer sees the code); a per-connection sliding window answers
``rate_limited`` past ``max_messages`` and closes 1008 past twice that; auto-ping drops dead
peers; and outgoing frames are queued and counted by us while the transport's buffer is full
(DESIGN trap 14), so a consumer more than :data:`SLOW_CONSUMER_BYTES` behind is closed 1008.

A connection costs little while idle: protocol options live on a per-factory class instead
of being copied into every instance, the handshake's headers are dropped once it is open,
and the rate window, subscription and send queue exist only once used.
"""

from __future__ import annotations

import struct
import weakref
from collections import deque
from types import FunctionType
from typing import TYPE_CHECKING, Any, cast

import txaio

txaio.use_twisted()

from autobahn.twisted.websocket import (  # noqa: E402  (txaio must choose Twisted first)
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import WebSocketProtocol  # noqa: E402
from autobahn.websocket.types import ConnectionRequest  # noqa: E402
from twisted.internet.defer import Deferred, succeed  # noqa: E402
from twisted.internet.protocol import connectionDone  # noqa: E402
from twisted.logger import Logger  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from gatewayd import jsontext  # noqa: E402
from gatewayd.auth import Principal  # noqa: E402
from gatewayd.errors import GatewayError, invalid  # noqa: E402
from gatewayd.events import Event, Subscription  # noqa: E402
from gatewayd.ops.events import subscription_filter  # noqa: E402
from gatewayd.schedule import rfc3339  # noqa: E402
from gatewayd.streams import StreamHandle  # noqa: E402
from gatewayd.web import rpc  # noqa: E402
from gatewayd.web.common import as_gateway_error, dumps  # noqa: E402
from gatewayd.web.ws_handshake import SUBPROTOCOLS, TYPED, WebSocketEndpoint  # noqa: E402
from gatewayd.web.ws_typed import handle_frame  # noqa: E402

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()

#: past this many unsent bytes a client is closed 1008 "slow consumer" (tests lower it)
SLOW_CONSUMER_BYTES = 8 * 1024 * 1024
AUTO_PING_INTERVAL_S = 30.0
AUTO_PING_TIMEOUT_S = 15.0
_UNDECIDED, _TYPED, _RPC = 0, 1, 2

_OPEN = WebSocketProtocol.STATE_OPEN
_CONNECTING = WebSocketProtocol.STATE_CONNECTING
#: handshake state Autobahn keeps per connection and never reads once the socket is open
_HANDSHAKE_ATTRS = (
    "http_headers",
    "http_request_data",
    "http_status_line",
    "http_request_uri",
    "http_request_params",
    "http_request_path",
    "http_request_host",
    "websocket_protocols",
    "websocket_extensions",
    "websocket_origin",
    "http_response_data",
    "_wskey",
)


# -- framing -------------------------------------------------------------------------------


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented server text frame (no compression is ever negotiated).

    Built here rather than with ``sendMessage`` so outgoing size is not capped by the
    incoming limit, frames can be queued and counted, and a fan-out frames an event once.
    """
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class _FrameCache:
    """The last event's frames, so a fan-out to N subscribers encodes it once per mode."""

    __slots__ = ("event", "frames")

    def __init__(self) -> None:
        self.event: Event | None = None
        self.frames: dict[int, bytes] = {}

    def frame(self, event: Event, mode: int) -> bytes:
        if event is not self.event:
            self.event = event
            self.frames = {}
        frame = self.frames.get(mode)
        if frame is None:
            if mode == _RPC:
                body = b'{"jsonrpc":"2.0","method":"event","params":' + event.encoded() + b"}"
            else:
                body = b'{"type":"event","event":' + event.encoded() + b"}"
            frame = self.frames[mode] = text_frame(body)
        return frame


_frames = _FrameCache()


# -- the per-connection window -------------------------------------------------------------


class RateWindow:
    """A sliding-window counter: this window's count plus the overlapping part of the last.

    Three numbers per connection instead of a timestamp per message; a burst from idle is
    counted exactly.  :meth:`hit` answers 0 (go on), a positive retry-after in milliseconds
    (over ``limit``), or -1 (over twice ``limit``: close).
    """

    __slots__ = ("start", "cur", "prev")

    def __init__(self, now_ms: float) -> None:
        self.start = now_ms
        self.cur = 0
        self.prev = 0

    def hit(self, now_ms: float, limit: int, window_ms: float) -> int:
        elapsed = now_ms - self.start
        if elapsed >= window_ms:
            periods = int(elapsed // window_ms)
            self.prev = self.cur if periods == 1 else 0
            self.cur = 0
            self.start += periods * window_ms
            elapsed = now_ms - self.start
        self.cur += 1
        estimate = self.prev * (1.0 - elapsed / window_ms) + self.cur
        if estimate > 2 * limit:
            return -1
        if estimate > limit:
            return self.retry_after_ms(elapsed, limit, window_ms)
        return 0

    def retry_after_ms(self, elapsed: float, limit: int, window_ms: float) -> int:
        """How long until one more message fits, if none is sent meanwhile."""
        room = limit - 1 - self.cur
        if room >= 0 and self.prev > 0:
            wait = window_ms * (1.0 - room / self.prev) - elapsed
        else:
            wait = (window_ms - elapsed) + window_ms * (1.0 - (limit - 1) / self.cur)
        return max(1, int(wait + 0.999))


# -- the protocol --------------------------------------------------------------------------


class TrackedProtocol(WebSocketServerProtocol):
    """A connection of a :class:`HardenedFactory` (``/ws`` and ``/wamp``): however it ends,
    a close handshake or the TCP going first, it lets go of what it holds exactly once."""

    #: the per-token stream registration (set by the endpoint before the upgrade)
    handle: StreamHandle | None = None
    _gone: bool = False

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # Autobahn leaves this timer behind when the TCP goes before the close reply
        call = getattr(self, "closeHandshakeTimeoutCall", None)
        if call is not None:
            self.closeHandshakeTimeoutCall = None
            try:
                call.cancel()
            except ValueError:  # pragma: no cover - already fired
                pass
        self._closed(wasClean)
        self._cleanup()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self._cleanup()

    def _closed(self, was_clean: bool) -> None:
        """The close is known (before any cleanup); for metrics."""

    def _release(self) -> None:
        """What the protocol itself holds (subscriptions, timers, queues)."""

    def _cleanup(self) -> None:
        if self._gone:
            return
        self._gone = True
        self._release()
        handle = self.handle
        if handle is not None:
            handle.release()
        cast("HardenedFactory", self.factory).forget(self)


class GatewayWsProtocol(TrackedProtocol):
    """One WebSocket client.  State beyond Autobahn's is set only once it is needed."""

    _log = Logger()
    #: set by WebSocketEndpoint before the connection is made
    gw: Gateway
    principal: Principal
    bound_session: str | None = None
    peer_host: str = ""
    mode: int = _UNDECIDED
    _rate: RateWindow | None = None
    _sub: Subscription | None = None
    #: JSON-RPC: events held back until the events.subscribe response has been sent
    _hold: list[Event | dict[str, Any]] | None = None
    _queue: deque[bytes] | None = None
    _backlog: int = 0
    _paused: bool = False
    _opened: bool = False

    # -- Autobahn callbacks ----------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> str | None:
        for offered in request.protocols:
            if offered in SUBPROTOCOLS:
                self.mode = _TYPED if offered == TYPED else _RPC
                return str(offered)
        return None

    def onOpen(self) -> None:
        self._opened = True
        for name in _HANDSHAKE_ATTRS:
            self.__dict__.pop(name, None)
        transport: Any = self.transport
        if transport is not None:
            transport.registerProducer(self, True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._gone:
            return
        gw = self.gw
        metrics = getattr(gw, "metrics", None)
        if metrics is not None:
            metrics.ws_message("in")
        limits = gw.config.gateway.ws_rate_limit
        now_ms = gw.clock.seconds() * 1000.0
        rate = self._rate
        if rate is None:
            rate = self._rate = RateWindow(now_ms)
        verdict = rate.hit(now_ms, limits.max_messages, limits.window_ms)
        if verdict < 0:
            self.close_with(1008, "rate limit exceeded")
            return
        expires = self.principal.expires_at
        if expires is not None and expires <= gw.clock.seconds():
            self.close_with(1008, "token expired")
            return
        mode = self.mode
        if isBinary:
            self._refuse(mode, invalid("binary frames are not accepted: send JSON text"))
            return
        try:
            message = jsontext.loads(payload)
        except ValueError:
            if mode == _RPC or (mode == _UNDECIDED and b'"jsonrpc"' in payload):
                self.mode = _RPC
                self.send_obj(rpc.error_response(None, rpc.PARSE_ERROR, "parse error"))
            else:
                self.send_error(invalid("the frame is not valid JSON"))
            return
        if mode == _UNDECIDED:
            rpc_like = isinstance(message, list) or (
                isinstance(message, dict) and "jsonrpc" in message
            )
            mode = self.mode = _RPC if rpc_like else _TYPED
        if verdict > 0:
            self._rate_limited(mode, message, verdict)
            return
        if mode == _TYPED:
            handle_frame(self, message)
        else:
            rpc.dispatch(self._rpc_context(), message).addCallbacks(self._rpc_reply, self._crashed)

    def _closed(self, was_clean: bool) -> None:
        metrics = getattr(self.gw, "metrics", None)
        if self._opened and not self._gone and metrics is not None:
            mine = self.localCloseCode if self.closedByMe else self.remoteCloseCode
            metrics.ws_closed(mine if was_clean else None)

    def _release(self) -> None:
        self._unfollow()
        self._queue = None
        self._hold = None

    # -- sending, with our own count of what the peer has not taken yet ----------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        queue = self._queue
        transport: Any = self.transport
        while queue and not self._paused and transport is not None and not self._gone:
            frame = queue.popleft()
            self._backlog -= len(frame)
            transport.write(frame)

    def stopProducing(self) -> None:
        self._paused = True

    def send_frame(self, frame: bytes) -> None:
        if self._gone or self.state != _OPEN:
            return
        metrics = getattr(self.gw, "metrics", None)
        if metrics is not None:
            metrics.ws_message("out")
        if not self._paused:
            transport: Any = self.transport
            transport.write(frame)
            return
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append(frame)
        self._backlog += len(frame)
        if self._backlog > SLOW_CONSUMER_BYTES:
            self._slow_consumer()

    def send_obj(self, obj: Any) -> None:
        self.send_frame(text_frame(dumps(obj)))

    def _slow_consumer(self) -> None:
        self._queue = None
        self._backlog = 0
        self._log.info("closing a slow WebSocket consumer ({peer})", peer=self.peer_host)
        if self.state == _OPEN:
            self.close_with(1008, "slow consumer")
        elif self.transport is not None:
            transport: Any = self.transport
            transport.abortConnection()

    def close_with(self, code: int, reason: str) -> None:
        """Close with any code (Autobahn's sendClose refuses 1001 and 1008, trap 10)."""
        if self.state == _OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        elif self.state == _CONNECTING:
            self.dropConnection(abort=True)

    def closed_by_registry(self, reason: str) -> None:
        """gw.streams' close callback: revoked token (1008) or a gateway going away (1001)."""
        self.close_with(1008 if "revoked" in reason else 1001, reason)

    def send_error(self, error: GatewayError, ref: Any = None) -> None:
        frame: dict[str, Any] = {"type": "error", "code": error.code, "message": error.message}
        if error.retry_after is not None:
            frame["retry_after_ms"] = error.retry_after * 1000
        if "retry_after_ms" in error.data:
            frame["retry_after_ms"] = error.data["retry_after_ms"]
        if ref is not None:
            frame["ref"] = ref
        self.send_obj(frame)

    def send_failure(self, failure: Failure, ref: Any = None) -> None:
        self.send_error(as_gateway_error(failure, "WebSocket frame"), ref)

    def _refuse(self, mode: int, error: GatewayError) -> None:
        if mode == _RPC:
            self.send_obj(rpc.error_response(None, rpc.INVALID_REQUEST, error.message))
        else:
            self.send_error(error)

    def _rate_limited(self, mode: int, message: Any, retry_after_ms: int) -> None:
        text = "too many messages; slow down"
        if mode == _RPC:
            if isinstance(message, dict) and "id" not in message:
                return  # a notification is never answered
            rid = message.get("id") if isinstance(message, dict) else None
            data = {"code": "rate_limited", "retry_after_ms": retry_after_ms}
            self.send_obj(rpc.error_response(rid, rpc.SERVER_ERROR, text, data))
        else:
            ref = message.get("id") if isinstance(message, dict) else None
            error = GatewayError("rate_limited", text, data={"retry_after_ms": retry_after_ms})
            self.send_error(error, ref)

    def _crashed(self, failure: Failure) -> None:
        _log.failure("WebSocket message handling failed", failure)

    # -- events ---------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        hold = self._hold
        if hold is not None:
            hold.append(event)
        else:
            self.send_frame(_frames.frame(event, self.mode))

    def _reset_obj(self, after_id: int) -> dict[str, Any]:
        """Like SSE's ``event: reset``: its ``id`` is the newest id, to resume from."""
        gw = self.gw
        last = gw.bus.last_id
        return {
            "id": last,
            "type": "reset",
            "ts": rfc3339(gw.clock.seconds()),
            "last_event_id": last,
            "after_id": after_id,
        }

    async def follow(self, params: dict[str, Any]) -> list[Event | dict[str, Any]]:
        """Start (or replace) this connection's subscription; returns what to replay first.

        The replay and the live subscription are taken in one tick, so nothing is missed
        or repeated between them; an ``after_id`` the bus does not know yields a reset.
        """
        gw = self.gw
        session_id = params.get("session_id") or self.bound_session
        flt = await subscription_filter(gw, self.principal, params.get("types"), session_id)
        if self._gone:
            return []
        self._unfollow()
        after = params.get("after_id")
        backlog: list[Event | dict[str, Any]] = []
        if after is not None:
            replay = gw.bus.replay(after, flt)
            backlog = [self._reset_obj(after)] if replay is None else list(replay)
        self._sub = gw.bus.subscribe(self.on_event, flt)
        return backlog

    def send_replay(self, backlog: list[Event | dict[str, Any]]) -> None:
        for item in backlog:
            if isinstance(item, Event):
                self.send_frame(_frames.frame(item, self.mode))
            elif self.mode == _RPC:
                self.send_obj({"jsonrpc": "2.0", "method": "event", "params": item})
            else:
                self.send_obj({"type": "event", "event": item})

    def _unfollow(self) -> None:
        sub = self._sub
        if sub is not None:
            self._sub = None
            sub.cancel()

    # -- JSON-RPC -------------------------------------------------------------------------

    def _rpc_context(self) -> rpc.RpcContext:
        return rpc.RpcContext(
            self.gw,
            self.principal,
            transport="websocket",
            notify=self._rpc_notify,
            peer=self.peer_host,
            local={
                "events.subscribe": self._rpc_subscribe,
                "events.unsubscribe": self._rpc_unsubscribe,
            },
            defaults={"session_id": self.bound_session} if self.bound_session else {},
        )

    def _rpc_notify(self, method: str, params: dict[str, Any]) -> None:
        self.send_obj({"jsonrpc": "2.0", "method": method, "params": params})

    async def _rpc_subscribe(self, params: dict[str, Any]) -> dict[str, Any]:
        backlog = await self.follow(params)
        self._hold = backlog
        return {"subscribed": True, "last_id": self.gw.bus.last_id}

    async def _rpc_unsubscribe(self, params: dict[str, Any]) -> dict[str, Any]:
        self._unfollow()
        self._hold = None
        return {"unsubscribed": True}

    def _rpc_reply(self, response: Any) -> None:
        if response is not None:
            self.send_obj(response)
        hold = self._hold
        if hold is not None:
            self._hold = None
            self.send_replay(hold)


# -- the factory (one per gateway) ---------------------------------------------------------


class HardenedFactory(WebSocketServerFactory):
    """Autobahn with the gateway's options (DESIGN trap 4), and the set of open connections.

    Shared by ``/ws`` and ``/wamp``: a message cap from ``gateway.ws_max_message_bytes``
    answered with 1009 (``failByDrop`` off), UTF-8 checked, auto-ping, no compression, and
    the Origin left to the HTTP half of the handshake (a 403 before the upgrade, trap 10).
    """

    def __init__(self, gw: Gateway, **kw: Any) -> None:
        super().__init__(server="gatewayd", **kw)
        self.gw = gw
        self.live: set[Any] = set()
        self.closing = False
        self._idle: list[Deferred[None]] = []
        cap = gw.config.gateway.ws_max_message_bytes
        self.setProtocolOptions(
            webStatus=False,
            failByDrop=False,
            utf8validateIncoming=True,
            maxFramePayloadSize=cap,
            maxMessagePayloadSize=cap,
            autoPingInterval=AUTO_PING_INTERVAL_S,
            autoPingTimeout=AUTO_PING_TIMEOUT_S,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            allowedOrigins=["*"],  # checked before the upgrade, with a 403 (trap 10)
            perMessageCompressionAccept=lambda offers: None,
        )

    def forget(self, proto: Any) -> None:
        self.live.discard(proto)
        if not self.live and self._idle:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no connection is open (tests wait for it before teardown, trap 7)."""
        if not self.live:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d


class GatewayWsFactory(HardenedFactory):
    """``/ws`` and ``/ws/chat``: typed frames and JSON-RPC."""

    def __init__(self, gw: Gateway) -> None:
        super().__init__(gw)
        _factories[id(gw)] = self
        # options as class attributes: Autobahn then copies none of them per connection
        # (a function, such as perMessageCompressionAccept, must not become a method)
        options = {
            name: staticmethod(value) if isinstance(value, FunctionType) else value
            for name, value in (
                (name, getattr(self, name)) for name in WebSocketServerProtocol.CONFIG_ATTRS
            )
        }
        # and with nothing left to copy, it neither loops nor pformats them per connection
        attributes = {**options, "gw": gw, "CONFIG_ATTRS": ()}
        self.protocol = cast(
            "type[GatewayWsProtocol]",
            type("BoundGatewayWsProtocol", (GatewayWsProtocol,), attributes),
        )

    def going_away(self) -> None:
        """The gateway is stopping: close every WebSocket with 1001, and take no new one."""
        self.closing = True
        for proto in list(self.live):
            proto.close_with(1001, "going away")


_factories: weakref.WeakValueDictionary[int, GatewayWsFactory] = weakref.WeakValueDictionary()


def factory_for(gw: Gateway) -> GatewayWsFactory | None:
    """The gateway's WebSocket factory (its open connections), once the site is built."""
    factory = _factories.get(id(gw))
    return factory if factory is not None and factory.gw is gw else None


def mount(gw: Gateway, fixed: dict[bytes, Any]) -> GatewayWsFactory:
    """Add ``/ws``, ``/ws/chat`` and ``POST /rpc`` to the root's fixed paths."""
    factory = GatewayWsFactory(gw)
    fixed[b"/ws"] = WebSocketEndpoint(factory)
    fixed[b"/ws/chat"] = WebSocketEndpoint(factory, bound=True)
    fixed[b"/rpc"] = rpc.RpcResource(gw)
    return factory
