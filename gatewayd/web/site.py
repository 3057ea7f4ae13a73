"""The HTTP site: limits, rate limits, origins and client certificates in front of every route.

- Each accepted socket is wrapped in a :class:`Connection` that the site counts (in total
  and per address: ``max_connections``, ``max_connections_per_ip`` are refused at accept)
  and tracks for shutdown.  The wrapper outlives a WebSocket takeover (Autobahn swaps the
  wrapped protocol), so the counts stay right for upgraded connections too.
- :class:`GatewayChannel` and :class:`GatewayRequest` add the exact limits and deadlines of
  :mod:`gatewayd.web.limits`.
- Before any resource runs, :meth:`GatewaySite.intercept` answers CORS preflights and applies
  the rate limit (:mod:`gatewayd.ratelimit`); ``/health``, ``/api/health`` and ``/ready``
  are never limited.
- The access log (:mod:`gatewayd.web.access`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Site

from gatewayd.auth import Principal
from gatewayd.config import body_limit_for
from gatewayd.endpoints import IdentityLookup, match_client_cert, peer_identity
from gatewayd.errors import GatewayError, error_body
from gatewayd.ratelimit import (
    EXEMPT_PATHS,
    TokenBucket,
    address_key,
    client_host,
    parse_networks,
    rate_headers,
)
from gatewayd.web.access import AccessLog
from gatewayd.web.common import NOT_CHECKED, bearer, dumps
from gatewayd.web.cors import apply_cors
from gatewayd.web.limits import LimitedChannel, LimitedRequest, Limits, utf8_target

if TYPE_CHECKING:
    from gatewayd.config import Config
    from gatewayd.core import Gateway

_log = Logger()
_JSON = b"application/json"


class Connection(ProtocolWrapper):
    """One accepted socket, counted by the site from accept to close."""

    def __init__(self, site: GatewaySite, channel: GatewayChannel, host: str | None) -> None:
        super().__init__(site, channel)  # type: ignore[arg-type]
        self.host = host

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        # the protocol first (it cancels its timers), then the count: whoever waits for the
        # last connection to go may run on at once, and must find nothing left behind
        try:
            self.wrappedProtocol.connectionLost(reason)
        finally:
            self.factory.unregisterProtocol(self)
            self.wrappedProtocol = None  # type: ignore[assignment]

    def half_close(self) -> bool:
        """Send FIN but keep reading, on plain TCP only (TLS needs its own close)."""
        transport = self.transport
        if isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False):
            transport.loseWriteConnection()
            return True
        return False


class _Refused(Protocol):
    """What a connection over the limits gets: closed before a byte is read."""

    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class GatewayRequest(LimitedRequest):
    """A request that knows its real client address and its client certificate's role."""

    _client_address: Any = None
    #: what the bearer header authenticated to, once the rate limiter has looked (a cache for
    #: gatewayd.web.common.authenticate; ``NOT_CHECKED`` until then)
    bearer_principal: Principal | None | object = NOT_CHECKED

    def process(self) -> None:
        site = self.channel.site  # type: ignore[attr-defined]
        if not utf8_target(self.path, self.getHeader(b"host")):
            self.site = site
            self.setResponseCode(400)
            self.setHeader(b"content-type", _JSON)
            self.setHeader(b"cache-control", b"no-store")
            self.write(dumps(GatewayError("invalid_request", "the URL is not UTF-8").to_json()))
            self.finish()
            return
        if site.gateway is not None and site.intercept(self):
            return
        super().process()

    def getClientAddress(self) -> Any:  # noqa: N802
        """The TCP peer, or the forwarded client when the peer is a trusted proxy."""
        found = self._client_address
        if found is None:
            found = self._client_address = self.client
            channel: Any = self.channel
            trusted = channel.site.trusted if channel is not None else ()
            if trusted and isinstance(found, IPv4Address | IPv6Address):
                host = client_host(
                    found.host, self.requestHeaders.getRawHeaders(b"x-forwarded-for"), trusted
                )
                if host != found.host:
                    kind = IPv6Address if ":" in host else IPv4Address
                    found = self._client_address = kind("TCP", host, 0)
        return found

    @property
    def client_principal(self) -> Principal | None:
        """The ``[[gateway.client_certs]]`` role of this connection's verified certificate."""
        channel: Any = self.channel
        if channel is None:
            return None
        return channel.site.cert_principal(channel)  # type: ignore[no-any-return]


class GatewayChannel(LimitedChannel):
    site: GatewaySite
    #: (config the answer belongs to, the certificate's principal)
    cert_cache: tuple[Any, Principal | None] | None = None
    _host: Any = None

    def getHost(self) -> Any:  # noqa: N802 - Twisted's name
        """The local address, asked of the socket once: every request's ``__init__`` wants it."""
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def refused(self, error: GatewayError) -> None:
        self.site.refusal(error.code, self, error.status)


class GatewaySite(Site):
    requestFactory = GatewayRequest
    protocol = GatewayChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        resource: IResource,
        gateway: Gateway | None = None,
        *,
        access_log: bool = True,
        identify: IdentityLookup = peer_identity,
        clock: Any = None,
        **kw: Any,
    ) -> None:
        kw.setdefault("timeout", None)  # our deadlines replace Twisted's idle timer
        if gateway is not None:
            kw.setdefault("reactor", gateway.reactor)
        super().__init__(resource, parsePOSTFormSubmission=False, **kw)
        self.gateway = gateway
        self.clock = (
            clock if clock is not None else (gateway.clock if gateway is not None else self.reactor)
        )
        self.access_log = AccessLog(gateway) if access_log else None
        #: maps a transport to its client certificate's identity; injectable for tests
        self.identify = identify
        #: every open connection (the wrappers), for counting and for shutdown
        self.channels: set[Connection] = set()
        self.open_by_host: dict[str, int] = {}
        #: refusals by reason, and who else wants to hear of them (metrics)
        self.refusals: dict[str, int] = {}
        self.refusal_hooks: list[Callable[[str], None]] = []
        #: told of every answered request (metrics); set by gatewayd.app.build_site
        self.request_finished: Callable[[Any], None] | None = None
        self._all_closed: list[Deferred[None]] = []
        self.limits = Limits()
        self.trusted: tuple[Any, ...] = ()
        self.limiter: TokenBucket | None = None
        self._config: Config | None = None
        self._route_caps: list[tuple[bytes, re.Pattern[bytes], int]] = []
        self._caps: dict[tuple[bytes, bytes], int] = {}
        if gateway is not None:
            rl = gateway.config.gateway.rate_limit
            self.limiter = TokenBucket(self.clock, rl.rate_per_s, rl.burst)
            self._route_caps = _route_caps()
            self._refresh(gateway.config)

    # -- config ----------------------------------------------------------------------------

    def _refresh(self, config: Config) -> None:
        """Derive what the hot path needs once per config (a reload swaps the object)."""
        g = config.gateway
        self._config = config
        self._caps = {}
        self.trusted = parse_networks(g.trusted_proxies)
        if self.limiter is not None:
            self.limiter.configure(g.rate_limit.rate_per_s, g.rate_limit.burst)
        self.limits = Limits(g.header_timeout_s, g.request_timeout_s, self.body_limit)

    def _current(self) -> None:
        gw = self.gateway
        if gw is not None and gw.config is not self._config:
            self._refresh(gw.config)

    def body_limit(self, method: bytes, path: bytes) -> int:
        """The body cap of one request: its route's own, a hook's own, else by path prefix."""
        key = (method, path)
        cap = self._caps.get(key)
        if cap is not None:
            return cap
        gw = self.gateway
        if gw is None:
            return Limits().body_limit(method, path)
        cap = _route_cap(self._route_caps, method, path)
        if cap is None and path.startswith(b"/hooks/"):
            hook = gw.config.webhooks.get(path[7:].decode("utf-8", "replace"))
            if hook is not None and hook.body_limit_bytes > 0:
                cap = hook.body_limit_bytes
        if cap is None:
            cap = body_limit_for(gw.config.gateway, path.decode("utf-8", "replace"))
        if len(self._caps) > 4096:
            self._caps.clear()
        self._caps[key] = cap
        return cap

    # -- connections -----------------------------------------------------------------------

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        host = getattr(addr, "host", None)
        if not isinstance(host, str):
            host = None
        gw = self.gateway
        if gw is not None:
            self._current()
            g = gw.config.gateway
            if len(self.channels) >= g.max_connections:
                self._count("too_many_connections")
                return _Refused()
            if host is not None and self.open_by_host.get(host, 0) >= g.max_connections_per_ip:
                self._count("too_many_connections")
                return _Refused()
        channel = super().buildProtocol(addr)
        channel.clock = self.clock
        channel.limits = self.limits
        return Connection(self, channel, host)

    def registerProtocol(self, conn: Connection) -> None:  # noqa: N802
        self.channels.add(conn)
        if conn.host is not None:
            self.open_by_host[conn.host] = self.open_by_host.get(conn.host, 0) + 1

    def unregisterProtocol(self, conn: Connection) -> None:  # noqa: N802
        if conn not in self.channels:
            return
        self.channels.discard(conn)
        if conn.host is not None:
            left = self.open_by_host.get(conn.host, 1) - 1
            if left > 0:
                self.open_by_host[conn.host] = left
            else:
                self.open_by_host.pop(conn.host, None)
        if not self.channels:
            waiters, self._all_closed = self._all_closed, []
            for d in waiters:
                d.callback(None)

    def close_connections(self, clock: Any, timeout_s: float = 2.0) -> Deferred[None]:
        """Close every connection that is left (after the drain); abort the stubborn ones."""
        if not self.channels:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._all_closed.append(done)
        for conn in list(self.channels):
            if conn.transport is not None:
                conn.transport.loseConnection()

        def abort() -> None:
            for conn in list(self.channels):
                transport: Any = conn.transport
                if transport is not None:
                    transport.abortConnection()

        timer = clock.callLater(timeout_s, abort)
        done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return done

    # -- per request -----------------------------------------------------------------------

    def cert_principal(self, channel: GatewayChannel) -> Principal | None:
        """The role a verified client certificate maps to, cached per connection and config."""
        gw = self.gateway
        if gw is None:
            return None
        config = gw.config
        cached = channel.cert_cache
        if cached is not None and cached[0] is config:
            return cached[1]
        principal = None
        rules = config.gateway.client_certs
        if rules and channel.transport is not None:
            identity = self.identify(channel.transport)
            role = match_client_cert(identity, rules)
            if role is not None and identity is not None:
                short = identity.fingerprint_sha256[:16]
                principal = Principal(
                    token_id=f"cert:{short}",
                    role=role,
                    name=identity.subject_cn or short,
                    kind="cert",
                )
        channel.cert_cache = (config, principal)
        return principal

    def intercept(self, request: GatewayRequest) -> bool:
        """CORS and the rate limit; True when this answered the request itself."""
        gw = self.gateway
        assert gw is not None
        self._current()
        if apply_cors(gw, request):
            return True
        limiter = self.limiter
        if limiter is None or request.path in EXEMPT_PATHS:
            return False
        allowed, remaining, reset = limiter.take(self._limit_key(gw, request))
        headers = request.responseHeaders
        headers.setRawHeaders(b"ratelimit-policy", [limiter.policy])
        headers.setRawHeaders(b"ratelimit", [rate_headers(remaining, reset)])
        if allowed:
            return False
        self._count("rate_limited")
        error = GatewayError(
            "rate_limited", f"too many requests; retry in {reset} s", retry_after=reset
        )
        request.site = self
        request.setResponseCode(429)
        headers.setRawHeaders(b"content-type", [_JSON])
        headers.setRawHeaders(b"cache-control", [b"no-store"])
        headers.setRawHeaders(b"retry-after", [b"%d" % reset])
        body = dumps(error_body(error, request.path))
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body)
        request.finish()
        return True

    @staticmethod
    def _limit_key(gw: Gateway, request: GatewayRequest) -> str:
        """Whose bucket: the token's when it is valid, else the client address's."""
        token = bearer(request)
        principal = gw.tokens.authenticate(token) if token else None
        if token is not None:
            request.bearer_principal = principal  # the routes need not hash it again
        if principal is None and token is None:
            principal = request.client_principal
            if principal is None:
                args = request.args
                if args and b"token" in args:
                    principal = gw.tokens.authenticate(args[b"token"][0])
        if principal is not None:
            return "t:" + principal.token_id
        return "a:" + address_key(str(getattr(request.getClientAddress(), "host", "")))

    # -- accounting and logs ---------------------------------------------------------------

    def _count(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        metrics = getattr(self.gateway, "metrics", None)
        if metrics is not None:
            try:
                metrics.rejection(reason)
            except Exception:
                _log.failure("metrics rejection hook failed")
        for hook in self.refusal_hooks:
            try:
                hook(reason)
            except Exception:
                _log.failure("refusal hook failed")

    def refusal(self, reason: str, channel: GatewayChannel, status: int) -> None:
        """A channel refused a request (413, 408, 414, 431, 400): count and log it."""
        self._count(reason)
        if self.access_log is not None:
            self.access_log.refused(channel, status, reason)

    def log(self, request: Any) -> None:
        if self.request_finished is not None:
            self.request_finished(request)
        if self.access_log is not None:
            self.access_log.request(request)


def _route_caps() -> list[tuple[bytes, re.Pattern[bytes], int]]:
    """The routes with their own body cap, as (method, path pattern, cap)."""
    from gatewayd.web.routes import ROUTES

    caps = []
    for route in ROUTES:
        if route.body_limit is None:
            continue
        pattern = re.sub(r"<[^>]+>", "[^/]+", re.escape(route.path))
        caps.append((route.method.encode(), re.compile(pattern.encode()), route.body_limit))
    return caps


def _route_cap(
    caps: list[tuple[bytes, re.Pattern[bytes], int]], method: bytes, path: bytes
) -> int | None:
    for route_method, pattern, cap in caps:
        if route_method == method and pattern.fullmatch(path):
            return cap
    return None
