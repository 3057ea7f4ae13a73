"""Webhook signature verifiers and signers (CONTRACT §9).

Pure functions with no I/O and no Twisted imports, so they can be fuzzed hard and shared by the
inbound hook routes, the chat bridges and the outbound webhook bridge. Every failure a sender can
cause is a 401 ``GatewayError`` (``missing_signature``, ``invalid_signature``,
``stale_signature``); a configuration mistake (unknown scheme, empty secret, …) is a
``ValueError``. Digests are compared as bytes with ``hmac.compare_digest`` (DESIGN trap 6), and
messages never carry the secret, the expected signature or the received header values.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import attrs
import nacl.exceptions
import nacl.signing

from gatewayd.errors import GatewayError

__all__ = [
    "ALGORITHMS",
    "SCHEMES",
    "HeadersLike",
    "Verified",
    "check_discord_public_key",
    "check_scheme",
    "json_field",
    "sign",
    "sign_discord",
    "standard_webhook_headers",
    "verify",
    "verify_discord",
    "verify_telegram",
]

#: Hook schemes of ``[webhooks.<name>] scheme``.
SCHEMES: frozenset[str] = frozenset({"hmac", "github", "standard", "slack", "stripe"})
#: Digest algorithms the ``hmac`` scheme accepts; every other scheme is fixed to sha256.
ALGORITHMS: tuple[str, ...] = ("sha256", "sha384", "sha512")

_STANDARD_PREFIX = "whsec_"
# A timestamp is plain ASCII digits; 18 digits keeps int() cheap and is far past any real clock.
_TIMESTAMP = re.compile(r"[0-9]{1,18}", re.ASCII)
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+", re.ASCII)
# Header values we emit must not be able to smuggle CR/LF or other control bytes.
_HEADER_TEXT = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?", re.ASCII)


@attrs.frozen
class Verified:
    """What a successful verification learnt: the replay id and the signed time, when known."""

    delivery_id: str | None
    timestamp: int | None


class RawHeaders(Protocol):
    """Twisted's ``Headers`` (structurally), so callers may pass ``request.requestHeaders``."""

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, Sequence[bytes]]]: ...


HeaderValue = str | bytes | Sequence[str | bytes] | None
HeadersLike = Mapping[str, HeaderValue] | Mapping[bytes, HeaderValue] | RawHeaders


# --- errors ------------------------------------------------------------------------------------


def _missing(header: str) -> GatewayError:
    return GatewayError("missing_signature", f"missing {header} header")


def _invalid(why: str) -> GatewayError:
    return GatewayError("invalid_signature", why)


def _stale() -> GatewayError:
    return GatewayError("stale_signature", "signature timestamp is outside the allowed window")


# --- headers -----------------------------------------------------------------------------------


_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _ascii_lower(name: str) -> str:
    # str.lower() maps e.g. the Kelvin sign to "k"; header names are ASCII, so lower only A-Z.
    return name.translate(_LOWER)


class _Headers:
    """A case-insensitive, decode-on-read view of whatever header container the caller has.

    Reading a header yields its stripped ASCII text, ``None`` when it is absent or blank, and
    ``invalid_signature`` when it cannot be decoded or is repeated with different values.
    """

    def __init__(self, headers: HeadersLike) -> None:
        self._values: dict[str, list[object]] = {}
        if isinstance(headers, Mapping):
            items: Iterator[tuple[object, object]] = iter(headers.items())
        else:
            items = iter(headers.getAllRawHeaders())
        for key, value in items:
            if isinstance(key, bytes):
                key = key.decode("latin-1")
            if not isinstance(key, str) or not key.isascii():
                continue
            bucket = self._values.setdefault(_ascii_lower(key), [])
            if isinstance(value, (str, bytes)) or value is None:
                bucket.append(value)
            elif isinstance(value, Sequence):
                bucket.extend(value)
            else:
                bucket.append(value)

    def get(self, name: str, label: str) -> str | None:
        texts = {_decode(raw, label) for raw in self._values.get(name, ())}
        texts.discard(None)
        if not texts:
            return None
        if len(texts) > 1:
            raise _invalid(f"conflicting {label} headers")
        return texts.pop()


def _decode(raw: object, label: str) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise _invalid(f"{label} header is not ASCII") from None
    elif isinstance(raw, str):
        if not raw.isascii():
            raise _invalid(f"{label} header is not ASCII")
        text = raw
    else:
        raise _invalid(f"{label} header has an unusable value")
    text = text.strip(" \t\r\n")
    return text or None


def _require(headers: _Headers, name: str, label: str) -> str:
    value = headers.get(name, label)
    if value is None:
        raise _missing(label)
    return value


# --- parsing helpers ---------------------------------------------------------------------------


def _unhex(text: str) -> bytes | None:
    """Strict hex: even length, hex digits only (``bytes.fromhex`` would skip whitespace)."""
    if _HEX.fullmatch(text) is None:
        return None
    return bytes.fromhex(text)


def _unb64(text: str) -> bytes | None:
    """Strict, canonical base64, so one signature has exactly one accepted spelling."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw or base64.b64encode(raw) != text.encode("ascii"):
        return None
    return raw


def _timestamp(text: str, label: str) -> int:
    if _TIMESTAMP.fullmatch(text) is None:
        raise _invalid(f"malformed {label} header")
    return int(text)


def _check_age(ts: int, now: float, max_age_s: int) -> None:
    if abs(now - ts) > max_age_s:
        raise _stale()


def _prefixed_hex(value: str, prefix: str, label: str) -> bytes:
    """Parse ``<prefix>=<hex>`` (``sha256=…``, ``v0=…``)."""
    given_prefix, sep, hexpart = value.partition("=")
    if not sep:
        raise _invalid(f"malformed {label} header")
    if _ascii_lower(given_prefix) != prefix:
        raise _invalid(f"{label} header does not use {prefix}")
    raw = _unhex(hexpart)
    if raw is None:
        raise _invalid(f"malformed {label} header")
    return raw


def _mac(key: bytes, message: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key, message, getattr(hashlib, algorithm)).digest()


def _any_match(expected: bytes, candidates: Sequence[bytes]) -> bool:
    # Look at every candidate so the time taken does not say which one matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    return matched


def _standard_key(secret: str) -> bytes:
    if not secret.startswith(_STANDARD_PREFIX):
        raise ValueError("a 'standard' webhook secret must look like whsec_<base64>")
    encoded = secret[len(_STANDARD_PREFIX) :]
    encoded += "=" * (-len(encoded) % 4)  # tolerate secrets copied without their padding
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a 'standard' webhook secret must look like whsec_<base64>") from None
    if not key:
        raise ValueError("a 'standard' webhook secret must not be empty")
    return key


def json_field(body: bytes, name: str) -> str | None:
    """A top-level string field of a JSON object body, or None (not JSON, absent, not a string).

    Best effort on purpose: it picks replay ids (Stripe ``id``, Slack ``event_id``) out of bodies
    that have already been authenticated, and must never turn odd input into an exception.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError, TypeError):
        return None
    if not isinstance(doc, dict):
        return None
    value = doc.get(name)
    return value if isinstance(value, str) else None


# --- configuration checks ----------------------------------------------------------------------


def check_scheme(scheme: str, secret: str, algorithm: str = "sha256") -> None:
    """Refuse a hook configuration that could never verify anything (ValueError)."""
    if scheme not in SCHEMES:
        known = ", ".join(sorted(SCHEMES))
        raise ValueError(f"unknown webhook scheme {scheme!r} (expected one of {known})")
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"unsupported webhook algorithm {algorithm!r} (expected one of {', '.join(ALGORITHMS)})"
        )
    if scheme != "hmac" and algorithm != "sha256":
        raise ValueError(f"the {scheme!r} scheme always uses sha256; 'algorithm' is for hmac only")
    if not isinstance(secret, str) or not secret:
        raise ValueError("a webhook needs a non-empty secret")
    if scheme == "standard":
        _standard_key(secret)


def check_discord_public_key(public_key_hex: str) -> None:
    """Refuse a Discord ``public_key`` that is not 32 bytes of hex (ValueError)."""
    _discord_key(public_key_hex)


@functools.lru_cache(maxsize=16)
def _discord_key(public_key_hex: str) -> nacl.signing.VerifyKey:
    raw = _unhex(public_key_hex.strip()) if isinstance(public_key_hex, str) else None
    if raw is None or len(raw) != 32:
        raise ValueError("a Discord public_key must be 64 hex digits (an Ed25519 public key)")
    return nacl.signing.VerifyKey(raw)


# --- verification ------------------------------------------------------------------------------


def verify(
    scheme: str,
    secret: str,
    headers: HeadersLike,
    body: bytes,
    *,
    now: float,
    max_age_s: int = 300,
    algorithm: str = "sha256",
) -> Verified:
    """Check one inbound hook delivery; raise a 401 GatewayError unless it is authentic and fresh.

    ``body`` must be the raw bytes as received. A bad configuration raises ValueError.
    """
    check_scheme(scheme, secret, algorithm)
    view = _Headers(headers)
    key = secret.encode("utf-8")
    if scheme == "hmac":
        return _verify_hmac(key, view, body, now, max_age_s, algorithm)
    if scheme == "github":
        return _verify_github(key, view, body)
    if scheme == "standard":
        return _verify_standard(_standard_key(secret), view, body, now, max_age_s)
    if scheme == "slack":
        return _verify_slack(key, view, body, now, max_age_s)
    return _verify_stripe(key, view, body, now, max_age_s)


def _verify_hmac(
    key: bytes, h: _Headers, body: bytes, now: float, max_age_s: int, algorithm: str
) -> Verified:
    label = "X-Signature"
    value = h.get("x-signature", label)
    if value is None:
        label = "X-Hub-Signature-256"
        value = h.get("x-hub-signature-256", label)
    if value is None:
        raise _missing("X-Signature")
    given = _prefixed_hex(value, algorithm, label)
    # The timestamp is optional (CONTRACT §9), so a sender that signs "{ts}.{body}" cannot stop
    # that delivery being replayed without the header as the body "{ts}.{body}": such hooks rely
    # on X-Webhook-Id for replay protection, as the docs say.
    ts_text = h.get("x-signature-timestamp", "X-Signature-Timestamp")
    delivery_id = h.get("x-webhook-id", "X-Webhook-Id")
    ts: int | None = None
    signed = body
    if ts_text is not None:
        ts = _timestamp(ts_text, "X-Signature-Timestamp")
        signed = ts_text.encode("ascii") + b"." + body
    if not hmac.compare_digest(_mac(key, signed, algorithm), given):
        raise _invalid(f"{label} does not match")
    if ts is not None:
        _check_age(ts, now, max_age_s)
    return Verified(delivery_id=delivery_id, timestamp=ts)


def _verify_github(key: bytes, h: _Headers, body: bytes) -> Verified:
    label = "X-Hub-Signature-256"
    given = _prefixed_hex(_require(h, "x-hub-signature-256", label), "sha256", label)
    delivery_id = h.get("x-github-delivery", "X-GitHub-Delivery")
    if not hmac.compare_digest(_mac(key, body), given):
        raise _invalid(f"{label} does not match")
    return Verified(delivery_id=delivery_id, timestamp=None)


def _verify_standard(key: bytes, h: _Headers, body: bytes, now: float, max_age_s: int) -> Verified:
    msg_id = _require(h, "webhook-id", "webhook-id")
    ts_text = _require(h, "webhook-timestamp", "webhook-timestamp")
    signatures = _require(h, "webhook-signature", "webhook-signature")
    ts = _timestamp(ts_text, "webhook-timestamp")
    candidates = []
    for entry in signatures.split():
        version, sep, encoded = entry.partition(",")
        if version == "v1" and sep:
            raw = _unb64(encoded)
            if raw is not None:
                candidates.append(raw)
    if not candidates:
        raise _invalid("webhook-signature has no well-formed v1 signature")
    signed = f"{msg_id}.{ts_text}.".encode("ascii") + body
    if not _any_match(_mac(key, signed), candidates):
        raise _invalid("webhook-signature does not match")
    _check_age(ts, now, max_age_s)
    return Verified(delivery_id=msg_id, timestamp=ts)


def _verify_slack(key: bytes, h: _Headers, body: bytes, now: float, max_age_s: int) -> Verified:
    label = "X-Slack-Signature"
    given = _prefixed_hex(_require(h, "x-slack-signature", label), "v0", label)
    ts_text = _require(h, "x-slack-request-timestamp", "X-Slack-Request-Timestamp")
    ts = _timestamp(ts_text, "X-Slack-Request-Timestamp")
    signed = b"v0:" + ts_text.encode("ascii") + b":" + body
    if not hmac.compare_digest(_mac(key, signed), given):
        raise _invalid(f"{label} does not match")
    _check_age(ts, now, max_age_s)
    return Verified(delivery_id=json_field(body, "event_id"), timestamp=ts)


def _verify_stripe(key: bytes, h: _Headers, body: bytes, now: float, max_age_s: int) -> Verified:
    label = "Stripe-Signature"
    header = _require(h, "stripe-signature", label)
    stamps: list[str] = []
    candidates: list[bytes] = []
    for item in header.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise _invalid(f"malformed {label} header")
        if name == "t":
            stamps.append(value)
        elif name == "v1":
            raw = _unhex(value)
            if raw is not None:
                candidates.append(raw)
    if len(stamps) != 1:
        raise _invalid(f"malformed {label} header")
    ts_text = stamps[0]
    ts = _timestamp(ts_text, f"{label} timestamp")
    if not candidates:
        raise _invalid(f"{label} has no well-formed v1 signature")
    signed = ts_text.encode("ascii") + b"." + body
    if not _any_match(_mac(key, signed), candidates):
        raise _invalid(f"{label} does not match")
    _check_age(ts, now, max_age_s)
    return Verified(delivery_id=json_field(body, "id"), timestamp=ts)


def verify_discord(
    public_key_hex: str,
    headers: HeadersLike,
    body: bytes,
    *,
    now: float,
    max_age_s: int = 300,
) -> None:
    """Check a Discord interaction: Ed25519 over timestamp + body with the application's key."""
    verify_key = _discord_key(public_key_hex)
    view = _Headers(headers)
    sig_text = _require(view, "x-signature-ed25519", "X-Signature-Ed25519")
    ts_text = _require(view, "x-signature-timestamp", "X-Signature-Timestamp")
    signature = _unhex(sig_text)
    if signature is None or len(signature) != 64:
        raise _invalid("malformed X-Signature-Ed25519 header")
    ts = _timestamp(ts_text, "X-Signature-Timestamp")
    try:
        verify_key.verify(ts_text.encode("ascii") + body, signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise _invalid("X-Signature-Ed25519 does not match") from None
    _check_age(ts, now, max_age_s)


def verify_telegram(expected_secret: str, headers: HeadersLike) -> None:
    """Check Telegram's shared secret header in constant time."""
    if not expected_secret:
        raise ValueError("the Telegram bridge needs a non-empty webhook_secret_token")
    label = "X-Telegram-Bot-Api-Secret-Token"
    given = _require(_Headers(headers), "x-telegram-bot-api-secret-token", label)
    if not hmac.compare_digest(given.encode("ascii"), expected_secret.encode("utf-8")):
        raise _invalid(f"{label} does not match")


# --- signing -----------------------------------------------------------------------------------


def _header_text(value: str, what: str) -> str:
    if _HEADER_TEXT.fullmatch(value) is None:
        raise ValueError(f"{what} must be printable ASCII without surrounding spaces")
    return value


def _ts_text(timestamp: int) -> str:
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise ValueError("timestamp must be a non-negative integer (unix seconds)")
    return str(timestamp)


def sign(
    scheme: str,
    secret: str,
    body: bytes,
    *,
    timestamp: int,
    delivery_id: str | None = None,
    algorithm: str = "sha256",
    timestamped: bool = False,
) -> dict[str, str]:
    """The headers a sender using ``scheme`` would set for ``body`` (tests, outbound bridge).

    ``timestamped`` only affects ``hmac`` (adds ``X-Signature-Timestamp``); ``delivery_id`` is
    the replay id header where the scheme has one and is required for ``standard``.
    """
    check_scheme(scheme, secret, algorithm)
    ts = _ts_text(timestamp)
    if delivery_id is not None:
        _header_text(delivery_id, "delivery_id")
    key = secret.encode("utf-8")
    if scheme == "hmac":
        signed = f"{ts}.".encode("ascii") + body if timestamped else body
        headers = {"X-Signature": f"{algorithm}={_mac(key, signed, algorithm).hex()}"}
        if timestamped:
            headers["X-Signature-Timestamp"] = ts
        if delivery_id is not None:
            headers["X-Webhook-Id"] = delivery_id
        return headers
    if scheme == "github":
        headers = {"X-Hub-Signature-256": f"sha256={_mac(key, body).hex()}"}
        if delivery_id is not None:
            headers["X-GitHub-Delivery"] = delivery_id
        return headers
    if scheme == "standard":
        if delivery_id is None:
            raise ValueError("the 'standard' scheme signs a message id: pass delivery_id")
        return standard_webhook_headers(secret, delivery_id, timestamp, body)
    if scheme == "slack":
        digest = _mac(key, f"v0:{ts}:".encode("ascii") + body).hex()
        return {"X-Slack-Signature": f"v0={digest}", "X-Slack-Request-Timestamp": ts}
    digest = _mac(key, f"{ts}.".encode("ascii") + body).hex()
    return {"Stripe-Signature": f"t={ts},v1={digest}"}


def standard_webhook_headers(
    secret: str, msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Standard Webhooks headers for one outbound message (the webhook bridge signs with these)."""
    key = _standard_key(secret)
    _header_text(msg_id, "msg_id")
    ts = _ts_text(timestamp)
    digest = _mac(key, f"{msg_id}.{ts}.".encode("ascii") + body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": ts,
        "webhook-signature": "v1," + base64.b64encode(digest).decode("ascii"),
    }


def sign_discord(seed_hex: str, body: bytes, *, timestamp: int) -> dict[str, str]:
    """Discord's interaction headers from an Ed25519 seed (for tests and local stand-ins)."""
    seed = _unhex(seed_hex)
    if seed is None or len(seed) != 32:
        raise ValueError("an Ed25519 seed must be 64 hex digits")
    ts = _ts_text(timestamp)
    signed = nacl.signing.SigningKey(seed).sign(ts.encode("ascii") + body)
    return {"X-Signature-Ed25519": signed.signature.hex(), "X-Signature-Timestamp": ts}
