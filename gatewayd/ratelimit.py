"""Request rate limits: a token bucket per token, or per client address when there is none.

The bucket is the cheapest fair limiter there is: two floats per key and a few arithmetic
operations per request, so it costs far less than the request it guards.  A caller that
authenticated is limited by its token id, so one noisy token never throttles another; an
unauthenticated caller (or one with a bad token) is limited by its address, which is the TCP
peer unless that peer is a trusted proxy, in which case the right-most untrusted
``X-Forwarded-For`` entry is believed.  IPv6 clients are keyed by their /64, because one
host usually holds a whole /64 and could otherwise step around the limit.

Answers over the limit carry an integer ``Retry-After`` plus the IETF ``RateLimit-Policy``
and ``RateLimit`` fields (draft-ietf-httpapi-ratelimit-headers, structured-field form)::

    RateLimit-Policy: "default";q=40;w=2        burst 40, refilled in 2 s (rate 20/s)
    RateLimit: "default";r=0;t=1                nothing left; try again in 1 s

``t`` is the wait for the next request when ``r`` is 0, else the time until the bucket is
full again.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Sequence
from typing import Any

#: paths that are never limited (liveness and readiness probes)
EXEMPT_PATHS = frozenset({b"/health", b"/api/health", b"/ready"})

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TokenBucket:
    """Buckets by key; ``take`` answers ``(allowed, remaining, reset_s)``.

    Buckets that have refilled completely carry no information, so they are swept when the
    table passes ``max_keys`` (an address flood cannot grow it without bound).
    """

    def __init__(self, clock: Any, rate_per_s: float, burst: int, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}
        self.rate = float(rate_per_s)
        self.burst = int(burst)
        self.policy = b""
        self.configure(rate_per_s, burst)

    def configure(self, rate_per_s: float, burst: int) -> None:
        self.rate = float(rate_per_s)
        self.burst = int(burst)
        window = max(1, math.ceil(self.burst / self.rate))
        self.policy = f'"default";q={self.burst};w={window}'.encode()

    def take(self, key: str) -> tuple[bool, int, int]:
        now = self.clock.seconds()
        bucket = self._buckets.get(key)
        burst = self.burst
        rate = self.rate
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self.sweep(now)
            bucket = self._buckets[key] = [float(burst), now]
        tokens = bucket[0] + (now - bucket[1]) * rate
        if tokens > burst:
            tokens = float(burst)
        bucket[1] = now
        if tokens >= 1.0:
            tokens -= 1.0
            bucket[0] = tokens
            return True, int(tokens), math.ceil((burst - tokens) / rate)
        bucket[0] = tokens
        return False, 0, max(1, math.ceil((1.0 - tokens) / rate))

    def sweep(self, now: float) -> None:
        """Forget buckets that are full by now (they would start full anyway)."""
        burst, rate = self.burst, self.rate
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * rate >= burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.max_keys:  # still full of busy keys: start over
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)


def parse_networks(cidrs: Iterable[str]) -> tuple[_Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[::1]:1234" as some proxies write it
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "1.2.3.4:5678"
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _trusted(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: Sequence[_Network]) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


def client_host(
    peer: str, forwarded_for: Sequence[bytes] | None, trusted: Sequence[_Network]
) -> str:
    """The client's address: the TCP peer, unless that is a trusted proxy.

    Behind trusted proxies the right-most ``X-Forwarded-For`` entry that is not itself a
    trusted proxy is the client (entries further left are whatever the client claimed).  A
    malformed entry stops the walk and the last trusted hop answers for the request.
    """
    if not trusted or not forwarded_for:
        return peer
    addr = _address(peer)
    if addr is None or not _trusted(addr, trusted):
        return peer
    hops = [h for value in forwarded_for for h in value.decode("latin-1").split(",")]
    client = str(addr)
    for hop in reversed(hops):
        hop_addr = _address(hop)
        if hop_addr is None:
            break
        client = str(hop_addr)
        if not _trusted(hop_addr, trusted):
            break
    return client


def address_key(host: str) -> str:
    """The limiter key of an address: IPv4 as is, IPv6 by its /64."""
    if ":" not in host:
        return host
    addr = _address(host)
    if addr is None:
        return host
    if isinstance(addr, ipaddress.IPv4Address):
        return str(addr)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


def rate_headers(remaining: int, reset_s: int) -> bytes:
    """The ``RateLimit`` field value."""
    return b'"default";r=%d;t=%d' % (remaining, reset_s)
