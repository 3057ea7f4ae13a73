"""``/admin/*``: answered only to this host, with no token.

A request is local when the TCP peer is a loopback address (or a UNIX socket) **and** the
``Host`` header names a loopback address (``127.0.0.1``, ``localhost`` or ``[::1]``, any
port).  The peer check is the socket's own address: ``X-Forwarded-For`` is never read here,
so a reverse proxy on the same host cannot lend its loopback address to remote clients, and
the ``Host`` check defeats DNS rebinding.  A browser page of another origin cannot use these
routes either: a request with a non-loopback ``Origin`` or ``Sec-Fetch-Site: cross-site`` is
refused.  Everything else is 403, and the refusal is audited (at most once a minute per
address, so probing cannot flood the trail).

- ``GET /admin/paircode[?role=&name=]`` → 201 ``{code, expires_at}``, as
  ``POST /api/devices/pair``.
- ``POST /admin/shutdown`` → 202 ``{status: "shutting_down", grace_s}``, then the process
  stops as on SIGTERM (``gatewayd.ops.maintenance.request_shutdown``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.address import UNIXAddress
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from gatewayd.auth import Principal
from gatewayd.config import ROLES
from gatewayd.errors import GatewayError
from gatewayd.web.common import authenticate, query_args, render_error, write_json
from gatewayd.web.cors import parse_origin

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_LOOPBACK_HOST = re.compile(r"(?:localhost|127\.0\.0\.1|\[::1\])(?::\d{1,5})?", re.IGNORECASE)
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
LOOPBACK = Principal(token_id="loopback", role="admin", name="loopback", kind="loopback")
_DENIAL_AUDIT_EVERY_S = 60.0


def peer_is_loopback(peer: Any) -> bool:
    if isinstance(peer, UNIXAddress):
        return True
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def tcp_peer(request: IRequest) -> Any:
    """The socket's peer, never a forwarded address."""
    channel = getattr(request, "channel", None)
    if channel is not None and channel.transport is not None:
        return channel.getPeer()
    return getattr(request, "client", None)


def is_local(request: IRequest) -> bool:
    """Loopback peer, loopback ``Host``, and no sign of a cross-site browser request."""
    if not peer_is_loopback(tcp_peer(request)):
        return False
    host = request.getHeader(b"host")
    if host is None or not _LOOPBACK_HOST.fullmatch(host.decode("latin-1")):
        return False
    origin = request.getHeader(b"origin")
    if origin is not None:
        parsed = parse_origin(origin.decode("latin-1"))
        if parsed is None or parsed[1] not in _LOOPBACK_NAMES:
            return False
    return bool(request.getHeader(b"sec-fetch-site") != b"cross-site")


class AdminResource(Resource):
    """The loopback gate and method check; subclasses answer ``answer(request, actor)``."""

    isLeaf = True
    method = b"GET"
    action = "admin"

    def __init__(self, gw: Gateway) -> None:
        super().__init__()
        self._gw = gw
        self._denials: dict[str, float] = {}

    def render(self, request: IRequest) -> bytes | int:
        if not is_local(request):
            self._audit_denial(request)
            return render_error(
                request, GatewayError("forbidden", "/admin is answered only on loopback")
            )
        if request.method != self.method and not (
            self.method == b"GET" and request.method == b"HEAD"
        ):
            return render_error(
                request,
                GatewayError(
                    "method_not_allowed",
                    "this path does not serve that method",
                    data={"allow": self.method.decode()},
                ),
            )
        try:
            principal = authenticate(self._gw, request)
            return self.answer(request, principal or LOOPBACK)
        except GatewayError as e:
            return render_error(request, e)

    def answer(self, request: IRequest, actor: Principal) -> bytes:
        raise NotImplementedError

    def _audit_denial(self, request: IRequest) -> None:
        peer = str(getattr(tcp_peer(request), "host", "") or "")
        now = self._gw.clock.seconds()
        last = self._denials.get(peer)
        if last is not None and now - last < _DENIAL_AUDIT_EVERY_S:
            return
        if len(self._denials) > 10_000:
            self._denials.clear()
        self._denials[peer] = now
        self._gw.audit(None, "admin.denied", request.path.decode("latin-1"), peer=peer)


class PaircodeResource(AdminResource):
    method = b"GET"

    def answer(self, request: IRequest, actor: Principal) -> bytes:
        from gatewayd.ops.devices import issue_code

        args = query_args(request)
        role = args.get("role", "operator")
        if role not in ROLES:
            raise GatewayError("invalid_request", f"role: must be one of {', '.join(ROLES)}")
        name = args.get("name", "")
        if len(name) > 128:
            raise GatewayError("invalid_request", "name: longer than 128")
        return write_json(request, 201, issue_code(self._gw, actor, role, name))


class ShutdownResource(AdminResource):
    method = b"POST"

    def __init__(self, gw: Gateway, stop: Callable[[], None] | None = None) -> None:
        super().__init__(gw)
        #: what stops the process; tests replace it
        self.stop = stop

    def answer(self, request: IRequest, actor: Principal) -> bytes:
        gw = self._gw
        if self.stop is None:
            from gatewayd.ops.maintenance import request_shutdown

            request_shutdown(gw, actor, "/admin/shutdown")  # audited; 503 if it cannot stop
        else:
            gw.audit(actor, "shutdown", "/admin/shutdown")
            gw.reactor.callLater(0, self.stop)  # after this answer has been written
        grace = gw.config.gateway.shutdown_grace_s
        return write_json(request, 202, {"status": "shutting_down", "grace_s": grace})


def admin_resources(gw: Gateway) -> dict[bytes, Resource]:
    """The fixed paths the root dispatches before Klein."""
    return {b"/admin/paircode": PaircodeResource(gw), b"/admin/shutdown": ShutdownResource(gw)}
