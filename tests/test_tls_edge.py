"""The gateway behind ``ssl:`` and ``mtls:`` listeners, client-certificate roles, and origins.

Certificates are generated here (with the helpers of ``tests.test_mtls``).  Under TLS 1.3 a
client whose certificate the server rejects completes its own side of the handshake first
(DESIGN trap 8), so every rejection test sends a request and then asserts that no HTTP
answer came back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq

from gatewayd.endpoints import ClientIdentity
from gatewayd.web.cors import origin_allowed, parse_origin
from tests.harness import ADMIN, OPERATOR, TOKENS_TOML, Running, auth, start_gateway
from tests.test_mtls import DAY, NOW, Collect, Issued, Outcome, _bounded, _client, _crl, _issue


@attrs.frozen
class Certs:
    dir: Path
    ca: Issued
    other_ca: Issued
    server: Issued
    good: Issued
    unmapped: Issued
    other: Issued
    expired: Issued
    revoked: Issued

    def path(self, name: str) -> str:
        return str(self.dir / name)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("edge-pki")
    ca = _issue("edge test CA", ca=True)
    other_ca = _issue("another CA", ca=True)
    c = Certs(
        dir=d,
        ca=ca,
        other_ca=other_ca,
        server=_issue("localhost", ca, server=True),
        good=_issue("ops-laptop", ca),
        unmapped=_issue("someone-else", ca),
        other=_issue("ops-laptop", other_ca),
        expired=_issue("ops-laptop", ca, not_before=NOW - 10 * DAY, not_after=NOW - DAY),
        revoked=_issue("ops-laptop", ca),
    )
    (d / "ca.pem").write_bytes(ca.cert_pem)
    (d / "server.key").write_bytes(c.server.key_pem)
    (d / "server.pem").write_bytes(c.server.cert_pem)
    (d / "crl.pem").write_bytes(_crl(ca, [c.revoked]))
    return c


def _config(c: Certs) -> str:
    key, cert = c.path("server.key"), c.path("server.pem")
    return (
        f"""
[gateway]
listen = [
  "tcp:0:interface=127.0.0.1",
  "ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
  "mtls:0:interface=127.0.0.1:privateKey={key}:certKey={cert}:caCerts={c.path("ca.pem")}:crl={c.path("crl.pem")}",
]
[[gateway.client_certs]]
subject_cn = "ops-laptop"
role = "operator"
"""
        + TOKENS_TOML
    )


async def _ports(g: Running) -> dict[str, int]:
    ports = {}
    for child in g.service:
        name = child.name or ""
        if name.startswith("listen:"):
            port = await child._waitingForPort
            ports[name.split(":", 2)[1]] = port.getHost().port
    return ports


def _http(path: str, token: str | None = None, extra: bytes = b"") -> bytes:
    auth_line = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    return f"GET {path} HTTP/1.0\r\nHost: localhost\r\n".encode() + auth_line + extra + b"\r\n"


async def _request(port: int, tls: Any, request: bytes) -> Outcome:
    """One HTTP/1.0 exchange (the server closes after it): what came back, how it ended."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    proto = Collect(request)
    await _bounded(reactor, connectProtocol(endpoint, proto))
    reason = await proto.closed(reactor)
    return Outcome(bytes(proto.data), reason)


def _status(outcome: Outcome) -> int:
    assert outcome.data.startswith(b"HTTP/1."), outcome
    return int(outcome.data.split(b" ", 2)[1])


def _trusting(c: Certs, who: Issued | None = None, *, tls12: bool = False) -> Any:
    return _client(c, who, max_tls12=tls12)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_ssl_listener(tmp_path: Any, certs: Certs) -> None:
    g = await start_gateway(str(tmp_path), _config(certs))
    try:
        ports = await _ports(g)
        ssl = ports["ssl"]
        ok = await _request(ssl, _trusting(certs), _http("/api/status", ADMIN))
        assert _status(ok) == 200 and json.loads(ok.data.partition(b"\r\n\r\n")[2])["version"]
        assert _status(await _request(ssl, _trusting(certs), _http("/api/status"))) == 401
        # plain HTTP to the TLS port gets no HTTP answer; the next TLS request still works
        plain = await _request(ssl, None, _http("/health"))
        assert b"HTTP/" not in plain.data
        assert _status(await _request(ssl, _trusting(certs), _http("/health"))) == 200
        # the limits hold over TLS too
        big = (
            b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10485760\r\n\r\n"
        )
        refused = await _request(ssl, _trusting(certs), big)
        assert _status(refused) == 413 and b"100 Continue" not in refused.data
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_mtls_listener_and_certificate_roles(tmp_path: Any, certs: Certs) -> None:
    g = await start_gateway(str(tmp_path), _config(certs))
    try:
        mtls = (await _ports(g))["mtls"]
        # rejected: no certificate, another CA, expired, revoked (send, then assert)
        for who in (None, certs.other, certs.expired, certs.revoked):
            for tls12 in (False, True):
                outcome = await _request(mtls, _trusting(certs, who, tls12=tls12), _http("/health"))
                outcome.assert_rejected()
        # a good certificate: 200; mapped by CN to operator, it needs no bearer token
        good = await _request(mtls, _trusting(certs, certs.good), _http("/api/status"))
        assert _status(good) == 200
        who = await _request(
            mtls,
            _trusting(certs, certs.good),
            b"POST /api/token/validate HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
        )
        identity = json.loads(who.data.partition(b"\r\n\r\n")[2])
        assert identity["role"] == "operator" and identity["name"] == "ops-laptop"
        assert identity["token_id"].startswith("cert:")
        # operator is not admin
        assert (
            _status(await _request(mtls, _trusting(certs, certs.good), _http("/api/tokens"))) == 403
        )
        # a good certificate that no rule maps still needs a token; a bearer token wins
        unmapped = _trusting(certs, certs.unmapped)
        assert _status(await _request(mtls, unmapped, _http("/api/status"))) == 401
        assert _status(await _request(mtls, unmapped, _http("/api/tokens", ADMIN))) == 200
        assert _status(await _request(mtls, _trusting(certs, certs.good), _http("/health"))) == 200
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_identity_lookup_is_injectable(tmp_path: Any) -> None:
    rules = """
[[gateway.client_certs]]
fingerprint_sha256 = "AB:CD:EF"
role = "admin"
"""
    g = await start_gateway(str(tmp_path), TOKENS_TOML + rules)
    site = g.service.sites[0]
    seen: list[object] = []

    def fake(transport: object) -> ClientIdentity:
        seen.append(transport)
        return ClientIdentity("anything", "abcdef")

    try:
        resp = await treq.get(g.url + "/api/tokens")
        assert resp.code == 401
        await resp.content()
        site.identify = fake
        resp = await treq.get(g.url + "/api/tokens", persistent=False)
        assert resp.code == 200, await resp.content()
        await resp.content()
        assert seen
    finally:
        await g.stop()


# --- origins ------------------------------------------------------------------------------------


@attrs.frozen
class _G:
    config: Any


def _gw(*origins: str) -> Any:
    from gatewayd.config import parse_config

    listed = ", ".join(json.dumps(o) for o in origins)
    return _G(parse_config(f"[gateway]\nallowed_origins = [{listed}]\n"))


@pytest.mark.parametrize(
    "origins, origin, host, allowed",
    [
        ((), None, "example.com", True),  # no Origin: not a browser
        ((), "https://example.com", "example.com", True),  # same host, default port
        ((), "http://127.0.0.1:18789", "127.0.0.1:18789", True),
        ((), "http://127.0.0.1:18790", "127.0.0.1:18789", False),
        ((), "https://evil.example", "example.com", False),
        ((), "null", "example.com", False),
        (("https://app.example",), "https://app.example", "gw.example", True),
        (("https://app.example",), "https://app.example:443", "gw.example", True),
        (("https://app.example",), "http://app.example", "gw.example", False),
        (("*",), "https://anything.example", "gw.example", True),
        (("null",), "null", "gw.example", True),
    ],
)
def test_origin_allowed(
    origins: tuple[str, ...], origin: str | None, host: str, allowed: bool
) -> None:
    assert origin_allowed(_gw(*origins), origin, host) is allowed


def test_parse_origin() -> None:
    assert parse_origin("HTTPS://Example.COM") == ("https", "example.com", 443)
    assert parse_origin("http://[::1]:8080") == ("http", "[::1]", 8080)
    assert parse_origin("ftp://x") is None and parse_origin("http://x:99999") is None


@pytest_twisted.ensureDeferred
async def test_cors_is_off_by_default_and_opened_by_allowed_origins(tmp_path: Any) -> None:
    origin = {b"Origin": [b"https://app.example"]}
    preflight = {
        **origin,
        b"Access-Control-Request-Method": [b"POST"],
        b"Access-Control-Request-Headers": [b"authorization, content-type"],
    }
    g = await start_gateway(str(tmp_path / "a"))
    try:
        resp = await treq.get(g.url + "/api/status", headers={**auth(ADMIN), **origin})
        await resp.content()
        assert resp.code == 200
        assert not [
            k for k, _ in resp.headers.getAllRawHeaders() if k.lower().startswith(b"access-control")
        ]
        resp = await treq.request("OPTIONS", g.url + "/api/chat", headers=preflight)
        await resp.content()
        assert resp.headers.getRawHeaders(b"access-control-allow-origin") is None
    finally:
        await g.stop()

    text = '[gateway]\nlisten = ["tcp:0:interface=127.0.0.1"]\nallowed_origins = ["https://app.example"]\n'
    g = await start_gateway(str(tmp_path / "b"), text + TOKENS_TOML)
    try:
        resp = await treq.get(g.url + "/api/status", headers={**auth(OPERATOR), **origin})
        await resp.content()
        assert resp.code == 200
        assert resp.headers.getRawHeaders(b"access-control-allow-origin") == [
            b"https://app.example"
        ]
        assert resp.headers.getRawHeaders(b"vary") == [b"Origin"]
        assert b"RateLimit" in resp.headers.getRawHeaders(b"access-control-expose-headers")[0]
        resp = await treq.request("OPTIONS", g.url + "/api/chat", headers=preflight)
        await resp.content()
        assert resp.code == 204
        assert b"POST" in resp.headers.getRawHeaders(b"access-control-allow-methods")[0]
        assert b"Authorization" in resp.headers.getRawHeaders(b"access-control-allow-headers")[0]
        assert resp.headers.getRawHeaders(b"access-control-allow-credentials") is None
        other = {b"Origin": [b"https://evil.example"]}
        resp = await treq.get(g.url + "/api/status", headers={**auth(OPERATOR), **other})
        await resp.content()
        assert resp.headers.getRawHeaders(b"access-control-allow-origin") is None
    finally:
        await g.stop()
