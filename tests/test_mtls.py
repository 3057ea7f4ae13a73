"""The ``mtls:`` endpoint over real loopback sockets, and client-certificate identity.

Certificates are made here with ``cryptography``. Under TLS 1.3 a client whose certificate the
server rejects finishes its own handshake first (DESIGN trap 8), so every rejection test sends a
request and then asserts that no response came and that the server never ran the resource.
"""

from __future__ import annotations

import datetime
import gc
import ipaddress
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface.verify import verifyObject

import gatewayd.endpoints as endpoints
from gatewayd.endpoints import (
    ClientIdentity,
    MTLSContextFactory,
    MTLSServerEndpoint,
    MTLSServerParser,
    identity_from_certificate,
    match_client_cert,
    peer_identity,
    reload_all_tls,
)

T = TypeVar("T")
TIMEOUT = 5.0
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


# --- certificates ------------------------------------------------------------------------------


@attrs.frozen
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    cn: str,
    issuer: Issued | None = None,
    *,
    ca: bool = False,
    server: bool = False,
    not_before: datetime.datetime = NOW - DAY,
    not_after: datetime.datetime = NOW + 30 * DAY,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    signer_key = issuer.key if issuer else key
    issuer_name = issuer.cert.subject if issuer else _name(cn)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return Issued(builder.sign(signer_key, hashes.SHA256()), key)


def _crl(ca: Issued, revoked: list[Issued]) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(NOW - DAY)
        .next_update(NOW + DAY)
    )
    for one in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(one.cert.serial_number)
            .revocation_date(NOW - DAY)
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@attrs.frozen
class PKI:
    dir: Path
    ca: Issued
    other_ca: Issued
    server: Issued
    good: Issued
    other: Issued
    expired: Issued
    revoked: Issued

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def write(self, name: str, data: bytes) -> str:
        (self.dir / name).write_bytes(data)
        return self.path(name)

    def spec(self, crl: bool = True, ca_file: str = "ca.pem", extra: str = "") -> str:
        spec = (
            f"mtls:0:privateKey={self.path('server.key')}:certKey={self.path('server.pem')}"
            f":caCerts={self.path(ca_file)}:interface=127.0.0.1"
        )
        return spec + (f":crl={self.path('crl.pem')}" if crl else "") + extra


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca = _issue("gatewayd test CA", ca=True)
    other_ca = _issue("some other CA", ca=True)
    pki = PKI(
        dir=d,
        ca=ca,
        other_ca=other_ca,
        server=_issue("localhost", ca, server=True),
        good=_issue("ops-laptop", ca),
        other=_issue("ops-laptop", other_ca),
        expired=_issue("old-laptop", ca, not_before=NOW - 10 * DAY, not_after=NOW - DAY),
        revoked=_issue("lost-laptop", ca),
    )
    pki.write("ca.pem", ca.cert_pem)
    pki.write("both-cas.pem", ca.cert_pem + other_ca.cert_pem)
    pki.write("server.key", pki.server.key_pem)
    pki.write("server.pem", pki.server.cert_pem)
    pki.write("server-combined.pem", pki.server.key_pem + pki.server.cert_pem)
    pki.write("crl.pem", _crl(ca, [pki.revoked]))
    return pki


# --- a tiny server and a bounded client -------------------------------------------------------


class WhoAmI(Resource):
    """Answers 200 with the CN the injected identity lookup sees."""

    isLeaf = True

    def __init__(self, identify: Callable[[object], ClientIdentity | None]) -> None:
        super().__init__()
        self.identify = identify
        self.hits = 0

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        self.hits += 1
        identity = self.identify(request.transport)
        return f"cn={identity.subject_cn if identity else None}\n".encode()


class TrackingSite(Site):
    """A Site that remembers its server-side connections and why each one ended."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.open: set[Any] = set()
        self.lost: list[Failure] = []
        self._waiters: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        proto = super().buildProtocol(addr)
        self.open.add(proto)
        original = proto.connectionLost

        def lost(reason: Failure) -> None:
            original(reason)
            self.open.discard(proto)
            self.lost.append(reason)
            if not self.open:
                waiters, self._waiters = self._waiters, []
                for waiter in waiters:
                    waiter.callback(None)

        proto.connectionLost = lost
        return proto

    def all_closed(self) -> Deferred[None]:
        if not self.open:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter


def _reply_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


class Collect(Protocol):
    """Writes a request on connect (TLS buffers it until the handshake), keeps what comes back."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = bytearray()
        self.done: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self._reply: Deferred[bytes] | None = None

    def connectionMade(self) -> None:  # noqa: N802
        if self.request:
            self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data
        if self._reply is not None and _reply_complete(bytes(self.data)):
            reply, self._reply = self._reply, None
            reply.callback(bytes(self.data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if self._reply is not None:
            reply, self._reply = self._reply, None
            reply.errback(reason)
        self.reason = reason
        self.done.callback(None)

    async def exchange(self, reactor: Any, request: bytes) -> bytes:
        """Send one more request on this (keep-alive) connection and return its reply."""
        self.data.clear()
        reply: Deferred[bytes] = Deferred()
        self._reply = reply
        self.transport.write(request)  # type: ignore[union-attr]
        return await _bounded(reactor, reply)

    async def closed(self, reactor: Any) -> Failure:
        """How the connection ended; aborts it if that takes longer than TIMEOUT."""
        timer = reactor.callLater(TIMEOUT, self.transport.abortConnection)  # type: ignore[union-attr]
        try:
            await self.done
        finally:
            if timer.active():
                timer.cancel()
        assert self.reason is not None
        return self.reason


async def _bounded(reactor: Any, d: Deferred[T]) -> T:
    d.addTimeout(TIMEOUT, reactor)
    return await d


GET_10 = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n"
GET_11 = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


class Harness:
    """Starts listeners and clients; ``close()`` tears every one of them down, bounded."""

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.ports: list[IListeningPort] = []
        self.sites: list[TrackingSite] = []
        self.clients: list[Collect] = []

    async def listen(
        self, spec: str, identify: Callable[[object], ClientIdentity | None] = peer_identity
    ) -> Server:
        from twisted.internet.endpoints import serverFromString

        endpoint = serverFromString(self.reactor, spec)
        assert isinstance(endpoint, MTLSServerEndpoint)
        resource = WhoAmI(identify)
        site = TrackingSite(resource)
        port = await endpoint.listen(site)
        self.ports.append(port)
        self.sites.append(site)
        return Server(port, site, resource, endpoint)

    async def connect(self, port: int, tls: Any | None, request: bytes = GET_10) -> Collect:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

        endpoint: Any = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, timeout=TIMEOUT)
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        proto = Collect(request)
        self.clients.append(proto)
        await _bounded(self.reactor, connectProtocol(endpoint, proto))
        return proto

    async def request(self, port: int, tls: Any | None, request: bytes = GET_10) -> Outcome:
        """One HTTP/1.0 exchange (the server closes after it): what came back, how it ended."""
        proto = await self.connect(port, tls, request)
        reason = await proto.closed(self.reactor)
        return Outcome(bytes(proto.data), reason)

    async def close(self) -> None:
        for client in self.clients:
            if not client.done.called and client.transport is not None:
                client.transport.abortConnection()  # type: ignore[attr-defined]
                await client.closed(self.reactor)
        for port in self.ports:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        for site in self.sites:
            for proto in list(site.open):
                # Site wraps each HTTPChannel; the transport is the channel's.
                channel = getattr(proto, "_channel", proto)
                if channel.transport is not None:
                    channel.transport.abortConnection()
            await _bounded(self.reactor, site.all_closed())


@attrs.frozen
class Server:
    port_obj: IListeningPort
    site: TrackingSite
    resource: WhoAmI
    endpoint: MTLSServerEndpoint

    @property
    def port(self) -> int:
        return int(self.port_obj.getHost().port)  # type: ignore[attr-defined]

    @property
    def factory(self) -> MTLSContextFactory:
        return self.endpoint.context_factory


@attrs.frozen
class Outcome:
    data: bytes
    reason: Failure

    @property
    def ok(self) -> bool:
        return self.data.startswith((b"HTTP/1.0 200 ", b"HTTP/1.1 200 "))

    def assert_rejected(self, alert: str = "") -> None:
        """No reply came and the connection died of TLS (or a reset), not a clean close."""
        from OpenSSL import SSL

        assert b"HTTP/" not in self.data, self.data
        assert self.reason.check(SSL.Error, ConnectionLost), self.reason
        if alert and self.reason.check(SSL.Error):
            assert alert in str(self.reason.value), self.reason.value


def _client(pki: PKI, who: Issued | None, *, max_tls12: bool = False) -> Any:
    """Client TLS options trusting our CA for the server, presenting ``who`` (if any)."""
    from twisted.internet import ssl

    extra: dict[str, Any] = {}
    if max_tls12:
        extra["lowerMaximumSecurityTo"] = ssl.TLSVersion.TLSv1_2
    return ssl.optionsForClientTLS(
        "localhost",
        trustRoot=ssl.Certificate.loadPEM(pki.ca.cert_pem),
        clientCertificate=(
            ssl.PrivateCertificate.loadPEM(who.cert_pem + who.key_pem) if who else None
        ),
        extraCertificateOptions=extra,
    )


def _server_errors(site: TrackingSite) -> str:
    """The server side's reasons for dropping connections, as one lowercase string."""
    return " | ".join(str(reason.value) for reason in site.lost).lower()


@pytest_twisted.async_yield_fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        await h.close()


# --- over real sockets ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_good_certificate_gets_200_and_its_cn_is_seen(harness: Harness, pki: PKI) -> None:
    server = await harness.listen(pki.spec())
    assert server.port_obj.getHost().host == "127.0.0.1"  # type: ignore[attr-defined]
    outcome = await harness.request(server.port, _client(pki, pki.good))
    assert outcome.ok, outcome
    assert outcome.data.endswith(b"\r\n\r\ncn=ops-laptop\n")
    assert server.resource.hits == 1


REJECTIONS = {
    # who: (client-side TLS alert, server-side verification error)
    "none": ("certificate required", "peer did not return a certificate"),
    "other": ("unknown ca", "certificate verify failed"),
    "expired": ("certificate expired", "certificate verify failed"),
    "revoked": ("certificate revoked", "certificate verify failed"),
}


@pytest.mark.parametrize("tls12", [False, True], ids=["tls1.3", "tls1.2"])
@pytest.mark.parametrize("who", sorted(REJECTIONS))
@pytest_twisted.ensureDeferred
async def test_rejected_client_certificates(
    harness: Harness, pki: PKI, who: str, tls12: bool
) -> None:
    server = await harness.listen(pki.spec())
    cert = None if who == "none" else getattr(pki, who)
    # The client sends its request before it can know (TLS 1.3), then learns on reading.
    outcome = await harness.request(server.port, _client(pki, cert, max_tls12=tls12))
    await _bounded(harness.reactor, server.site.all_closed())
    client_alert, server_error = REJECTIONS[who]
    outcome.assert_rejected("" if tls12 else client_alert)
    assert server_error in _server_errors(server.site)
    assert server.resource.hits == 0
    # ... and the listener is still serving good clients.
    assert (await harness.request(server.port, _client(pki, pki.good))).ok


@pytest_twisted.ensureDeferred
async def test_tls12_good_certificate_works(harness: Harness, pki: PKI) -> None:
    server = await harness.listen(pki.spec())
    outcome = await harness.request(server.port, _client(pki, pki.good, max_tls12=True))
    assert outcome.ok and outcome.data.endswith(b"cn=ops-laptop\n")


@pytest_twisted.ensureDeferred
async def test_plain_http_is_refused_and_tls_still_works(harness: Harness, pki: PKI) -> None:
    server = await harness.listen(pki.spec())
    plain = await harness.request(server.port, None)
    assert b"HTTP/" not in plain.data
    assert server.resource.hits == 0
    good = await harness.request(server.port, _client(pki, pki.good))
    assert good.ok and server.resource.hits == 1


@pytest_twisted.ensureDeferred
async def test_several_cas_in_ca_certs(harness: Harness, pki: PKI) -> None:
    server = await harness.listen(pki.spec(crl=False, ca_file="both-cas.pem"))
    for who in (pki.good, pki.other, pki.revoked):  # no crl= here, so revoked is not known
        assert (await harness.request(server.port, _client(pki, who))).ok
    (await harness.request(server.port, _client(pki, pki.expired))).assert_rejected()
    (await harness.request(server.port, _client(pki, None))).assert_rejected()


@pytest_twisted.ensureDeferred
async def test_crl_must_cover_every_ca(harness: Harness, pki: PKI) -> None:
    """With crl=, a CA without a CRL in the file cannot vouch for anyone (fail closed)."""
    server = await harness.listen(pki.spec(ca_file="both-cas.pem"))
    assert (await harness.request(server.port, _client(pki, pki.good))).ok
    (await harness.request(server.port, _client(pki, pki.other))).assert_rejected()


@pytest_twisted.ensureDeferred
async def test_certkey_defaults_to_private_key(harness: Harness, pki: PKI) -> None:
    spec = (
        f"mtls:0:privateKey={pki.path('server-combined.pem')}:caCerts={pki.path('ca.pem')}"
        ":interface=127.0.0.1"
    )
    server = await harness.listen(spec)
    assert (await harness.request(server.port, _client(pki, pki.good))).ok


@pytest_twisted.ensureDeferred
async def test_identity_lookup_is_injectable(harness: Harness, pki: PKI) -> None:
    seen: list[object] = []

    def fake(transport: object) -> ClientIdentity:
        seen.append(transport)
        return ClientIdentity("injected", "00")

    server = await harness.listen(pki.spec(), identify=fake)
    outcome = await harness.request(server.port, _client(pki, pki.good))
    assert outcome.data.endswith(b"cn=injected\n") and len(seen) == 1


@pytest_twisted.ensureDeferred
async def test_reload_revokes_new_handshakes_but_keeps_connections(
    harness: Harness, pki: PKI, tmp_path: Path
) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_bytes(_crl(pki.ca, [pki.revoked]))
    server = await harness.listen(pki.spec(crl=False) + f":crl={crl}")
    factory = server.factory

    kept = await harness.connect(server.port, _client(pki, pki.good), request=b"")
    first = await kept.exchange(harness.reactor, GET_11)
    assert b" 200 " in first and first.endswith(b"cn=ops-laptop\n")

    crl.write_bytes(_crl(pki.ca, [pki.revoked, pki.good]))
    assert factory.reload() is True
    assert factory.generation == 1

    # The established connection is untouched ...
    again = await kept.exchange(harness.reactor, GET_11)
    assert b" 200 " in again and again.endswith(b"cn=ops-laptop\n")
    # ... while a new handshake with the now revoked certificate fails.
    (await harness.request(server.port, _client(pki, pki.good))).assert_rejected("revoked")

    # Un-revoke through reload_all_tls(), which the gateway calls on SIGHUP.
    crl.write_bytes(_crl(pki.ca, [pki.revoked]))
    gc.collect()
    assert reload_all_tls() >= 1
    assert factory.generation == 2
    assert (await harness.request(server.port, _client(pki, pki.good))).ok
    assert server.resource.hits == 3


@pytest_twisted.ensureDeferred
async def test_failed_reload_keeps_the_old_context(
    harness: Harness, pki: PKI, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.cert_pem)
    server = await harness.listen(pki.spec(crl=False) + f":caCerts={ca}")
    factory = server.factory
    ca.write_bytes(b"not a certificate")
    assert factory.reload() is False
    assert factory.generation == 0
    assert (await harness.request(server.port, _client(pki, pki.good))).ok
    ca.unlink()
    assert factory.reload() is False
    assert (await harness.request(server.port, _client(pki, pki.good))).ok


# --- parser, plugin and reload registry --------------------------------------------------------


def test_parser_provides_the_interface() -> None:
    parser = MTLSServerParser()
    assert verifyObject(IStreamServerEndpointStringParser, parser)
    assert parser.prefix == "mtls"


def test_get_plugins_finds_the_mtls_parser() -> None:
    from twisted.plugin import getPlugins

    found = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "mtls"]
    assert len(found) == 1 and isinstance(found[0], MTLSServerParser)


def test_interface_and_backlog_are_honoured(pki: PKI) -> None:
    from twisted.internet.endpoints import (
        TCP4ServerEndpoint,
        TCP6ServerEndpoint,
        serverFromString,
    )
    from twisted.protocols.tls import TLSMemoryBIOFactory

    reactor = MemoryReactorClock()
    site = Site(Resource())
    endpoint = serverFromString(reactor, pki.spec(extra=":backlog=7"))
    assert isinstance(endpoint, MTLSServerEndpoint)
    assert isinstance(endpoint.tcp_endpoint, TCP4ServerEndpoint)
    endpoint.listen(site)
    port, factory, backlog, interface = reactor.tcpServers[0]
    assert (port, backlog, interface) == (0, 7, "127.0.0.1")
    assert isinstance(factory, TLSMemoryBIOFactory) and factory.wrappedFactory is site

    v6 = serverFromString(reactor, pki.spec(extra=r":interface=\:\:1"))
    assert isinstance(v6, MTLSServerEndpoint)
    assert isinstance(v6.tcp_endpoint, TCP6ServerEndpoint)
    v6.listen(site)
    assert reactor.tcpServers[1][2:] == (50, "::1")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (":backlog=lots", "backlog= must be an integer"),
        (":backlog=0", "backlog= must be in"),
        (":caCerts=", "caCerts= is required"),
        (":caCerts=/nonexistent/ca.pem", "cannot read caCerts='/nonexistent/ca.pem'"),
        (":caCerts={server.key}", "caCerts="),
        (":privateKey={ca.pem}", "holds no usable unencrypted PEM private key"),
        (":certKey={ca.pem}", "does not match"),
        (":crl={server.pem}", "holds no PEM or DER CRL"),
        (":crl={other-crl.pem}", "that no certificate in caCerts signed"),
    ],
)
def test_bad_configuration_is_a_clear_error(pki: PKI, extra: str, message: str) -> None:
    from twisted.internet.endpoints import serverFromString

    pki.write("other-crl.pem", _crl(pki.other_ca, []))
    for name in ("server.key", "ca.pem", "server.pem", "other-crl.pem"):
        extra = extra.replace("{" + name + "}", pki.path(name))
    with pytest.raises(ValueError) as info:
        serverFromString(MemoryReactorClock(), pki.spec(extra=extra))
    assert message in str(info.value)
    assert "PRIVATE KEY" not in str(info.value)


def test_missing_private_key_is_an_error(pki: PKI) -> None:
    with pytest.raises(ValueError, match="privateKey= is required"):
        MTLSServerParser().parseStreamServer(MemoryReactorClock(), "0", caCerts=pki.path("ca.pem"))


def test_reload_all_tls_reloads_every_live_context(pki: PKI) -> None:
    one = MTLSContextFactory(pki.path("server.key"), pki.path("server.pem"), pki.path("ca.pem"))
    two = MTLSContextFactory(
        pki.path("server.key"), pki.path("server.pem"), pki.path("ca.pem"), pki.path("crl.pem")
    )
    assert verifyObject(IOpenSSLServerConnectionCreator, one)
    assert reload_all_tls() >= 2
    assert one.generation == two.generation == 1
    # The registry is weak: a context nobody uses any more is forgotten.
    gc.collect()
    before = len(endpoints._registry)
    gone = weakref.ref(one)
    del one
    gc.collect()
    assert gone() is None and len(endpoints._registry) == before - 1
    assert two in endpoints._registry


def test_importing_endpoints_stays_light() -> None:
    """The plugin file is imported by every twistd run; OpenSSL must wait for a parse."""
    root = Path(endpoints.__file__).resolve().parent.parent
    code = (
        "import sys, gatewayd.endpoints, twisted.plugins.gatewayd_plugins\n"
        "heavy = [m for m in ('OpenSSL', 'cryptography', 'twisted.internet.reactor', 'klein',"
        " 'twisted.internet.endpoints', 'twisted.internet.ssl') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == "", result.stdout


# --- identity --------------------------------------------------------------------------------


def test_identity_from_certificate(pki: PKI) -> None:
    from OpenSSL import crypto

    expected = pki.good.cert.fingerprint(hashes.SHA256()).hex()
    for cert in (pki.good.cert, crypto.X509.from_cryptography(pki.good.cert)):
        identity = identity_from_certificate(cert)
        assert identity == ClientIdentity("ops-laptop", expected)
        assert identity.fingerprint_sha256 == expected.lower() and ":" not in expected


def test_peer_identity_on_other_transports(pki: PKI) -> None:
    from OpenSSL import crypto

    class NoTLS:
        pass

    class NoCert:
        def getPeerCertificate(self) -> None:  # noqa: N802
            return None

    class Broken:
        def getPeerCertificate(self) -> object:  # noqa: N802
            raise AttributeError("not connected")

    class Fake:
        def getPeerCertificate(self) -> object:  # noqa: N802
            return crypto.X509.from_cryptography(pki.good.cert)

    assert peer_identity(NoTLS()) is None
    assert peer_identity(NoCert()) is None
    assert peer_identity(Broken()) is None
    assert peer_identity(object()) is None
    identity = peer_identity(Fake())
    assert identity is not None and identity.subject_cn == "ops-laptop"


def test_match_client_cert(pki: PKI) -> None:
    identity = identity_from_certificate(pki.good.cert)
    hex_fp = identity.fingerprint_sha256
    openssl_style = ":".join(hex_fp[i : i + 2] for i in range(0, len(hex_fp), 2)).upper()

    @attrs.frozen
    class Rule:
        role: str
        subject_cn: str | None = None
        fingerprint_sha256: str | None = None

    assert match_client_cert(identity, [{"subject_cn": "ops-laptop", "role": "operator"}]) == (
        "operator"
    )
    assert match_client_cert(identity, [Rule("admin", fingerprint_sha256=openssl_style)]) == (
        "admin"
    )
    # First match wins; a rule naming both needs both; a rule naming neither matches nothing.
    rules: list[object] = [
        {"role": "viewer"},
        Rule("chat", subject_cn="someone-else"),
        Rule("admin", subject_cn="ops-laptop", fingerprint_sha256="00" * 32),
        {"subject_cn": "ops-laptop", "fingerprint_sha256": hex_fp.upper(), "role": "operator"},
        Rule("viewer", subject_cn="ops-laptop"),
    ]
    assert match_client_cert(identity, rules) == "operator"
    assert match_client_cert(identity, [Rule("chat", subject_cn="OPS-LAPTOP")]) is None
    assert match_client_cert(identity, []) is None
    assert match_client_cert(None, rules) is None
    assert match_client_cert(ClientIdentity(None, hex_fp), [Rule("chat", subject_cn="")]) is None
    assert ClientIdentity("x", openssl_style).fingerprint_sha256 == hex_fp
