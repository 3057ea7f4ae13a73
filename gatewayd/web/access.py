"""The access log: one JSON line per request in ``gatewayd.log``, cheap enough for every one.

Through the log publisher, each line was formatted by every observer (also as text for
standard output) and cost a sixth of a chat request's time in the reactor.  Here the line
goes straight to the log file (:meth:`gatewayd.logs.FileLog.write_event`) in the shape the
JSON observer writes, so ``/api/daemon/logs`` and log tools see no difference; the journal
keeps the operational messages.  Without a log file (an embedded gateway, unit tests) the
lines go to the log publisher as before.  A token in a query string is never recorded.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

if TYPE_CHECKING:
    from gatewayd.core import Gateway

NAMESPACE = "gatewayd.access"
_publisher = Logger(namespace=NAMESPACE)
#: liveness and readiness probes would drown the log (and cost a third of their speed)
_UNLOGGED = frozenset({b"/health", b"/ready", b"/api/health"})
_SECRET_QUERY = re.compile(rb"([?&](?:token|ticket|api_key|key)=)[^&#]*", re.IGNORECASE)
_REQUEST = "{method} {uri} {status} {length}"
_REFUSED = "{method} {uri} {status} refused: {reason}"


def redact_uri(uri: bytes) -> str:
    return _SECRET_QUERY.sub(rb"\1***", uri).decode("utf-8", "replace")


class AccessLog:
    def __init__(self, gateway: Gateway | None) -> None:
        self._gateway = gateway

    def request(self, request: Any) -> None:
        """A request that got an answer."""
        if request.path in _UNLOGGED:
            return
        self._write(
            _REQUEST,
            method=request.method.decode("ascii", "replace"),
            uri=redact_uri(request.uri),
            status=request.code,
            length=getattr(request, "sentLength", 0),
            peer=getattr(request.getClientAddress(), "host", ""),
        )

    def refused(self, channel: Any, status: int, reason: str) -> None:
        """A request its channel refused before any resource saw it (413, 408, 414, ...)."""
        uri = getattr(channel, "_path", None)
        method = getattr(channel, "_command", None)
        peer = getattr(channel.transport.getPeer(), "host", "") if channel.transport else ""
        self._write(
            _REFUSED,
            method=method.decode("ascii", "replace") if isinstance(method, bytes) else "-",
            uri=redact_uri(uri) if isinstance(uri, bytes) else "-",
            status=status,
            reason=reason,
            peer=peer,
        )

    def _write(self, format: str, **fields: Any) -> None:
        file_log = self._gateway.file_log if self._gateway is not None else None
        if file_log is not None and file_log.write_event(NAMESPACE, format, fields):
            return
        _publisher.info(format, **fields)
