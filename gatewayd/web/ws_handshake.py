"""The HTTP half of a WebSocket handshake: Origin, credentials, ownership, then the takeover.

Everything here is decided before the upgrade, so each refusal is an ordinary HTTP answer in
the contract's error shape (Autobahn's own Origin check would answer 400, DESIGN trap 10):
a foreign ``Origin`` is 403, missing credentials 401, another owner's ``/ws/chat`` session
404, a token over its stream cap 429.  Only then is the transport handed to the protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import ensureDeferred
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gatewayd import ops
from gatewayd.auth import Principal
from gatewayd.errors import GatewayError, invalid
from gatewayd.web import cors
from gatewayd.web.common import as_gateway_error, authenticate, query_args, render_error

if TYPE_CHECKING:
    from gatewayd.core import Gateway
    from gatewayd.web.ws import GatewayWsFactory, GatewayWsProtocol

TYPED, JSONRPC = "gatewayd.v1", "gatewayd.jsonrpc"
SUBPROTOCOLS = (TYPED, JSONRPC)


def origin_allowed(gw: Gateway, request: IRequest) -> bool:
    """The one Origin rule, shared with CORS (:func:`gatewayd.web.cors.origin_allowed`)."""
    return cors.origin_allowed(gw, request.getHeader(b"origin"), request.getHeader(b"host"))


def offered_protocols(request: IRequest) -> list[str]:
    values = request.requestHeaders.getRawHeaders(b"sec-websocket-protocol") or []
    out: list[str] = []
    for value in values:
        out.extend(p.strip() for p in value.decode("latin-1").split(",") if p.strip())
    return out


def credentials(gw: Gateway, request: IRequest) -> Principal | None:
    """Header, ``?token=``, ``?ticket=`` (first present decides), else ``bearer.<token>``.

    The subprotocol counts only beside ``gatewayd.v1`` or ``gatewayd.jsonrpc``.
    """
    args = request.args or {}
    presented = (
        request.getHeader(b"authorization") is not None
        or getattr(request, "client_principal", None) is not None
        or b"token" in args
        or b"ticket" in args
    )
    if presented:
        return authenticate(gw, request, streaming=True)
    protocols = offered_protocols(request)
    if not any(p in SUBPROTOCOLS for p in protocols):
        return None
    for p in protocols:
        if p.startswith("bearer."):
            return gw.tokens.authenticate(p[len("bearer.") :])
    return None


class WebSocketEndpoint(Resource):
    """``/ws`` (``bound=False``) or ``/ws/chat?session_id=`` (``bound=True``)."""

    isLeaf = True

    def __init__(self, factory: GatewayWsFactory, *, bound: bool = False) -> None:
        super().__init__()
        self._factory = factory
        self._bound = bound

    def render(self, request: IRequest) -> bytes | int:
        gw = self._factory.gw
        try:
            if self._factory.closing:
                raise GatewayError("unavailable", "the gateway is shutting down")
            if request.method != b"GET":
                request.setHeader(b"allow", b"GET")
                raise GatewayError("method_not_allowed", "a WebSocket handshake is a GET")
            if not origin_allowed(gw, request):
                raise GatewayError("forbidden", "this Origin may not open a WebSocket here")
            principal = credentials(gw, request)
            if principal is None:
                raise GatewayError("unauthorized", "a valid token is required")
            upgrade = (request.getHeader(b"upgrade") or b"").lower()
            if upgrade != b"websocket":
                request.setHeader(b"upgrade", b"websocket")
                raise GatewayError("invalid_request", "this path speaks WebSocket only", status=426)
            session_id = None
            if self._bound:
                session_id = query_args(request).get("session_id") or ""
                if not ops.ID_RE.fullmatch(session_id):
                    raise invalid("session_id: required, [A-Za-z0-9._:-]{1,128}")
        except GatewayError as e:
            return render_error(request, e)
        if session_id is None:
            return self._upgrade(request, principal, None)
        d = ensureDeferred(self._check_session(principal, session_id))
        d.addCallback(lambda _: self._upgrade(request, principal, session_id))
        d.addErrback(self._refused, request)
        return NOT_DONE_YET

    async def _check_session(self, principal: Principal, session_id: str) -> None:
        session = await self._factory.gw.store.get_session(session_id)
        if session is not None and not principal.owns(session.owner):
            raise GatewayError("not_found", "no such session")

    def _refused(self, failure: Failure, request: IRequest) -> None:
        if not getattr(request, "_disconnected", False):
            _answer(request, as_gateway_error(failure, "WebSocket handshake"))

    def _upgrade(self, request: IRequest, principal: Principal, session_id: str | None) -> int:
        channel = request.channel  # type: ignore[attr-defined]
        transport = channel.transport
        if transport is None or getattr(request, "_disconnected", False):
            return NOT_DONE_YET  # gone meanwhile (or HTTP/2: never enabled here, trap 9)
        factory = self._factory
        proto = cast("GatewayWsProtocol", factory.buildProtocol(transport.getPeer()))
        proto.principal = principal
        proto.peer_host = str(getattr(request.getClientAddress(), "host", "") or "")
        if session_id is not None:
            proto.bound_session = session_id
        try:
            proto.handle = factory.gw.streams.open(principal, "websocket", proto.closed_by_registry)
        except GatewayError as e:
            _answer(request, e)
            return NOT_DONE_YET
        factory.live.add(proto)
        _take_over(request, channel, transport, proto)
        return NOT_DONE_YET


def _answer(request: IRequest, error: GatewayError) -> None:
    """A refusal after render returned (the session check), with its length, then done."""
    body = render_error(request, error)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _take_over(request: IRequest, channel: Any, transport: Any, proto: GatewayWsProtocol) -> None:
    """Hand the TCP (or TLS) transport from twisted.web to the WebSocket protocol.

    As Autobahn's WebSocketResource does, plus: the HTTP channel stops being the
    transport's producer (the protocol registers itself once open, to count its backlog),
    and the site forgets the channel, whose connection is now the WebSocket's to close.
    """
    try:
        transport.unregisterProducer()
    except Exception:  # pragma: no cover - a transport without producer support
        pass
    channel.transport = None
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = proto
    elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
        transport.protocol.wrappedProtocol = proto
    else:
        transport.protocol = proto
    proto.makeConnection(transport)
    if hasattr(transport, "resumeProducing"):
        transport.resumeProducing()
    site_closed = getattr(getattr(channel, "site", None), "channel_closed", None)
    if site_closed is not None:
        site_closed(channel)
    data = request.method + b" " + request.uri + b" HTTP/1.1\r\n"
    for name, values in request.requestHeaders.getAllRawHeaders():
        data += name + b": " + b",".join(values) + b"\r\n"
    data += b"\r\n"
    proto.dataReceived(data)
