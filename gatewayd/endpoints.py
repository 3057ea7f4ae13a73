"""The ``mtls:`` server endpoint and client-certificate identity.

``mtls:PORT:privateKey=key.pem[:certKey=cert.pem]:caCerts=ca.pem[:crl=crl.pem]
[:interface=ADDR][:backlog=N]`` listens like ``ssl:`` but requires a client certificate signed by
one of ``caCerts``. Twisted's ``CertificateOptions`` cannot check CRLs (DESIGN trap 12), so the
OpenSSL context is built here, and it can be rebuilt in place (``reload_all_tls`` on SIGHUP or
config apply) without touching established connections.

This module is imported by the twisted plugin file, which ``getPlugins`` loads in every
``twistd`` run: at import time it pulls in only zope.interface, attrs and light Twisted modules.
OpenSSL, cryptography and ``twisted.internet.endpoints`` are imported when an endpoint is parsed.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

    _ServerKey = (
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey
        | dsa.DSAPrivateKey
    )
    from OpenSSL import SSL
    from twisted.internet.defer import Deferred

__all__ = [
    "ClientIdentity",
    "IdentityLookup",
    "MTLSContextFactory",
    "MTLSServerEndpoint",
    "MTLSServerParser",
    "identity_from_certificate",
    "match_client_cert",
    "normalise_fingerprint",
    "peer_identity",
    "reload_all_tls",
]

_log = Logger()

#: TLS 1.2 suites: ECDHE with AEAD only. TLS 1.3 suites are OpenSSL's defaults (all AEAD).
_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"

#: A fixed session-id context: OpenSSL aborts resumptions on a verifying server without one.
_SESSION_ID_CONTEXT = b"gatewayd-mtls"

_CRL_PEM = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


# --- identity ----------------------------------------------------------------------------------


def normalise_fingerprint(value: str) -> str:
    """Lowercase hex without separators, so ``AB:CD`` from ``openssl x509`` matches ``abcd``."""
    return re.sub(r"[\s:]", "", value).lower()


@attrs.frozen
class ClientIdentity:
    """Who the verified client certificate says the peer is."""

    subject_cn: str | None
    fingerprint_sha256: str = attrs.field(converter=normalise_fingerprint)


#: How transports map a connection to an identity; injectable so tests can fake it.
IdentityLookup = Callable[[object], ClientIdentity | None]


def identity_from_certificate(cert: object) -> ClientIdentity:
    """Identity of a certificate given as ``OpenSSL.crypto.X509`` or ``cryptography`` cert.

    A subject with no CN, or with several, yields ``subject_cn=None`` (match by fingerprint).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    to_cryptography = getattr(cert, "to_cryptography", None)
    if to_cryptography is not None:
        cert = to_cryptography()
    if not isinstance(cert, x509.Certificate):
        raise TypeError(f"not a certificate: {type(cert).__name__}")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn: str | None = None
    if len(cns) == 1:
        value = cns[0].value
        cn = value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ClientIdentity(cn, cert.fingerprint(hashes.SHA256()).hex())


def peer_identity(transport: object) -> ClientIdentity | None:
    """The client certificate's identity on a TLS transport; ``None`` for anything else.

    Only a server that asked for a client certificate receives one, and the ``mtls:`` context
    (like Twisted's ``CertificateOptions(verify=True)``) completes no handshake whose
    certificate failed verification, so a certificate seen here has been verified.
    Policy wrappers that forward attributes to the TLS transport work too.
    """
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    if get_peer_certificate is None:
        return None
    try:
        cert = get_peer_certificate()
    except Exception:  # not connected, handshake not done, or a wrapper over plain TCP
        return None
    if cert is None:
        return None
    try:
        return identity_from_certificate(cert)
    except (TypeError, ValueError):
        return None


def _rule_field(rule: object, name: str) -> str | None:
    value = rule.get(name) if isinstance(rule, Mapping) else getattr(rule, name, None)
    if value is None or value == "":
        return None
    return str(value)


def match_client_cert(identity: ClientIdentity | None, rules: Iterable[object]) -> str | None:
    """The role of the first ``[[gateway.client_certs]]`` rule the identity satisfies.

    A rule is a mapping or an object with ``subject_cn`` and/or ``fingerprint_sha256`` and
    ``role``; when a rule names both, both must match. A rule naming neither matches nothing.
    """
    if identity is None:
        return None
    for rule in rules:
        role = _rule_field(rule, "role")
        cn = _rule_field(rule, "subject_cn")
        fingerprint = _rule_field(rule, "fingerprint_sha256")
        if role is None or (cn is None and fingerprint is None):
            continue
        if cn is not None and cn != identity.subject_cn:
            continue
        if fingerprint is not None and (
            normalise_fingerprint(fingerprint) != identity.fingerprint_sha256
        ):
            continue
        return role
    return None


# --- the reloadable context ----------------------------------------------------------------------


@attrs.frozen
class _Material:
    """Everything read from disk for one context, parsed and checked."""

    key: _ServerKey
    chain: list[x509.Certificate]
    cas: list[x509.Certificate]
    crls: list[x509.CertificateRevocationList]


def _read(param: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"mtls: cannot read {param}={path!r}: {e.strerror or e}") from None


def _load_material(private_key: str, cert_key: str, ca_certs: str, crl: str | None) -> _Material:
    """Read and check the files; errors name the parameter and path, never file contents."""
    key = _load_key(private_key)
    chain = _load_certs("certKey", cert_key)
    cas = _load_certs("caCerts", ca_certs)
    crls: list[x509.CertificateRevocationList] = []
    if crl is not None:
        crls = _load_crls(crl, cas)
    now = datetime.now(UTC)
    if chain[0].not_valid_after_utc < now:
        _log.warn("mtls: the server certificate in {path} has expired", path=cert_key)
    return _Material(key=key, chain=chain, cas=cas, crls=crls)


def _load_key(path: str) -> _ServerKey:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

    data = _read("privateKey", path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        raise ValueError(
            f"mtls: privateKey={path!r} holds no usable unencrypted PEM private key"
        ) from None
    if not isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey
        | dsa.DSAPrivateKey,
    ):
        raise ValueError(f"mtls: privateKey={path!r} is not a key type TLS can serve with")
    return key


def _load_certs(param: str, path: str) -> list[x509.Certificate]:
    from cryptography import x509

    data = _read(param, path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"mtls: {param}={path!r} holds no PEM certificate") from None


def _load_crls(path: str, cas: list[x509.Certificate]) -> list[x509.CertificateRevocationList]:
    """One or more CRLs (PEM, or a single DER), each signed by one of ``caCerts``."""
    from cryptography import x509

    data = _read("crl", path)
    blocks = _CRL_PEM.findall(data)
    try:
        crls = (
            [x509.load_pem_x509_crl(block) for block in blocks]
            if blocks
            else [x509.load_der_x509_crl(data)]
        )
    except ValueError:
        raise ValueError(f"mtls: crl={path!r} holds no PEM or DER CRL") from None
    now = datetime.now(UTC)
    covered: set[bytes] = set()
    for one in crls:
        issuers = [ca for ca in cas if ca.subject == one.issuer]
        if not any(_crl_signed_by(one, ca) for ca in issuers):
            raise ValueError(
                f"mtls: crl={path!r} has a CRL for {one.issuer.rfc4514_string()!r} "
                "that no certificate in caCerts signed"
            )
        covered.update(ca.subject.public_bytes() for ca in issuers)
        next_update = one.next_update_utc
        if next_update is not None and next_update < now:
            _log.warn(
                "mtls: the CRL for {issuer} in {path} is past its nextUpdate; "
                "every client certificate it covers will be rejected",
                issuer=one.issuer.rfc4514_string(),
                path=path,
            )
    for ca in cas:
        if ca.subject.public_bytes() not in covered:
            _log.warn(
                "mtls: {path} has no CRL for {issuer}; its client certificates will be rejected",
                issuer=ca.subject.rfc4514_string(),
                path=path,
            )
    return crls


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _build_context(material: _Material) -> SSL.Context:
    """A server context: TLS 1.2+, AEAD ciphers, client certificate required, optional CRLs."""
    from OpenSSL import SSL, crypto

    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_ECDH_USE
        | SSL.OP_NO_TICKET
    )
    ctx.set_cipher_list(_TLS12_CIPHERS)
    try:
        ctx.use_certificate(material.chain[0])
        for extra in material.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(material.key)
        ctx.check_privatekey()
    except SSL.Error:
        raise ValueError("mtls: privateKey does not match the certificate in certKey") from None
    store = ctx.get_cert_store()
    if store is None:  # pragma: no cover - OpenSSL always gives a server context a store
        raise ValueError("mtls: OpenSSL context has no certificate store")
    for ca in material.cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
        ctx.add_client_ca(ca)
    if material.crls:
        for crl in material.crls:
            store.add_crl(crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    # Full handshakes only: a resumed session would skip the CRL checked after a reload.
    ctx.set_session_id(_SESSION_ID_CONTEXT)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


#: Every live mtls context, for reload_all_tls(); weak so stopped listeners are forgotten.
_registry: weakref.WeakSet[MTLSContextFactory] = weakref.WeakSet()


@implementer(IOpenSSLServerConnectionCreator)
class MTLSContextFactory:
    """Makes server TLS connections that require a client certificate; reloadable in place.

    Each connection keeps the context it started with, so ``reload()`` affects only new
    handshakes and never drops an established connection.
    """

    def __init__(
        self, private_key: str, cert_key: str, ca_certs: str, crl: str | None = None
    ) -> None:
        self.private_key = private_key
        self.cert_key = cert_key
        self.ca_certs = ca_certs
        self.crl = crl
        #: Bumped on every successful reload (observable by tests and status pages).
        self.generation = 0
        self._context = self._make()
        _registry.add(self)

    def _make(self) -> SSL.Context:
        return _build_context(
            _load_material(self.private_key, self.cert_key, self.ca_certs, self.crl)
        )

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802
        from OpenSSL import SSL

        return SSL.Connection(self._context)

    def reload(self) -> bool:
        """Re-read key, certificate, CAs and CRL; on any error keep the current context."""
        try:
            context = self._make()
        except Exception as e:
            _log.error(
                "mtls: reload of {ca_certs} failed, keeping the previous context: {error}",
                ca_certs=self.ca_certs,
                error=str(e) if isinstance(e, ValueError) else type(e).__name__,
            )
            return False
        self._context = context
        self.generation += 1
        _log.info("mtls: reloaded TLS material (CA {ca_certs})", ca_certs=self.ca_certs)
        return True


def reload_all_tls() -> int:
    """Reload every live ``mtls:`` context; returns how many reloaded successfully."""
    return sum(1 for factory in list(_registry) if factory.reload())


# --- the endpoint and its parser -----------------------------------------------------------------


@implementer(IStreamServerEndpoint)
class MTLSServerEndpoint:
    """A TCP (v4 or v6) server endpoint whose connections are wrapped in mutual TLS."""

    def __init__(
        self,
        reactor: Any,
        port: int,
        context_factory: MTLSContextFactory,
        backlog: int = 50,
        interface: str = "",
    ) -> None:
        from twisted.internet.abstract import isIPv6Address
        from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint

        self.reactor = reactor
        self.port = port
        self.context_factory = context_factory
        self.backlog = backlog
        self.interface = interface
        self.tcp_endpoint: IStreamServerEndpoint
        if isIPv6Address(interface):
            self.tcp_endpoint = TCP6ServerEndpoint(reactor, port, backlog, interface)
        else:
            self.tcp_endpoint = TCP4ServerEndpoint(reactor, port, backlog, interface)

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803
        from twisted.protocols.tls import TLSMemoryBIOFactory

        clock = self.reactor if IReactorTime.providedBy(self.reactor) else None
        wrapped = TLSMemoryBIOFactory(self.context_factory, False, protocolFactory, clock)
        return self.tcp_endpoint.listen(wrapped)


def _int_param(name: str, value: object, low: int, high: int) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError(f"mtls: {name}= must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"mtls: {name}= must be in {low}..{high}, got {number}")
    return number


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MTLSServerParser:
    """``mtls:`` for ``serverFromString``, registered in ``twisted/plugins/gatewayd_plugins.py``."""

    prefix = "mtls"

    def _parseServer(  # noqa: N802, N803 - Twisted's names for the endpoint-string keys
        self,
        reactor: Any,
        port: str,
        privateKey: str | None = None,  # noqa: N803
        certKey: str | None = None,  # noqa: N803
        caCerts: str | None = None,  # noqa: N803
        crl: str | None = None,
        interface: str = "",
        backlog: str = "50",
    ) -> MTLSServerEndpoint:
        if not privateKey:
            raise ValueError("mtls: privateKey= is required")
        if not caCerts:
            raise ValueError("mtls: caCerts= is required (the CAs that sign client certificates)")
        factory = MTLSContextFactory(privateKey, certKey or privateKey, caCerts, crl or None)
        return MTLSServerEndpoint(
            reactor,
            _int_param("port", port, 0, 65535),
            factory,
            backlog=_int_param("backlog", backlog, 1, 65535),
            interface=interface,
        )

    def parseStreamServer(  # noqa: N802 - the interface's name
        self, reactor: Any, *args: Any, **kwargs: Any
    ) -> MTLSServerEndpoint:
        """Twisted's signature (for ``verifyObject``); the real one is ``_parseServer``."""
        return self._parseServer(reactor, *args, **kwargs)
