"""The static dashboard at ``/app/``: three files read once at start-up, served from memory.

A fixed table of names (no filesystem lookups per request) leaves no path to traverse.
"""

from __future__ import annotations

import os

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from gatewayd.errors import GatewayError
from gatewayd.web.common import render_error

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_TYPES = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "app.css": b"text/css; charset=utf-8",
}
_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    b"img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def load_files() -> dict[bytes, tuple[bytes, bytes]]:
    files = {}
    for name, ctype in _TYPES.items():
        with open(os.path.join(STATIC, name), "rb") as f:
            files[f"/app/{name}".encode()] = (ctype, f.read())
    files[b"/app/"] = files[b"/app/index.html"]
    return files


class Dashboard(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._files = load_files()

    def render(self, request: IRequest) -> bytes:
        if request.path in (b"/", b"/app"):
            request.setResponseCode(302)
            request.setHeader(b"location", b"/app/")
            return b""
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return render_error(request, GatewayError("method_not_allowed", "GET only"))
        found = self._files.get(request.path)
        if found is None:
            return render_error(request, GatewayError("not_found", "no such file"))
        ctype, body = found
        request.setHeader(b"content-type", ctype)
        request.setHeader(b"content-security-policy", _CSP)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-cache")
        return body
