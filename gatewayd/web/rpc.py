"""JSON-RPC 2.0 over the operations table: one dispatcher for WebSocket, ``POST /rpc`` and WAMP.

Every operation in :data:`gatewayd.ops.OPERATIONS` is a method of the same name, with the
same scope and parameter checks, so a new operation needs no change here.  A transport that
keeps state per connection (the WebSocket's event subscription) passes ``local`` methods;
they are authorized and validated through the table entry of the same name first.

Errors: -32700 parse error, -32600 invalid request, -32601 unknown method, -32602 invalid
params (a GatewayError ``invalid_request``), -32603 internal, and -32000 for every other
GatewayError with ``error.data.code`` set to its REST code (plus ``retry_after`` and the
error's own data, such as the ``run_id`` of an aborted run).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gatewayd import jsontext, ops
from gatewayd.auth import Principal
from gatewayd.errors import GatewayError
from gatewayd.web.common import authenticate, render_error, write_json

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000
#: more requests than this in one batch is refused whole (-32600)
MAX_BATCH = 100

Notify = Callable[[str, dict[str, Any]], None]
#: a connection's own method: validated params -> result
LocalMethod = Callable[[dict[str, Any]], Awaitable[Any]]


@attrs.frozen
class RpcContext:
    """Who calls, over what, and where ``chat.event`` notifications go."""

    gateway: Gateway
    principal: Principal
    transport: str = "jsonrpc"
    notify: Notify | None = None
    peer: str = ""
    local: Mapping[str, LocalMethod] = attrs.field(factory=dict)
    #: parameter values used when a method declares the parameter and the call omits it
    defaults: Mapping[str, Any] = attrs.field(factory=dict)


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def error_response(rid: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": error}


def from_gateway_error(e: GatewayError) -> RpcError:
    if e.code == "invalid_request":
        return RpcError(INVALID_PARAMS, e.message, {"code": e.code})
    data: dict[str, Any] = {**e.data, "code": e.code}
    if e.retry_after is not None:
        data["retry_after"] = e.retry_after
    return RpcError(SERVER_ERROR, e.message, data)


def parse(payload: bytes | str) -> Any:
    """The decoded message; RpcError(-32700) when it is not JSON (or not UTF-8)."""
    try:
        return jsontext.loads(payload)
    except jsontext.InvalidJSON as e:
        raise RpcError(PARSE_ERROR, f"parse error: {e.msg}") from None


def handle_payload(ctx: RpcContext, payload: bytes | str) -> Deferred[Any]:
    """Parse and dispatch one message; fires with the response (None: nothing to send)."""
    try:
        message = parse(payload)
    except RpcError as e:
        d: Deferred[Any] = Deferred()
        d.callback(error_response(None, e.code, e.message))
        return d
    return dispatch(ctx, message)


def dispatch(ctx: RpcContext, message: Any) -> Deferred[Any]:
    """A single request or a batch; fires with the response object, list, or None."""
    if isinstance(message, list):
        return ensureDeferred(_batch(ctx, message))
    return ensureDeferred(_one(ctx, message))


async def _batch(ctx: RpcContext, batch: list[Any]) -> Any:
    if not batch:
        return error_response(None, INVALID_REQUEST, "invalid request: empty batch")
    if len(batch) > MAX_BATCH:
        return error_response(
            None, INVALID_REQUEST, f"invalid request: a batch may hold at most {MAX_BATCH} requests"
        )
    results = await DeferredList(
        [ensureDeferred(_one(ctx, item)) for item in batch], consumeErrors=True
    )
    out = []
    for ok, value in results:
        if not ok:  # _one never fails; keep the batch answerable if it ever does
            out.append(error_response(None, INTERNAL_ERROR, "internal error"))
        elif value is not None:
            out.append(value)
    return out or None


def _valid_id(rid: Any) -> bool:
    return (
        rid is None
        or isinstance(rid, str)
        or (isinstance(rid, int | float) and not isinstance(rid, bool))
    )


async def _one(ctx: RpcContext, request: Any) -> dict[str, Any] | None:
    if not isinstance(request, dict):
        return error_response(None, INVALID_REQUEST, "invalid request: not an object")
    notification = "id" not in request
    rid = request.get("id")
    if not _valid_id(rid):
        return error_response(None, INVALID_REQUEST, "invalid request: bad id")
    if request.get("jsonrpc") != "2.0":
        return error_response(rid, INVALID_REQUEST, 'invalid request: jsonrpc must be "2.0"')
    method = request.get("method")
    if not isinstance(method, str) or not method:
        return error_response(rid, INVALID_REQUEST, "invalid request: method is required")
    params = request.get("params")
    if isinstance(params, list):
        return error_response(rid, INVALID_PARAMS, "params must be an object (by name)")
    if params is not None and not isinstance(params, dict):
        return error_response(rid, INVALID_REQUEST, "invalid request: params must be an object")
    try:
        result = await call(ctx, method, params or {})
    except RpcError as e:
        return None if notification else error_response(rid, e.code, e.message, e.data)
    if notification:
        return None
    return {"jsonrpc": "2.0", "id": rid, "result": result}


async def call(ctx: RpcContext, method: str, params: dict[str, Any]) -> Any:
    """Run one method; every failure comes out as an RpcError."""
    op = ops.OPERATIONS.get(method)
    local = ctx.local.get(method)
    if op is None and local is None:
        raise RpcError(METHOD_NOT_FOUND, f"method not found: {method}")
    if ctx.defaults and op is not None:
        params = _with_defaults(op, params, ctx.defaults)
    try:
        if local is not None:
            if op is not None:
                ops.authorize(op, ctx.principal)
                params = op.validate(params)
            return await local(params)
        return await ops.call(
            ctx.gateway,
            method,
            ctx.principal,
            params,
            transport=ctx.transport,
            notify=ctx.notify,
            peer=ctx.peer,
        )
    except GatewayError as e:
        raise from_gateway_error(e) from None
    except RpcError:
        raise
    except Exception:
        _log.failure("JSON-RPC method {method} failed", method=method)
        raise RpcError(INTERNAL_ERROR, "internal error") from None


def _with_defaults(
    op: ops.Operation, params: dict[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    out = params
    for p in op.params:
        if p.name in defaults and not any(params.get(k) is not None for k in (p.name, *p.aliases)):
            if out is params:
                out = dict(params)
            out[p.name] = defaults[p.name]
    return out


class RpcResource(Resource):
    """``POST /rpc``: bearer auth, per-method scope; a batch of notifications only is 204.

    Served in front of Klein so a client that goes away never cancels a run's wait
    (DESIGN trap 11): the answer is simply not written.
    """

    isLeaf = True

    def __init__(self, gw: Gateway) -> None:
        super().__init__()
        self._gw = gw

    def render(self, request: IRequest) -> bytes | int:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return render_error(
                request, GatewayError("method_not_allowed", "this path serves POST only")
            )
        principal = authenticate(self._gw, request)
        if principal is None:
            return render_error(
                request, GatewayError("unauthorized", "a valid bearer token is required")
            )
        content = request.content
        raw = content.read() if content is not None else b""
        peer = getattr(request.getClientAddress(), "host", "") or ""
        ctx = RpcContext(self._gw, principal, transport="http-rpc", peer=str(peer))
        gone: list[bool] = []
        finished: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addBoth(lambda _: gone.append(True))

        def answer(response: Any) -> None:
            if gone:
                return
            if response is None:
                request.setResponseCode(204)
            else:
                body = write_json(request, 200, response)
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
            request.finish()

        def crashed(f: Failure) -> None:
            _log.failure("POST /rpc failed", f)
            answer(error_response(None, INTERNAL_ERROR, "internal error"))

        handle_payload(ctx, raw).addCallback(answer).addErrback(crashed)
        return NOT_DONE_YET
