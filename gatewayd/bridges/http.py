"""The bridges' outbound HTTP: one pool, bounded calls, errors with secrets scrubbed."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss

#: the most of a platform's answer the bridges read (they need only its status and a field)
MAX_ANSWER_BYTES = 1 << 20


class DeliveryError(Exception):
    """A message could not be delivered. The text is safe to show: secrets are scrubbed."""


def scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@attrs.frozen
class Response:
    code: int
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):
            return None


class _Collect(Protocol):
    """Collect a response body; cancelling (a timeout, a stop) hangs up the connection."""

    def __init__(self, limit: int) -> None:
        self.done: Deferred[bytes] = Deferred(self._cancel)
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.done.errback(DeliveryError(f"the answer is over {self._limit} bytes"))
            self._hang_up()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._hang_up()

    def _hang_up(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


class _Pool(HTTPConnectionPool):
    """Once closed, connections that finish late are hung up instead of cached."""

    closed = False

    def _putConnection(self, key: Any, connection: Any) -> None:
        if self.closed:
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)


class BridgeHTTP:
    """The bridges' own outbound client: one persistent pool, closed when the bridges stop.

    Each call is bounded by ``timeout_s`` (request and body together), never follows
    redirects (a signed body or a token-bearing URL must not wander), and reports failures as
    :class:`DeliveryError` with every given secret scrubbed from the text.
    """

    def __init__(
        self, reactor: Any, *, timeout_s: float = 15.0, connect_timeout_s: float = 10.0
    ) -> None:
        self._reactor = reactor
        self.timeout_s = timeout_s
        self._pool = _Pool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        agent = Agent(reactor, connectTimeout=connect_timeout_s, pool=self._pool)
        self._client = HTTPClient(agent)
        self._inflight: set[Deferred[Any]] = set()
        self.closed = False

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        what: str,
        secrets: Sequence[str] = (),
    ) -> Response:
        if self.closed:
            raise DeliveryError(f"{what}: the bridge is stopped")
        request_headers: dict[bytes | str, list[bytes | str]] = {k: [v] for k, v in headers.items()}
        d: Deferred[Any] = self._client.request(
            "POST", url, data=body, headers=request_headers, allow_redirects=False
        )

        def got(resp: Any) -> Deferred[Response]:
            collector = _Collect(MAX_ANSWER_BYTES)
            resp.deliverBody(collector)
            return collector.done.addCallback(lambda data: Response(resp.code, data))

        d.addCallback(got)
        expired = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self._reactor.callLater(self.timeout_s, expire)
        self._inflight.add(d)
        try:
            result: Response = await d
            return result
        except Exception as e:
            # cancelling may surface as CancelledError or wrapped in ResponseNeverReceived
            if expired:
                raise DeliveryError(f"{what}: no answer within {self.timeout_s:g}s") from None
            if self.closed or isinstance(e, CancelledError):
                raise DeliveryError(f"{what}: cancelled, the bridge stopped") from None
            detail = scrub(f"{type(e).__name__}: {e}", secrets)[:300]
            raise DeliveryError(f"{what}: {detail}") from None
        finally:
            self._inflight.discard(d)
            if timer.active():
                timer.cancel()

    def cancel_inflight(self) -> None:
        for d in list(self._inflight):
            d.cancel()

    def close(self) -> Deferred[None]:
        """Refuse new calls, cancel the ones in flight, hang up the pooled connections."""
        self.closed = True
        self._pool.closed = True
        self.cancel_inflight()
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d
