"""The operator's fixed paths: /metrics, /ready, the API documents, the daemon log, /api/config.

All are plain leaf resources looked up by the root's dict (no Klein routing on the way).
``/api/config`` needs more than the generic REST adapter gives: an ``ETag`` on reads, the
``If-Match`` header and ``?dry_run=1`` on patches, and a TOML text body for ``PUT``; each still
goes through the operations table (scope checks and parameter validation included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gatewayd import ops
from gatewayd.config_api import MAX_TOML_BYTES, if_match_header
from gatewayd.errors import GatewayError, invalid
from gatewayd.logs import DaemonLogsResource
from gatewayd.metrics import MetricsResource
from gatewayd.web.common import (
    as_gateway_error,
    authenticate,
    query_args,
    read_json_object,
    render_error,
    write_json,
)

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()


def operations_resources(gw: Gateway) -> dict[bytes, Resource]:
    from gatewayd.web.openapi import DocumentResource, asyncapi_document, openapi_document

    config = ConfigResource(gw)
    return {
        b"/metrics": MetricsResource(gw),
        b"/ready": ReadyResource(gw),
        b"/api/openapi.json": DocumentResource(lambda: openapi_document()),
        b"/api/asyncapi.json": DocumentResource(lambda: asyncapi_document()),
        b"/api/daemon/logs": DaemonLogsResource(gw),
        b"/api/config": config,
        b"/api/config/patch": config,
        b"/api/config/apply": config,
    }


def _method_not_allowed(request: IRequest, allow: str) -> bytes:
    return render_error(
        request,
        GatewayError("method_not_allowed", f"this path serves {allow} only", data={"allow": allow}),
    )


def _respond(request: IRequest, d: Deferred[Any], done: Any) -> bytes | int:
    """Write ``done(result)`` or the error; synchronously when the Deferred already fired."""
    out: list[bytes] = []

    def ok(result: Any) -> None:
        out.append(done(result))

    def failed(failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        out.append(render_error(request, as_gateway_error(failure, request.path.decode())))

    d.addCallbacks(ok, failed)
    if out:
        return out[0]
    if d.called:  # cancelled
        return b""

    def later(_: Any) -> None:
        if (
            out
            and not getattr(request, "_disconnected", False)
            and not getattr(request, "finished", False)
        ):
            request.write(out[0])
            request.finish()

    d.addBoth(later)
    return NOT_DONE_YET


# -- /ready -------------------------------------------------------------------------------------


class ReadyResource(Resource):
    """``GET /ready``: 200 when the store, the event bus and the provider answer; else 503
    naming what fails.  Public and never rate limited (load balancers poll it)."""

    isLeaf = True

    def __init__(self, gw: Gateway) -> None:
        super().__init__()
        self._gw = gw

    def render(self, request: IRequest) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            return _method_not_allowed(request, "GET, HEAD")
        from gatewayd.ops.maintenance import readiness

        def done(checks: dict[str, str]) -> bytes:
            failing = [name for name, state in checks.items() if state != "ok"]
            if failing:
                return write_json(
                    request,
                    503,
                    {"status": "unavailable", "checks": checks, "failing": failing},
                )
            return write_json(request, 200, {"status": "ready", "checks": checks})

        return _respond(request, ensureDeferred(readiness(self._gw)), done)


# -- /api/config ---------------------------------------------------------------------------------


class ConfigResource(Resource):
    """``GET``/``PUT /api/config``, ``POST /api/config/patch``, ``POST /api/config/apply``."""

    isLeaf = True

    def __init__(self, gw: Gateway) -> None:
        super().__init__()
        self._gw = gw

    def render(self, request: IRequest) -> bytes | int:
        path, method = request.path, request.method
        if path == b"/api/config":
            allow, handler = "GET, PUT", {b"GET": self._get, b"PUT": self._put}.get(method)
        elif path == b"/api/config/patch":
            allow, handler = "POST", self._patch if method == b"POST" else None
        else:
            allow, handler = "POST", self._apply if method == b"POST" else None
        if handler is None:
            return _method_not_allowed(request, allow)
        try:
            principal = authenticate(self._gw, request)
            name, params = handler(request)
        except GatewayError as e:
            return render_error(request, e)
        d = ops.call(self._gw, name, principal, params, peer=_peer(request))
        return _respond(request, d, lambda result: self._answer(request, name, result))

    def _answer(self, request: IRequest, name: str, result: dict[str, Any]) -> bytes:
        if name == "config.get":
            request.setHeader(b"etag", result["etag"].encode())
            return write_json(request, 200, result["config"])
        if not result.get("dry_run"):
            from gatewayd.config_api import current_etag

            request.setHeader(b"etag", current_etag(self._gw).encode())
        return write_json(request, 200, result)

    def _get(self, request: IRequest) -> tuple[str, dict[str, Any]]:
        return "config.get", {}

    def _patch(self, request: IRequest) -> tuple[str, dict[str, Any]]:
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type and content_type not in (
            b"application/merge-patch+json",
            b"application/json",
        ):
            raise invalid("Content-Type: send application/merge-patch+json or application/json")
        patch = read_json_object(request, allow_empty=False)
        return "config.patch", {
            "patch": patch,
            "if_match": if_match_header(request),
            "dry_run": _flag(query_args(request).get("dry_run")),
        }

    def _put(self, request: IRequest) -> tuple[str, dict[str, Any]]:
        content = request.content
        raw = content.read(MAX_TOML_BYTES + 1) if content is not None else b""
        if len(raw) > MAX_TOML_BYTES:
            raise GatewayError("payload_too_large", "a config file is at most 1 MiB")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("the config is not UTF-8") from None
        return "config.set", {"toml": text, "if_match": if_match_header(request)}

    def _apply(self, request: IRequest) -> tuple[str, dict[str, Any]]:
        read_json_object(request)  # an empty body or {}; anything else is a mistake
        return "config.apply", {}


def _flag(value: str | None) -> bool:
    if value is None or value == "":
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise invalid("dry_run: expected 1 or 0")


def _peer(request: IRequest) -> str:
    return str(getattr(request.getClientAddress(), "host", "") or "")
