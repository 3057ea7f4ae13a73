"""The Klein REST app, generated from :data:`gatewayd.web.routes.ROUTES`.

Every route is the same thin adapter: credentials, then the JSON body (or the query string
for GET/DELETE) and the path parameters become the operation's parameters, and the result
(or the GatewayError) is rendered.  Unknown paths are 404, known paths with another method
405, both in the contract's error shape.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed, NotFound

from gatewayd import ops
from gatewayd.errors import GatewayError
from gatewayd.web.common import (
    as_gateway_error,
    authenticate,
    query_args,
    read_json_object,
    render_error,
    write_json,
)
from gatewayd.web.routes import ROUTES, Route

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()

#: extra routes other modules mount on the app: (path, methods, handler-factory)
Mount = Callable[["Gateway", Klein], None]


def call_route(gw: Gateway, route: Route, request: IRequest, path_params: dict[str, Any]) -> Any:
    """Run one REST route; returns bytes or a Deferred of bytes."""
    try:
        principal = None if route.public else authenticate(gw, request)
        if route.method in ("GET", "DELETE"):
            raw: dict[str, Any] = dict(query_args(request))
            from_text = True
        else:
            raw = read_json_object(request)
            from_text = False
        raw.update(path_params)
        if route.public:
            principal = gw.anonymous
    except GatewayError as e:
        return render_error(request, e)
    op = ops.OPERATIONS[route.op]
    d = ops.call(gw, route.op, principal, raw, from_text=from_text, peer=_peer(request))

    def done(result: Any) -> bytes:
        if op.status == 204:
            request.setResponseCode(204)
            return b""
        return write_json(request, op.status, result)

    def failed(failure: Failure) -> bytes | None:
        if failure.check(CancelledError):
            return None  # the client went away; nothing to write
        return render_error(request, as_gateway_error(failure, route.template))

    d.addCallbacks(done, failed)
    return d


def _peer(request: IRequest) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", "") or "")


def build_app(gw: Gateway, routes: Iterable[Route] = ROUTES, mounts: Iterable[Mount] = ()) -> Klein:
    """Klein serves the rows with ``<params>``; fixed paths go through :func:`static_routes`."""
    app = Klein()
    for route in routes:
        if "<" not in route.path:
            continue  # the root answers these from its dict, before Klein

        def handler(request: IRequest, _route: Route = route, **kw: Any) -> Any:
            return call_route(gw, _route, request, kw)

        app.route(
            route.path,
            methods=[route.method],
            branch=False,
            endpoint=f"{route.method} {route.path}",
        )(handler)

    for mount in mounts:
        mount(gw, app)

    @app.handle_errors(NotFound)
    def not_found(request: IRequest, failure: Failure) -> bytes:
        return render_error(request, GatewayError("not_found", "no such route"))

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(request: IRequest, failure: Failure) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        error = GatewayError(
            "method_not_allowed",
            "this path does not serve that method",
            data={"allow": ", ".join(sorted(set(allowed)))},
        )
        return render_error(request, error)

    @app.handle_errors(Exception)
    def crashed(request: IRequest, failure: Failure) -> bytes | Deferred[Any] | None:
        if failure.check(CancelledError):
            return None
        return render_error(request, as_gateway_error(failure, "route"))

    return app


class StaticRoute(Resource):
    """The routes of one fixed path (no parameters), served without Klein's routing.

    Klein's matching halves throughput (DESIGN, performance facts); fixed paths such as
    ``/api/chat`` are looked up in a dict by the root instead, and answer exactly as the
    Klein-served routes do.
    """

    isLeaf = True

    def __init__(self, gw: Gateway, routes: Iterable[Route]) -> None:
        super().__init__()
        self._gw = gw
        self._by_method = {r.method.encode(): r for r in routes}
        self._allow = ", ".join(sorted(r.method for r in self._by_method.values()))

    def render(self, request: IRequest) -> bytes | int:
        route = self._by_method.get(request.method)
        if route is None:
            return render_error(
                request,
                GatewayError(
                    "method_not_allowed",
                    "this path does not serve that method",
                    data={"allow": self._allow},
                ),
            )
        result = call_route(self._gw, route, request, {})
        if isinstance(result, bytes):
            return result
        return _finish_later(request, result)


def _finish_later(request: IRequest, d: Deferred[Any]) -> int:
    gone = request.notifyFinish()  # type: ignore[attr-defined]
    gone.addErrback(lambda _: d.cancel())

    def write(body: bytes | None) -> None:
        if getattr(request, "_disconnected", False) or getattr(request, "finished", False):
            return
        if body:
            request.write(body)
        request.finish()

    d.addCallback(write)
    d.addErrback(lambda f: None if f.check(CancelledError) else _log.failure("route", f))
    return NOT_DONE_YET


def static_routes(gw: Gateway, routes: Iterable[Route] = ROUTES) -> dict[bytes, Resource]:
    """A resource per fixed path (those without ``<params>``), for the root's fast lookup."""
    fixed: dict[str, list[Route]] = defaultdict(list)
    for route in routes:
        if "<" not in route.path:
            fixed[route.path].append(route)
    return {path.encode(): StaticRoute(gw, group) for path, group in fixed.items()}
