"""WAMP v2 at ``/wamp`` (CONTRACT §13): a small router for autobahn-js and autobahn-python.

Autobahn ships no router, so this is one, as narrow as the contract: realm ``gatewayd``;
WAMP-Ticket auth where the ticket is a gatewayd token (or the HTTP handshake already carried
credentials, as on ``/ws``); every JSON-RPC method is the procedure ``gatewayd.<method>``,
dispatched through :func:`gatewayd.web.rpc.call` so scopes, validation and errors are the
operations table's own; the topics ``gatewayd.events`` and ``gatewayd.session.<id>`` follow
the event bus with the same scoping as SSE.  Clients may call and subscribe; they may not
publish or register (the gateway is the only callee and publisher).

CANCEL is honoured in ``skip`` mode whatever mode is asked: the caller gets ERROR
``wamp.error.canceled`` at once and the late result is dropped; the operation itself goes on
(stop a run with ``gatewayd.chat.abort``).  RESULT carries ``args=[result]`` and EVENT
``args=[envelope]``, so an autobahn-python ``call`` returns the value itself.

The HTTP half of the handshake follows ``/ws`` (:mod:`gatewayd.web.ws_handshake`): a foreign
Origin is 403, bad credentials 401, a token over its stream cap 429, and a handshake that
offers no WAMP subprotocol 400, all before the upgrade.
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import txaio

txaio.use_twisted()

from autobahn.wamp import message  # noqa: E402
from autobahn.wamp.exception import ProtocolError  # noqa: E402
from autobahn.wamp.interfaces import IMessage  # noqa: E402
from autobahn.wamp.role import RoleBrokerFeatures, RoleDealerFeatures  # noqa: E402
from autobahn.wamp.serializer import JsonSerializer, Serializer  # noqa: E402
from autobahn.websocket.protocol import WebSocketProtocol  # noqa: E402
from autobahn.websocket.types import ConnectionRequest  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.logger import Logger  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402
from twisted.web.iweb import IRequest  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import NOT_DONE_YET  # noqa: E402

from gatewayd import ops  # noqa: E402
from gatewayd.auth import Principal  # noqa: E402
from gatewayd.errors import GatewayError  # noqa: E402
from gatewayd.events import Event, Subscription  # noqa: E402
from gatewayd.ops.events import subscription_filter  # noqa: E402
from gatewayd.web import rpc, ws  # noqa: E402
from gatewayd.web.common import authenticate, render_error  # noqa: E402
from gatewayd.web.ws import HardenedFactory, RateWindow, TrackedProtocol  # noqa: E402
from gatewayd.web.ws_handshake import (  # noqa: E402
    _take_over,
    offered_protocols,
    origin_allowed,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from gatewayd.core import Gateway

_log = Logger()

REALM = "gatewayd"
PREFIX = "gatewayd."
EVENTS_TOPIC = "gatewayd.events"
SESSION_TOPIC = "gatewayd.session."
#: a connection that has not joined the realm by then is closed
HELLO_TIMEOUT_S = 10.0


def _serializers() -> dict[str, Callable[[], Serializer]]:
    """Subprotocol -> serializer factory, for the serializers whose codec is importable."""
    out: dict[str, Callable[[], Serializer]] = {"wamp.2.json": JsonSerializer}
    try:
        from autobahn.wamp.serializer import MsgPackSerializer

        MsgPackSerializer()
        out["wamp.2.msgpack"] = MsgPackSerializer
    except Exception:  # pragma: no cover - msgpack missing
        pass
    try:
        from autobahn.wamp.serializer import CBORSerializer

        CBORSerializer()
        out["wamp.2.cbor"] = CBORSerializer
    except Exception:  # pragma: no cover - cbor2 missing
        pass
    return out


SERIALIZERS = _serializers()

ROLES = {
    "broker": RoleBrokerFeatures(),
    "dealer": RoleDealerFeatures(progressive_call_results=True, call_canceling=True),
}

_OPEN = WebSocketProtocol.STATE_OPEN
_CONNECTING = WebSocketProtocol.STATE_CONNECTING
_HELLO, _CHALLENGED, _JOINED, _LEFT = 0, 1, 2, 3


def error_uri(e: rpc.RpcError) -> str:
    """The WAMP error URI for a JSON-RPC error (CONTRACT §13)."""
    if e.code == rpc.INVALID_PARAMS:
        return "wamp.error.invalid_argument"
    if e.code == rpc.METHOD_NOT_FOUND:
        return "wamp.error.no_such_procedure"
    code = (e.data or {}).get("code")
    if code in ("unauthorized", "forbidden"):
        return "wamp.error.not_authorized"
    if e.code == rpc.INTERNAL_ERROR or not isinstance(code, str):
        return "gatewayd.error.internal"
    return PREFIX + "error." + code


def call_params(msg: message.Call) -> dict[str, Any]:
    """Keyword arguments, or one dict positional argument; anything else is -32602."""
    args = msg.args or []
    kwargs = msg.kwargs or {}
    if not args:
        return dict(kwargs)
    if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
        return dict(args[0])
    raise rpc.RpcError(rpc.INVALID_PARAMS, "pass parameters as keyword arguments (or one dict)")


class WampProtocol(TrackedProtocol):
    """One WAMP client: at most one session, joined to realm ``gatewayd``."""

    _log = Logger()
    gw: Gateway
    #: set before the upgrade when the HTTP handshake carried credentials
    principal: Principal | None = None
    peer_host: str = ""
    serializer: Serializer | None = None
    phase: int = _HELLO
    session_id: int = 0
    _hello_timer: IDelayedCall | None = None
    _rate: RateWindow | None = None
    #: bytes written while the transport asked us to pause (reset when it resumes)
    _backlog: int = 0
    _paused: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._subs: dict[int, tuple[str, Subscription]] = {}
        self._next_sub = 0
        self._calls: set[int] = set()

    # -- WebSocket callbacks ---------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> str | None:
        for offered in request.protocols:
            make = SERIALIZERS.get(offered)
            if make is not None:
                self.serializer = make()
                return str(offered)
        return None  # pragma: no cover - refused before the upgrade

    def onOpen(self) -> None:
        if self.serializer is None:  # pragma: no cover - refused before the upgrade
            self.close_with(1002, "no WAMP subprotocol")
            return
        self._hello_timer = self.gw.clock.callLater(HELLO_TIMEOUT_S, self._hello_expired)
        transport: Any = self.transport
        if transport is not None:
            transport.registerProducer(self, True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._gone or self.serializer is None:
            return
        gw = self.gw
        now = gw.clock.seconds()
        limits = gw.config.gateway.ws_rate_limit
        rate = self._rate
        if rate is None:
            rate = self._rate = RateWindow(now * 1000.0)
        verdict = rate.hit(now * 1000.0, limits.max_messages, limits.window_ms)
        if verdict < 0:
            self._goodbye("wamp.close.killed", "rate limit exceeded", 1008)
            return
        principal = self.principal
        if principal is not None and principal.expires_at is not None:
            if principal.expires_at <= now:
                self._goodbye("wamp.close.killed", "token expired", 1008)
                return
        try:
            msgs = self.serializer.unserialize(payload, isBinary)
        except ProtocolError as e:
            self._abort("wamp.error.protocol_violation", str(e), 1002)
            return
        for msg in msgs:
            if self._gone or self.phase == _LEFT and not isinstance(msg, message.Goodbye):
                return
            if verdict > 0 and isinstance(msg, message.Call | message.Subscribe):
                self._error(
                    msg.MESSAGE_TYPE,
                    msg.request,
                    "gatewayd.error.rate_limited",
                    "too many messages; slow down",
                    {"code": "rate_limited", "retry_after_ms": verdict},
                )
                continue
            try:
                self._handle(msg)
            except Exception:
                _log.failure("WAMP message handling failed")
                self._abort("wamp.error.internal", "internal error", 1011)

    def _release(self) -> None:
        self._end_session()
        self._cancel_hello_timer()

    def _cancel_hello_timer(self) -> None:
        timer = self._hello_timer
        if timer is not None:
            self._hello_timer = None
            if timer.active():
                timer.cancel()

    def _hello_expired(self) -> None:
        self._hello_timer = None
        if self.phase != _JOINED:
            self._abort("wamp.error.timeout", "no session was established in time", 1008)

    # -- sending -------------------------------------------------------------------------

    def send(self, msg: message.Message) -> None:
        if self._gone or self.state != _OPEN or self.serializer is None:
            return
        payload, is_binary = self.serializer.serialize(cast(IMessage, msg))
        self.sendMessage(payload, is_binary)
        if self._paused:
            self._backlog += len(payload)
            if self._backlog > ws.SLOW_CONSUMER_BYTES:
                # everything is in the transport's buffer already, a close frame included
                self._log.info("dropping a slow WAMP consumer ({peer})", peer=self.peer_host)
                transport: Any = self.transport
                self._cleanup()
                transport.abortConnection()

    # the transport's producer interface: count what is written while it is paused

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._backlog = 0

    def stopProducing(self) -> None:
        self._paused = True

    def close_with(self, code: int, reason: str) -> None:
        """Close with any code (Autobahn's sendClose refuses 1001 and 1008)."""
        if self.state == _OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        elif self.state == _CONNECTING:
            self.dropConnection(abort=True)

    def _abort(self, reason: str, text: str, code: int = 1000) -> None:
        """ABORT (before a session exists, or for a protocol violation), then close."""
        self.send(message.Abort(reason, text))
        self._end_session()
        self.phase = _LEFT
        self.close_with(code, text)

    def _goodbye(self, reason: str, text: str, code: int) -> None:
        """The router ends a session (shutdown, revoke, expiry): GOODBYE, then close."""
        if self.phase == _JOINED:
            self.send(message.Goodbye(reason, text))
        elif self.phase != _LEFT:
            self.send(message.Abort(reason, text))
        self._end_session()
        self.phase = _LEFT
        self.close_with(code, text)

    def closed_by_registry(self, reason: str) -> None:
        """gw.streams' close callback: revoked token (1008) or a gateway going away (1001)."""
        if "revoked" in reason:
            self._goodbye("wamp.close.killed", "token revoked", 1008)
        else:
            self._goodbye("wamp.close.system_shutdown", reason, 1001)

    # -- the session ---------------------------------------------------------------------

    def _handle(self, msg: IMessage) -> None:
        phase = self.phase
        if phase == _JOINED:
            self._joined(msg)
        elif phase == _HELLO and isinstance(msg, message.Hello):
            self._hello(msg)
        elif phase == _CHALLENGED and isinstance(msg, message.Authenticate):
            self._authenticate(msg)
        elif phase == _LEFT and isinstance(msg, message.Goodbye):
            pass  # the reply to our GOODBYE
        else:
            name = type(msg).__name__.upper()
            self._abort("wamp.error.protocol_violation", f"unexpected {name}", 1002)

    def _hello(self, msg: message.Hello) -> None:
        if msg.realm != REALM:
            self._abort("wamp.error.no_such_realm", f"no such realm; use {REALM!r}")
            return
        if self.principal is not None:
            self._welcome(self.principal, "token")
            return
        if "ticket" not in (msg.authmethods or []):
            self._abort("wamp.error.not_authorized", "ticket authentication is required")
            return
        self.phase = _CHALLENGED
        self.send(message.Challenge("ticket", {}))

    def _authenticate(self, msg: message.Authenticate) -> None:
        signature = msg.signature
        principal = self.gw.tokens.authenticate(signature) if isinstance(signature, str) else None
        if principal is None:
            self._abort("wamp.error.not_authorized", "invalid ticket")
            return
        try:
            self.handle = self.gw.streams.open(principal, "websocket", self.closed_by_registry)
        except GatewayError as e:
            self._abort(PREFIX + "error." + e.code, e.message)
            return
        self.principal = principal
        self._welcome(principal, "ticket")

    def _welcome(self, principal: Principal, method: str) -> None:
        self._cancel_hello_timer()
        self.phase = _JOINED
        self.session_id = secrets.randbelow(2**53 - 1) + 1
        welcome = message.Welcome(
            self.session_id,
            ROLES,
            realm=REALM,
            authid=principal.name or principal.token_id,
            authrole=principal.role,
            authmethod=method,
            authprovider="gatewayd",
        )
        self.send(welcome)

    def _end_session(self) -> None:
        subs, self._subs = self._subs, {}
        for _, sub in subs.values():
            sub.cancel()
        self._calls.clear()

    def _joined(self, msg: IMessage) -> None:
        if isinstance(msg, message.Call):
            self._call(msg)
        elif isinstance(msg, message.Cancel):
            if msg.request in self._calls:
                self._calls.discard(msg.request)
                self._error(message.Call.MESSAGE_TYPE, msg.request, "wamp.error.canceled", "")
        elif isinstance(msg, message.Subscribe):
            d = ensureDeferred(self._subscribe(msg))
            d.addErrback(self._subscribe_failed, msg.request)
        elif isinstance(msg, message.Unsubscribe):
            self._unsubscribe(msg)
        elif isinstance(msg, message.Publish):
            if msg.acknowledge:  # an unacknowledged PUBLISH is never answered (WAMP §)
                text = "clients may not publish; the gateway publishes"
                self._error(msg.MESSAGE_TYPE, msg.request, "wamp.error.not_authorized", text)
        elif isinstance(msg, message.Register):
            text = "clients may not register procedures"
            self._error(msg.MESSAGE_TYPE, msg.request, "wamp.error.not_authorized", text)
        elif isinstance(msg, message.Goodbye):
            self._end_session()
            self.phase = _LEFT
            self.send(message.Goodbye("wamp.close.goodbye_and_out"))
        else:
            name = type(msg).__name__.upper()
            self._abort("wamp.error.protocol_violation", f"unexpected {name}", 1002)

    def _error(
        self,
        request_type: int,
        request: int,
        uri: str,
        text: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.send(
            message.Error(request_type, request, uri, args=[text] if text else None, kwargs=data)
        )

    # -- calls ---------------------------------------------------------------------------

    def _call(self, msg: message.Call) -> None:
        request = msg.request
        principal = self.principal
        assert principal is not None
        try:
            procedure = msg.procedure
            if not procedure.startswith(PREFIX):
                raise rpc.RpcError(rpc.METHOD_NOT_FOUND, f"no such procedure: {procedure}")
            params = call_params(msg)
        except rpc.RpcError as e:
            self._call_failed(request, e)
            return
        self._calls.add(request)
        notify: rpc.Notify | None = None
        if msg.receive_progress:

            def notify(method: str, params: dict[str, Any]) -> None:
                if request in self._calls:
                    self.send(message.Result(request, args=[params], progress=True))

        ctx = rpc.RpcContext(
            self.gw, principal, transport="wamp", notify=notify, peer=self.peer_host
        )
        d = ensureDeferred(rpc.call(ctx, procedure[len(PREFIX) :], params))
        d.addCallbacks(self._call_done, self._call_error, (request,), {}, (request,))

    def _call_done(self, result: Any, request: int) -> None:
        if request in self._calls:
            self._calls.discard(request)
            self.send(message.Result(request, args=[result]))

    def _call_error(self, failure: Failure, request: int) -> None:
        if failure.check(rpc.RpcError):
            error = cast(rpc.RpcError, failure.value)
        else:  # rpc.call turns every failure into an RpcError; just in case
            _log.failure("WAMP call failed", failure)
            error = rpc.RpcError(rpc.INTERNAL_ERROR, "internal error")
        if request in self._calls:
            self._calls.discard(request)
            self._call_failed(request, error)

    def _call_failed(self, request: int, e: rpc.RpcError) -> None:
        data = dict(e.data) if e.data else None
        self._error(message.Call.MESSAGE_TYPE, request, error_uri(e), e.message, data)

    # -- subscriptions -------------------------------------------------------------------

    async def _subscribe(self, msg: message.Subscribe) -> None:
        request, topic = msg.request, msg.topic
        principal = self.principal
        assert principal is not None
        for sub_id, (subscribed, _) in self._subs.items():
            if subscribed == topic:  # the same topic again: the same subscription
                self.send(message.Subscribed(request, sub_id))
                return
        if msg.match not in (None, "exact"):
            raise GatewayError("invalid_request", "only exact topic matching is supported")
        session_id: str | None = None
        if topic.startswith(SESSION_TOPIC):
            session_id = topic[len(SESSION_TOPIC) :]
            if not ops.ID_RE.fullmatch(session_id):
                raise GatewayError("invalid_request", "session id: [A-Za-z0-9._:-]{1,128}")
            session = await self.gw.store.get_session(session_id)
            if session is None or not principal.owns(session.owner):
                raise GatewayError("not_found", "no such session")
        elif topic != EVENTS_TOPIC:
            raise GatewayError(
                "invalid_request", f"no such topic; use {EVENTS_TOPIC} or {SESSION_TOPIC}<id>"
            )
        flt = await subscription_filter(self.gw, principal, None, session_id)
        if self.phase != _JOINED or self._gone:
            return
        self._next_sub += 1
        sub_id = self._next_sub

        def deliver(event: Event) -> None:
            if sub_id in self._subs:
                self.send(message.Event(sub_id, event.id, args=[event.envelope()]))

        self._subs[sub_id] = (topic, self.gw.bus.subscribe(deliver, flt))
        self.send(message.Subscribed(request, sub_id))

    def _subscribe_failed(self, failure: Failure, request: int) -> None:
        if failure.check(GatewayError):
            e = cast(GatewayError, failure.value)
            uri = "wamp.error.invalid_argument" if e.code == "invalid_request" else None
            if e.code in ("unauthorized", "forbidden"):
                uri = "wamp.error.not_authorized"
            text = e.message
            uri = uri or PREFIX + "error." + e.code
        else:
            _log.failure("WAMP subscribe failed", failure)
            uri, text = "gatewayd.error.internal", "internal error"
        self._error(message.Subscribe.MESSAGE_TYPE, request, uri, text)

    def _unsubscribe(self, msg: message.Unsubscribe) -> None:
        entry = self._subs.pop(msg.subscription, None)
        if entry is None:
            self._error(
                msg.MESSAGE_TYPE, msg.request, "wamp.error.no_such_subscription", "not subscribed"
            )
            return
        entry[1].cancel()
        self.send(message.Unsubscribed(msg.request))


# -- the factory and the HTTP endpoint -----------------------------------------------------


class WampFactory(HardenedFactory):
    """``/wamp``: the same hardened options as ``/ws``, WAMP subprotocols only."""

    protocol = WampProtocol

    def __init__(self, gw: Gateway) -> None:
        super().__init__(gw, protocols=list(SERIALIZERS))

    def buildProtocol(self, addr: Any) -> WampProtocol:
        proto = cast(WampProtocol, super().buildProtocol(addr))
        proto.gw = self.gw
        return proto

    def going_away(self) -> None:
        """The gateway is stopping: GOODBYE system_shutdown and close 1001; take no new one."""
        self.closing = True
        for proto in list(self.live):
            proto._goodbye("wamp.close.system_shutdown", "the gateway is shutting down", 1001)


class WampEndpoint(Resource):
    """``GET /wamp``: the HTTP half of the handshake, then the transport goes to WAMP."""

    isLeaf = True

    def __init__(self, factory: WampFactory) -> None:
        super().__init__()
        self.factory = factory

    def render(self, request: IRequest) -> bytes | int:
        factory = self.factory
        gw = factory.gw
        try:
            if factory.closing:
                raise GatewayError("unavailable", "the gateway is shutting down")
            if request.method != b"GET":
                request.setHeader(b"allow", b"GET")
                raise GatewayError("method_not_allowed", "a WebSocket handshake is a GET")
            if not origin_allowed(gw, request):
                raise GatewayError("forbidden", "this Origin may not open a WebSocket here")
            args = request.args or {}
            presented = (
                request.getHeader(b"authorization") is not None
                or getattr(request, "client_principal", None) is not None
                or b"token" in args
                or b"ticket" in args
            )
            principal = authenticate(gw, request, streaming=True) if presented else None
            if presented and principal is None:
                raise GatewayError("unauthorized", "a valid token is required")
            upgrade = (request.getHeader(b"upgrade") or b"").lower()
            if upgrade != b"websocket":
                request.setHeader(b"upgrade", b"websocket")
                raise GatewayError("invalid_request", "this path speaks WebSocket only", status=426)
            if not any(p in SERIALIZERS for p in offered_protocols(request)):
                offer = ", ".join(SERIALIZERS)
                raise GatewayError("invalid_request", f"offer a WAMP subprotocol: {offer}")
        except GatewayError as e:
            return render_error(request, e)
        channel = request.channel  # type: ignore[attr-defined]
        transport = channel.transport
        if transport is None or getattr(request, "_disconnected", False):
            return NOT_DONE_YET
        proto = factory.buildProtocol(transport.getPeer())
        proto.peer_host = str(getattr(request.getClientAddress(), "host", "") or "")
        if principal is not None:
            try:
                proto.handle = gw.streams.open(principal, "websocket", proto.closed_by_registry)
            except GatewayError as e:
                return render_error(request, e)
            proto.principal = principal
        factory.live.add(proto)
        _take_over(request, channel, transport, cast(Any, proto))
        return NOT_DONE_YET


def mount(gw: Gateway, fixed: dict[bytes, Any]) -> WampFactory:
    """Add ``/wamp`` to the root's fixed paths; its ``going_away`` is a stopping hook."""
    factory = WampFactory(gw)
    _factories[id(gw)] = factory
    fixed[b"/wamp"] = WampEndpoint(factory)
    return factory


def factory_for(gw: Gateway) -> WampFactory | None:
    """The gateway's WAMP factory (its open connections), once the site is built."""
    factory = _factories.get(id(gw))
    return factory if factory is not None and factory.gw is gw else None


_factories: weakref.WeakValueDictionary[int, WampFactory] = weakref.WeakValueDictionary()
