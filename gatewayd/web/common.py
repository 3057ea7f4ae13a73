"""What every HTTP transport shares: JSON bodies, the error shape, credentials."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from gatewayd import jsontext
from gatewayd.auth import Principal
from gatewayd.errors import GatewayError, invalid

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()
JSON = b"application/json"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def write_json(request: IRequest, status: int, obj: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    request.setHeader(b"cache-control", b"no-store")
    return dumps(obj)


def render_error(request: IRequest, error: GatewayError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", JSON)
    request.setHeader(b"cache-control", b"no-store")
    if error.status == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="gatewayd"')
    if error.retry_after is not None or error.status == 429:
        request.setHeader(b"retry-after", str(max(1, error.retry_after or 1)).encode())
    if error.status == 405 and "allow" in error.data:
        request.setHeader(b"allow", error.data["allow"].encode())
    return dumps(error.to_json())


def as_gateway_error(failure: Failure, what: str = "request") -> GatewayError:
    """Known errors pass through; anything else is logged and becomes a bare 500."""
    if failure.check(GatewayError):
        return failure.value  # type: ignore[return-value]
    _log.failure("unexpected error handling {what}", failure, what=what)
    return GatewayError("internal", "internal error")


def read_json_object(request: IRequest, *, allow_empty: bool = True) -> dict[str, Any]:
    """The body as a JSON object; anything else is 400 invalid_request."""
    content = request.content
    raw = content.read() if content is not None else b""
    if not raw.strip():
        if allow_empty:
            return {}
        raise invalid("a JSON object body is required")
    try:
        body = jsontext.loads(raw)
    except jsontext.InvalidJSON as e:
        raise invalid(f"the body is not valid JSON: {e.msg}") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    return body


def query_args(request: IRequest) -> dict[str, str]:
    """First value of each query parameter, decoded; undecodable input is 400."""
    out: dict[str, str] = {}
    for key, values in (request.args or {}).items():
        try:
            out[key.decode("utf-8")] = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("the query string is not UTF-8") from None
    return out


def bearer(request: IRequest) -> bytes | None:
    """The bearer credential; ``b""`` when another scheme was sent, None when none was."""
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    scheme, _, value = bytes(header).partition(b" ")
    if scheme.lower() != b"bearer":
        return b""
    return value.strip()


#: the bearer header of a request has not been authenticated yet (see ``authenticate``)
NOT_CHECKED = object()


def authenticate(gw: Gateway, request: IRequest, *, streaming: bool = False) -> Principal | None:
    """Credentials, first match wins: bearer header; a client certificate that a
    ``[[gateway.client_certs]]`` rule maps to a role (``GatewayRequest.client_principal``; the
    identity lookup is ``GatewaySite.identify``, injectable); then (streams only) ``?token=``,
    ``?ticket=``."""
    token = bearer(request)
    if token is not None:
        cached = getattr(request, "bearer_principal", NOT_CHECKED)
        if cached is not NOT_CHECKED:  # the rate limiter authenticated this header already
            return cached  # type: ignore[return-value]
        return gw.tokens.authenticate(token)
    identity = getattr(request, "client_principal", None)
    if isinstance(identity, Principal):
        return identity
    if streaming:
        args = request.args or {}
        if b"token" in args:
            return gw.tokens.authenticate(args[b"token"][0])
        if b"ticket" in args:
            return gw.tokens.redeem_ticket(args[b"ticket"][0])
    return None
