"""The HTTP plumbing every remote model provider shares.

One :class:`UpstreamHTTP` per provider owns a persistent treq connection pool and knows the
rules for talking to a model API: a connect timeout, an idle (read) timeout that covers the
wait for headers and every gap in the stream, bounded retries with capped exponential backoff
that honour ``Retry-After`` (429, 5xx, connection failures — only before any byte of a body
reached the caller, so text is never streamed twice), and cancellation that hangs up the
connection.  Every failure comes out as an :class:`UpstreamError` (a ``ProviderError``) whose
message has been scrubbed of the provider's secrets.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import UTC
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from gatewayd.agent.base import ProviderError
from gatewayd.sendnow import send_now

T = TypeVar("T")

_log = Logger()

#: how much of an error body we read to find the upstream's message
ERROR_BODY_LIMIT = 64 * 1024
#: a JSON (non-streamed) answer larger than this is refused (embeddings can be big)
JSON_BODY_LIMIT = 64 * 1024 * 1024
#: once the caller has the whole answer, how long we wait for the body to end properly
#: (so the connection can go back to the pool) before hanging up
_TAIL_GRACE_S = 2.0


@attrs.frozen
class HTTPSettings:
    """The knobs both providers expose, with the contract's defaults."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0
    max_retries: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait before retry number ``attempt + 1``: the upstream's wish, else exponential."""
        delay = retry_after if retry_after is not None else self.backoff_base_s * 2**attempt
        return max(0.0, min(delay, self.backoff_max_s))


class UpstreamError(ProviderError):
    """A provider failure that came from (or on the way to) the upstream HTTP API."""

    def __init__(self, message: str, code: str = "upstream_error", status: int | None = None):
        super().__init__(message, code)
        #: the upstream's HTTP status, when it answered at all
        self.status = status

    def __repr__(self) -> str:
        return f"UpstreamError({self.message!r}, code={self.code!r}, status={self.status!r})"


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(
        self, message: str, code: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retry_after = retry_after

    def final(self, attempts: int) -> UpstreamError:
        tries = "attempt" if attempts == 1 else "attempts"
        return UpstreamError(f"{self.message} ({attempts} {tries})", self.code, self.status)


class _IdleTimeout(Exception):
    pass


@attrs.define
class _Call:
    """Per-call state the canceller shares with the coroutine doing the work."""

    cancelled: bool = False


def parse_retry_after(headers: Any, now: float) -> float | None:
    """Seconds the upstream asked us to wait: ``retry-after-ms``, then ``Retry-After``.

    ``Retry-After`` may be delta-seconds or an HTTP-date (compared with ``now``, the
    reactor's wall clock).  Garbage is ignored rather than trusted.
    """
    raw_ms = _header(headers, "retry-after-ms")
    if raw_ms is not None:
        try:
            ms = float(raw_ms)
        except ValueError:
            ms = -1.0
        if ms >= 0 and ms == ms:  # not NaN
            return ms / 1000.0
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds == seconds else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _header(headers: Any, name: str) -> str | None:
    values = headers.getRawHeaders(name.encode("ascii")) if headers is not None else None
    if not values:
        return None
    value = values[-1]
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return text.strip()


def _header_dict(headers: Mapping[str, str]) -> dict[bytes | str, bytes | str]:
    return {k: v for k, v in headers.items()}


def upstream_message(body: bytes) -> str:
    """The human part of an upstream error body, for the shapes model APIs use.

    OpenAI and Anthropic both say ``{"error": {"message": ...}}``; Ollama and some proxies
    say ``{"error": "..."}`` or ``{"message": ...}``; anything else is shown as short text.
    """
    text = body.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(doc.get("message"), str):
            return str(doc["message"])
        if isinstance(doc.get("detail"), str):
            return str(doc["detail"])
    text = " ".join(text.split())
    if len(text) > 300:
        text = text[:300] + "…"
    return text or "(empty body)"


def _describe(exc: BaseException) -> str:
    """A one-line reason for a connection-level failure, without a traceback."""
    if isinstance(exc, ResponseFailed | RequestTransmissionFailed):
        parts = [
            _describe(f.value)
            for f in exc.reasons
            if isinstance(f, Failure) and f.value is not None
        ]
        return "; ".join(p for p in parts if p) or type(exc).__name__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_connection_failure(exc: BaseException) -> bool:
    return isinstance(
        exc,
        ierror.ConnectError
        | ierror.DNSLookupError
        | ierror.ConnectionLost
        | ierror.ConnectionDone
        | ResponseFailed  # includes ResponseNeverReceived
        | RequestNotSent
        | RequestTransmissionFailed,
    )


def _is_connect_timeout(exc: BaseException) -> bool:
    return isinstance(exc, ierror.TimeoutError | ierror.TCPTimedOutError)


class _BodyReader(Protocol):
    """Deliver a response body to ``on_bytes`` with an idle deadline.

    ``on_bytes`` returns True once it has everything it needs; the reader then gives the
    body a short grace to end cleanly (keeping the connection reusable) and hangs up after.
    If ``on_bytes`` raises, the reader hangs up and reports the error from
    ``connectionLost`` — not from inside ``dataReceived``, where the HTTP parser is still
    mid-response and a caller reacting at once (closing the pool, say) would race it.
    Cancelling :attr:`finished` hangs up at once.
    """

    def __init__(self, reactor: Any, idle_s: float, on_bytes: Callable[[bytes], bool]) -> None:
        self.finished: Deferred[None] = Deferred(self._cancel)
        self.received = 0
        self._idle_s = idle_s
        self._on_bytes = on_bytes
        self._complete = False
        self._cancelled = False
        self._error: Exception | None = None
        self._timer: IDelayedCall | None = reactor.callLater(idle_s, self._idle)

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called or self._complete or self._error is not None:
            return
        self.received += len(data)
        self._reset(self._idle_s)
        try:
            done = self._on_bytes(data)
        except Exception as exc:
            self._error = exc
            self._hang_up()  # connectionLost follows and reports the error
            return
        if done:
            self._complete = True
            self._reset(min(self._idle_s, _TAIL_GRACE_S))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self.finished.called or self._cancelled:
            return
        if self._error is not None:
            self.finished.errback(self._error)
        elif self._complete or isinstance(reason.value, ResponseDone | PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)

    def _idle(self) -> None:
        self._timer = None
        if self._error is not None:
            self._finish(self._error)  # connectionLost never came; do not wait for ever
        else:
            self._finish(None if self._complete else _IdleTimeout())

    def _finish(self, error: Exception | None) -> None:
        """Fire first, hang up second: hanging up may call connectionLost re-entrantly."""
        self._stop_timer()
        if not self.finished.called:
            if error is None:
                self.finished.callback(None)
            else:
                self.finished.errback(error)
        self._hang_up()

    def _cancel(self, _: Deferred[None]) -> None:
        self._cancelled = True
        self._stop_timer()
        self._hang_up()

    def _hang_up(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _reset(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


@implementer(IBodyProducer)
class _BytesBody:
    """A request body written whole, at once.

    treq's default (``FileBodyProducer``) writes on a later reactor turn, through a
    Cooperator; this one writes while the request is being sent, so the head and the body
    leave together, in one segment.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:  # noqa: N802
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


def _body_producer(data: Any) -> Any:
    if isinstance(data, bytes):
        return _BytesBody(data)
    return IBodyProducer(data)


class _URI(EncodedURL):
    """An upstream URL already in URI form (ASCII): treq's ``to_uri()`` on every request
    would only rebuild an equal URL, part by part, so it is the URL itself."""

    def to_uri(self) -> _URI:
        return self


def _parse_url(url: str) -> EncodedURL:
    plain = EncodedURL.from_text(url)
    if plain.to_uri() != plain:
        return plain  # it needs encoding: treq does that on each request
    return _URI.from_text(url)


class _NoCookies(IndexableCookieJar):
    """Model APIs are not browsers: a cookie one run's answer set must not ride along with
    another user's request, so none is kept or sent (treq keeps a jar per client)."""

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Agent's standard endpoints (TCP, TLS for https), made once per origin.

    Agent otherwise builds a new endpoint for every request, although a provider talks to
    one origin all its life; a pooled connection needs no endpoint at all.
    """

    _MAX = 32

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._policy = BrowserLikePolicyForHTTPS()
        self._made: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:  # noqa: N802
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._made.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):  # Agent turns this into a failure
                raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
            tcp = HostnameEndpoint(
                self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._timeout
            )
            endpoint = tcp
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), tcp)
            if len(self._made) >= self._MAX:
                self._made.clear()
            self._made[key] = endpoint
        return endpoint


class _Pool(HTTPConnectionPool):
    """A persistent pool that, once closed, hangs up connections that finish late.

    A request still in flight when :meth:`UpstreamHTTP.close` runs would otherwise be
    cached afterwards, with a 240 s timer nobody cancels.  It also notes which connection
    it hands out, so that a request sent on a cached one can be flushed at once.
    """

    closed = False
    #: the connection the latest getConnection handed out synchronously (see _send)
    handed: Any = None

    def getConnection(self, key: Any, endpoint: Any) -> Deferred[Any]:  # noqa: N802
        d: Deferred[Any] = super().getConnection(key, endpoint)
        d.addCallback(self._hand)
        return d

    def _hand(self, connection: Any) -> Any:
        # a cached connection comes wrapped for automatic retries of idempotent requests
        self.handed = getattr(connection, "_clientProtocol", connection)
        return connection

    def _putConnection(self, key: Any, connection: Any) -> None:
        if self.closed:
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)


class UpstreamHTTP:
    """A provider's HTTP client: pool, timeouts, retries, redaction.

    ``label`` prefixes every message ("openai: ..."); ``secrets`` are scrubbed from every
    message this object produces (the API key above all).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        label: str,
        settings: HTTPSettings,
        secrets: Sequence[str] = (),
    ) -> None:
        self._reactor = reactor
        self.label = label
        self.settings = settings
        self._secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self._pool = _Pool(reactor, persistent=True)
        endpoints = _Endpoints(reactor, settings.connect_timeout_s)
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool)
        self._treq = HTTPClient(agent, cookiejar=_NoCookies(), data_to_body_producer=_body_producer)
        #: parsed URLs: a provider asks the same few again and again
        self._urls: dict[str, EncodedURL] = {}

    def __repr__(self) -> str:
        return f"<UpstreamHTTP {self.label}>"

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced: the last line of defence for messages."""
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def redact_error(self, failure: Failure) -> Failure:
        """An errback: scrub ProviderError messages that came from elsewhere (the stream)."""
        exc = failure.value
        if isinstance(exc, ProviderError):
            clean = self.redact(exc.message)
            if clean != exc.message:
                raise UpstreamError(clean, exc.code, getattr(exc, "status", None)) from None
        return failure

    # -- public operations --------------------------------------------------------------

    def stream(
        self,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        on_bytes: Callable[[bytes], bool],
        method: str = "POST",
        max_retries: int | None = None,
    ) -> Deferred[None]:
        """Send a request and feed its 2xx body to ``on_bytes`` as it arrives.

        ``on_bytes`` returns True when it has the whole answer.  Fires when the body ends;
        fails with :class:`UpstreamError`, or with whatever ``on_bytes`` raised.
        """
        retries = self.settings.max_retries if max_retries is None else max_retries

        def attempt(call: _Call) -> Awaitable[None]:
            return self._attempt_stream(method, url, headers, body, on_bytes)

        return self._cancellable(lambda call: self._with_retries(call, attempt, retries))

    def fetch_json(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        max_retries: int | None = None,
    ) -> Deferred[Any]:
        """Send a request and parse its 2xx JSON body (with the same retry rules)."""
        retries = self.settings.max_retries if max_retries is None else max_retries

        def attempt(call: _Call) -> Awaitable[Any]:
            return self._attempt_json(method, url, headers, body)

        return self._cancellable(lambda call: self._with_retries(call, attempt, retries))

    def probe(self, url: str, *, headers: Mapping[str, str], method: str = "GET") -> Deferred[int]:
        """One request, no retries: the HTTP status the upstream answers with (body drained)."""
        return self._cancellable(lambda call: self._probe(method, url, headers))

    def judge_probe(self, status: int) -> None:
        """``check()``'s rule: any HTTP answer means reachable, except a refused key or a 5xx.

        A 404/405 still counts (an OpenAI- or Anthropic-compatible proxy may lack the listing
        route), and so does 429 (reachable, just busy).
        """
        if status in (401, 403):
            raise UpstreamError(
                f"{self.label}: the upstream rejected the API key (HTTP {status})",
                "upstream_error",
                status,
            )
        if status >= 500:
            raise UpstreamError(
                f"{self.label}: the upstream is failing (HTTP {status})", "upstream_error", status
            )

    def close(self) -> Deferred[None]:
        """Close the pooled connections (tests and shutdown must call this)."""
        self._pool.closed = True
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d

    # -- machinery ----------------------------------------------------------------------

    def _cancellable(self, work: Callable[[_Call], Coroutine[Any, Any, T]]) -> Deferred[T]:
        """Run ``work`` so that cancelling always ends in CancelledError, never a retry."""
        call = _Call()
        inner: Deferred[T] = Deferred.fromCoroutine(work(call))

        def cancel(_: Deferred[T]) -> None:
            call.cancelled = True
            inner.cancel()

        def cancelled_wins(failure: Failure) -> Failure:
            if call.cancelled:
                raise CancelledError()
            return failure

        def relay(result: T | Failure) -> None:
            # After a cancel ``outer`` has already failed with CancelledError, and the work
            # may still finish later (e.g. when cancelled re-entrantly): drop that result.
            if outer.called:
                return
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

        outer: Deferred[T] = Deferred(cancel)
        inner.addErrback(cancelled_wins).addErrback(self.redact_error).addBoth(relay)
        return outer

    async def _with_retries(
        self, call: _Call, attempt: Callable[[_Call], Awaitable[T]], retries: int
    ) -> T:
        tries = 0
        while True:
            try:
                return await attempt(call)
            except _Retry as why:
                if call.cancelled:
                    raise CancelledError() from None
                if tries >= retries:
                    raise self._clean(why.final(tries + 1)) from None
                delay = self.settings.backoff(tries, why.retry_after)
                tries += 1
                _log.info(
                    "{label}: {why}; retry {n} of {max} in {delay:.2f}s",
                    label=self.label,
                    why=self.redact(why.message),
                    n=tries,
                    max=retries,
                    delay=delay,
                )
                if call.cancelled:  # cancelled re-entrantly (from a log observer, say)
                    raise CancelledError() from None
                await deferLater(self._reactor, delay)

    def _clean(self, error: UpstreamError) -> UpstreamError:
        return UpstreamError(self.redact(error.message), error.code, error.status)

    def _where(self, url: str) -> str:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        return f"{host}:{parts.port}" if parts.port else host

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> Any:
        """Send the request; wait for the response head under the idle deadline."""
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= 64:
                self._urls.clear()
            parsed = self._urls[url] = _parse_url(url)
        self._pool.handed = None
        d = self._treq.request(
            method,
            parsed,
            headers=_header_dict(headers),
            data=body,
            unbuffered=True,
            allow_redirects=False,
            reactor=self._reactor,
        )
        # on a cached connection the whole request is written by now: the model can start
        # on it while this turn goes on (a new connection sends once it is up)
        handed, self._pool.handed = self._pool.handed, None
        if handed is not None:
            send_now(handed.transport)
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self._reactor.callLater(self.settings.read_timeout_s, expire)
        try:
            return await d
        except Exception as exc:
            if timed_out:
                raise self._timeout() from None
            if isinstance(exc, CancelledError):
                raise
            reason = f"{self.label}: cannot reach {self._where(url)}: {_describe(exc)}"
            if _is_connect_timeout(exc):
                raise _Retry(reason, "upstream_timeout") from None
            if _is_connection_failure(exc):
                raise _Retry(reason, "upstream_unreachable") from None
            raise self._clean(UpstreamError(reason, "upstream_unreachable")) from None
        finally:
            if timer.active():
                timer.cancel()

    def _timeout(self) -> UpstreamError:
        seconds = f"{self.settings.read_timeout_s:g}"
        return UpstreamError(
            f"{self.label}: no data from the upstream for {seconds}s", "upstream_timeout"
        )

    async def _read(self, response: Any, on_bytes: Callable[[bytes], bool]) -> int:
        """Deliver the body; return how many bytes arrived.  Idle deadline applies."""
        reader = _BodyReader(self._reactor, self.settings.read_timeout_s, on_bytes)
        response.deliverBody(reader)
        try:
            await reader.finished
        except _IdleTimeout:
            raise self._timeout() from None
        except Exception as exc:
            if isinstance(exc, CancelledError | ProviderError) or not _is_connection_failure(exc):
                raise
            what = f"{self.label}: the response broke off: {_describe(exc)}"
            if reader.received == 0:
                raise _Retry(what, "upstream_unreachable") from None
            raise self._clean(UpstreamError(what, "upstream_error", response.code)) from None
        return reader.received

    async def _read_limited(self, response: Any, limit: int) -> tuple[bytes, bool]:
        """The body up to ``limit`` bytes, and whether it was cut."""
        parts: list[bytes] = []
        size = 0

        def collect(data: bytes) -> bool:
            nonlocal size
            room = limit - size
            parts.append(data[:room])
            size += min(len(data), room)
            return size >= limit

        await self._read(response, collect)
        return b"".join(parts), size >= limit

    async def _refuse(self, response: Any) -> None:
        """A non-2xx answer: retry 429/5xx, otherwise fail with the upstream's message."""
        status: int = response.code
        try:
            body, _ = await self._read_limited(response, ERROR_BODY_LIMIT)
        except (UpstreamError, _Retry):
            body = b""
        message = upstream_message(body)
        if status == 429:
            retry_after = parse_retry_after(response.headers, self._reactor.seconds())
            raise _Retry(
                f"{self.label}: rate limited by the upstream (HTTP 429): {message}",
                "upstream_rate_limited",
                status,
                retry_after,
            )
        if 500 <= status <= 599:
            retry_after = parse_retry_after(response.headers, self._reactor.seconds())
            raise _Retry(
                f"{self.label}: the upstream failed (HTTP {status}): {message}",
                "upstream_error",
                status,
                retry_after,
            )
        raise self._clean(
            UpstreamError(
                f"{self.label}: the upstream refused the request (HTTP {status}): {message}",
                "upstream_error",
                status,
            )
        )

    async def _attempt_stream(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        on_bytes: Callable[[bytes], bool],
    ) -> None:
        response = await self._send(method, url, headers, body)
        if not 200 <= response.code < 300:
            await self._refuse(response)
        await self._read(response, on_bytes)

    async def _attempt_json(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> Any:
        response = await self._send(method, url, headers, body)
        if not 200 <= response.code < 300:
            await self._refuse(response)
        data, cut = await self._read_limited(response, JSON_BODY_LIMIT)
        if cut:
            raise UpstreamError(
                f"{self.label}: the upstream's answer is larger than {JSON_BODY_LIMIT} bytes",
                "upstream_error",
                response.code,
            )
        try:
            return json.loads(data)
        except ValueError:
            raise UpstreamError(
                f"{self.label}: the upstream answered with invalid JSON: {upstream_message(data)}",
                "upstream_error",
                response.code,
            ) from None

    async def _probe(self, method: str, url: str, headers: Mapping[str, str]) -> int:
        try:
            response = await self._send(method, url, headers, None)
        except _Retry as why:
            raise self._clean(why.final(1)) from None
        status: int = response.code
        try:
            await self._read_limited(response, ERROR_BODY_LIMIT)
        except (UpstreamError, _Retry):
            pass  # the status is what we came for
        return status
