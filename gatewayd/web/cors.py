"""Origins: one list (``gateway.allowed_origins``) opens CORS and the WebSocket Origin check.

By default no CORS header is ever sent, so browsers keep other sites' pages from reading
answers.  An origin listed in ``allowed_origins`` (``scheme://host[:port]``; ``"*"`` for any)
gets ``Access-Control-Allow-Origin`` and its preflights answered.  Tokens travel in the
``Authorization`` header, never in cookies, so credentials are never allowed.

The WebSocket handshake asks :func:`origin_allowed`: no ``Origin`` (a non-browser client) is
allowed, a browser origin whose host:port equals the ``Host`` header is allowed, and so is
any origin in ``allowed_origins``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import attrs
from twisted.web.iweb import IRequest

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_ORIGIN = re.compile(
    r"(?P<scheme>https?|wss?)://(?P<host>\[[0-9a-f:.]+\]|[^:/\[\]@\s]+)(?::(?P<port>\d{1,5}))?/?",
    re.IGNORECASE,
)
_HOST = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|[^:/\[\]@\s]+)(?::(?P<port>\d{1,5}))?", re.IGNORECASE)
_SECURE = frozenset({"https", "wss"})

ALLOW_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = (
    b"Authorization, Content-Type, If-Match, Last-Event-ID, X-Session-Id, Idempotency-Key"
)
EXPOSE_HEADERS = b"ETag, Retry-After, RateLimit, RateLimit-Policy, X-Request-Id"
MAX_AGE = b"600"

Origin = tuple[str, str, int]


def parse_origin(origin: str) -> Origin | None:
    """``(scheme, host, port)`` of a serialized origin, the port filled in from the scheme."""
    m = _ORIGIN.fullmatch(origin.strip())
    if m is None:
        return None
    scheme = m["scheme"].lower()
    port = int(m["port"]) if m["port"] else (443 if scheme in _SECURE else 80)
    if port > 65535:
        return None
    return scheme, m["host"].lower(), port


@attrs.frozen
class _Allowed:
    any: bool
    origins: frozenset[Origin]
    literal: frozenset[str]


_cache: dict[tuple[str, ...], _Allowed] = {}


def _allowed(entries: tuple[str, ...]) -> _Allowed:
    found = _cache.get(entries)
    if found is None:
        parsed = {parse_origin(e) for e in entries}
        found = _Allowed(
            any="*" in entries,
            origins=frozenset(o for o in parsed if o is not None),
            literal=frozenset(e.strip() for e in entries),
        )
        if len(_cache) > 64:
            _cache.clear()
        _cache[entries] = found
    return found


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def listed(gw: Gateway, origin: str | bytes | None) -> bool:
    """Is this origin named in ``allowed_origins`` (or is ``"*"`` there)?"""
    text = _text(origin)
    entries = gw.config.gateway.allowed_origins
    if not text or not entries:
        return False
    allowed = _allowed(entries)
    if text.strip() in allowed.literal:
        return True
    parsed = parse_origin(text)
    if parsed is None:
        return False
    return allowed.any or parsed in allowed.origins


def origin_allowed(gw: Gateway, origin: str | bytes | None, host: str | bytes | None) -> bool:
    """The WebSocket Origin check (CONTRACT §6, §15)."""
    text = _text(origin)
    if text is None or text == "":
        return True  # not a browser
    parsed = parse_origin(text)
    host_text = _text(host)
    if parsed is not None and host_text:
        m = _HOST.fullmatch(host_text.strip())
        if m is not None:
            # a Host without a port means the default port of the origin's scheme
            port = int(m["port"]) if m["port"] else (443 if parsed[0] in _SECURE else 80)
            if (m["host"].lower(), port) == (parsed[1], parsed[2]):
                return True
    return listed(gw, text)


def apply_cors(gw: Gateway, request: IRequest) -> bool:
    """Add CORS headers for a listed origin; True when this answered a preflight itself."""
    if not gw.config.gateway.allowed_origins:
        return False
    origin = request.getHeader(b"origin")
    if origin is None or not listed(gw, origin):
        return False
    request.setHeader(b"access-control-allow-origin", origin)
    request.setHeader(b"vary", b"Origin")
    if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", ALLOW_METHODS)
        request.setHeader(b"access-control-allow-headers", ALLOW_HEADERS)
        request.setHeader(b"access-control-max-age", MAX_AGE)
        request.setHeader(b"content-length", b"0")
        request.finish()
        return True
    request.setHeader(b"access-control-expose-headers", EXPOSE_HEADERS)
    return False
