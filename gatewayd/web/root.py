"""The root resource: hot fixed paths on plain resources, everything else through Klein.

Klein's routing halves throughput (DESIGN, performance facts), so ``/health`` never touches
it.  The root is a leaf: it dispatches on the whole path itself instead of letting
``Site.getResourceFor`` walk children.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from gatewayd.errors import GatewayError
from gatewayd.schedule import rfc3339
from gatewayd.web.common import dumps, render_error

if TYPE_CHECKING:
    from gatewayd.core import Gateway


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, gw: Gateway) -> None:
        super().__init__()
        self._gw = gw
        self._second = -1
        self._body = b""

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return render_error(
                request, GatewayError("method_not_allowed", "this path serves GET only")
            )
        now = int(self._gw.clock.seconds())
        if now != self._second:
            self._second = now
            self._body = dumps({"status": "ok", "timestamp": rfc3339(now)})
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return self._body


class RootResource(Resource):
    isLeaf = True

    def __init__(
        self,
        gw: Gateway,
        app: IResource,
        fixed: Mapping[bytes, IResource],
        dashboard: IResource | None = None,
    ) -> None:
        super().__init__()
        self._gw = gw
        self._app = app
        self._fixed = fixed
        self._dashboard = dashboard

    def render(self, request: IRequest) -> bytes | int:
        path = request.path
        target = self._fixed.get(path)
        if (
            target is None
            and self._dashboard is not None
            and (path in (b"/", b"/app") or path.startswith(b"/app/"))
        ):
            target = self._dashboard
        if target is not None:
            return target.render(request)  # type: ignore[no-any-return]
        return self._app.render(request)  # type: ignore[no-any-return]
