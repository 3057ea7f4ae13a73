"""Rate limits: the bucket on a Clock, client addresses behind proxies, and over real sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock

from gatewayd.ratelimit import (
    TokenBucket,
    address_key,
    client_host,
    parse_networks,
    rate_headers,
)
from tests.harness import ADMIN, OPERATOR, TOKENS_TOML, auth, start_gateway

# --- the bucket ---------------------------------------------------------------------------------


def test_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(clock, rate_per_s=2, burst=3)
    assert [bucket.take("a")[0] for _ in range(3)] == [True, True, True]
    allowed, remaining, reset = bucket.take("a")
    assert (allowed, remaining, reset) == (False, 0, 1)  # 0.5 s to the next token: 1 s
    clock.advance(0.5)
    assert bucket.take("a")[0] is True
    assert bucket.take("a")[0] is False
    clock.advance(10)  # never more than the burst
    assert [bucket.take("a")[0] for _ in range(4)] == [True, True, True, False]


def test_bucket_reports_remaining_and_reset() -> None:
    clock = Clock()
    bucket = TokenBucket(clock, rate_per_s=1, burst=5)
    assert bucket.take("k") == (True, 4, 1)
    assert bucket.take("k") == (True, 3, 2)
    assert bucket.policy == b'"default";q=5;w=5'
    for _ in range(3):
        bucket.take("k")
    allowed, remaining, reset = bucket.take("k")
    assert not allowed and remaining == 0 and reset == 1


def test_slow_rate_gives_a_longer_retry_after() -> None:
    clock = Clock()
    bucket = TokenBucket(clock, rate_per_s=0.1, burst=1)
    assert bucket.take("k")[0]
    assert bucket.take("k") == (False, 0, 10)
    clock.advance(4)
    assert bucket.take("k") == (False, 0, 6)


def test_keys_are_independent() -> None:
    bucket = TokenBucket(Clock(), rate_per_s=1, burst=1)
    assert bucket.take("a")[0] and not bucket.take("a")[0]
    assert bucket.take("b")[0]


def test_full_buckets_are_swept_when_the_table_is_full() -> None:
    clock = Clock()
    bucket = TokenBucket(clock, rate_per_s=1, burst=2, max_keys=100)
    for i in range(100):
        bucket.take(f"ip{i}")
    bucket.take("busy")
    clock.advance(5)  # every bucket has refilled: they carry no information
    bucket.take("new")
    assert len(bucket) <= 2


def test_reconfigure_changes_the_policy() -> None:
    bucket = TokenBucket(Clock(), rate_per_s=20, burst=40)
    assert bucket.policy == b'"default";q=40;w=2'
    bucket.configure(100, 10)
    assert bucket.policy == b'"default";q=10;w=1'
    assert rate_headers(3, 7) == b'"default";r=3;t=7'


# --- client addresses ---------------------------------------------------------------------------

TRUSTED = parse_networks(["10.0.0.0/8", "::1/128"])


@pytest.mark.parametrize(
    "peer, xff, expected",
    [
        ("203.0.113.5", [b"1.2.3.4"], "203.0.113.5"),  # untrusted peer: header ignored
        ("10.0.0.1", [b"1.2.3.4"], "1.2.3.4"),
        ("10.0.0.1", [b"6.6.6.6, 1.2.3.4"], "1.2.3.4"),  # the right-most hop is the proxy's
        ("10.0.0.1", [b"1.2.3.4, 10.0.0.7"], "1.2.3.4"),  # through two trusted proxies
        ("10.0.0.1", [b"6.6.6.6", b"1.2.3.4"], "1.2.3.4"),  # repeated headers
        ("10.0.0.1", [b"garbage"], "10.0.0.1"),
        ("10.0.0.1", [b"10.0.0.2"], "10.0.0.2"),  # all trusted: the left-most
        ("10.0.0.1", None, "10.0.0.1"),
        ("::1", [b"[2001:db8::1]:443"], "2001:db8::1"),
        ("10.0.0.1", [b"::ffff:1.2.3.4"], "1.2.3.4"),
    ],
)
def test_client_host(peer: str, xff: list[bytes] | None, expected: str) -> None:
    assert client_host(peer, xff, TRUSTED) == expected


def test_client_host_without_trusted_proxies_is_the_peer() -> None:
    assert client_host("10.0.0.1", [b"1.2.3.4"], ()) == "10.0.0.1"


def test_ipv6_is_keyed_by_its_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"


# --- over real sockets --------------------------------------------------------------------------

LIMITED = (
    """
[gateway]
listen = ["tcp:0:interface=127.0.0.1"]
trusted_proxies = ["127.0.0.1/32"]
[gateway.rate_limit]
rate_per_s = 1
burst = 3
"""
    + TOKENS_TOML
)


async def call(url: str, token: str | None, headers: dict[bytes, list[bytes]] | None = None) -> Any:
    h = dict(auth(token)) if token else {}
    h.update(headers or {})
    resp = await treq.get(url, headers=h)
    await resp.content()
    return resp


@pytest_twisted.ensureDeferred
async def test_rate_limit_over_http(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), LIMITED)
    clock = Clock()
    clock.advance(1000)
    site = g.service.sites[0]
    assert site.limiter is not None
    site.limiter.clock = clock  # time is the test's
    status = g.url + "/api/status"
    try:
        for left in (2, 1, 0):
            resp = await call(status, ADMIN)
            assert resp.code == 200
            assert resp.headers.getRawHeaders(b"ratelimit-policy") == [b'"default";q=3;w=3']
            assert resp.headers.getRawHeaders(b"ratelimit")[0].startswith(b'"default";r=%d;' % left)
        resp = await treq.get(status, headers=auth(ADMIN))
        assert resp.code == 429
        body = json.loads(await resp.content())
        assert body["error"]["code"] == "rate_limited"
        retry = resp.headers.getRawHeaders(b"retry-after")[0]
        assert retry.isdigit() and int(retry) == 1
        assert resp.headers.getRawHeaders(b"ratelimit") == [b'"default";r=0;t=1']
        assert resp.headers.getRawHeaders(b"ratelimit-policy") == [b'"default";q=3;w=3']

        # another token is not affected; neither are the probes
        assert (await call(status, OPERATOR)).code == 200
        for _ in range(10):
            assert (await call(g.url + "/health", None)).code == 200
            assert (await call(g.url + "/api/health", None)).code == 200

        # after the wait it recovers
        clock.advance(int(retry))
        assert (await call(status, ADMIN)).code == 200
        assert (await call(status, ADMIN)).code == 429

        # without a (valid) token the bucket is the client address's: behind a trusted proxy,
        # X-Forwarded-For names the client, so two clients have two buckets
        def xff(ip: str) -> dict[bytes, list[bytes]]:
            return {b"X-Forwarded-For": [ip.encode()]}

        codes = [(await call(status, None, xff("192.0.2.1"))).code for _ in range(4)]
        assert codes == [401, 401, 401, 429]
        assert (await call(status, None, xff("192.0.2.2"))).code == 401
        assert (await call(status, "not-a-valid-token-at-all", xff("192.0.2.1"))).code == 429
        assert site.refusals["rate_limited"] >= 3
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_untrusted_peer_cannot_pick_its_bucket(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), LIMITED.replace('["127.0.0.1/32"]', "[]"))
    site = g.service.sites[0]
    site.limiter.clock = Clock()
    try:
        codes = [
            (
                await call(
                    g.url + "/api/status", None, {b"X-Forwarded-For": [f"192.0.2.{i}".encode()]}
                )
            ).code
            for i in range(5)
        ]
        assert codes == [401, 401, 401, 429, 429]
    finally:
        await g.stop()
