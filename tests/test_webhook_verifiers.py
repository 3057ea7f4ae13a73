"""Webhook verifiers: published known-answer vectors, then properties over random deliveries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.errors import GatewayError
from gatewayd.webhooks import (
    ALGORITHMS,
    SCHEMES,
    Verified,
    check_discord_public_key,
    check_scheme,
    json_field,
    sign,
    sign_discord,
    standard_webhook_headers,
    verify,
    verify_discord,
    verify_telegram,
)

NOW = 1_700_000_000
MAX_AGE = 300
CODES = {"missing_signature", "invalid_signature", "stale_signature"}
PROPS = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def rejected(fn: Callable[[], object], code: str | None = None) -> GatewayError:
    """Run ``fn``; it must fail with a 401 webhook GatewayError (of ``code`` when given)."""
    with pytest.raises(GatewayError) as info:
        fn()
    err = info.value
    assert err.status == 401
    assert err.code in CODES
    if code is not None:
        assert err.code == code, err
    return err


# --- known-answer vectors ----------------------------------------------------------------------

GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIG = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_TS = "1531420618"
SLACK_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow"
    b"&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner"
    b"&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands"
    b"%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_SIG = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"

STD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STD_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
STD_TS = 1614265330
STD_BODY = b'{"test": 2432232314}'
STD_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_github_vector() -> None:
    headers = {"X-Hub-Signature-256": GITHUB_SIG, "X-GitHub-Delivery": "d-1"}
    assert verify("github", GITHUB_SECRET, headers, GITHUB_BODY, now=NOW) == Verified("d-1", None)
    assert sign("github", GITHUB_SECRET, GITHUB_BODY, timestamp=NOW) == {
        "X-Hub-Signature-256": GITHUB_SIG
    }
    # The plain hmac scheme reads the same header and value.
    assert verify("hmac", GITHUB_SECRET, headers, GITHUB_BODY, now=NOW) == Verified(None, None)
    rejected(lambda: verify("github", GITHUB_SECRET, headers, b"Hello, World?", now=NOW))
    bad = {"X-Hub-Signature-256": GITHUB_SIG[:-1] + "f"}
    err = rejected(lambda: verify("github", GITHUB_SECRET, bad, GITHUB_BODY, now=NOW))
    assert err.code == "invalid_signature"
    assert GITHUB_SECRET not in err.message and GITHUB_SIG[7:] not in err.message
    rejected(lambda: verify("github", "another secret", headers, GITHUB_BODY, now=NOW))


def test_slack_vector() -> None:
    headers = {"X-Slack-Signature": SLACK_SIG, "X-Slack-Request-Timestamp": SLACK_TS}
    now = int(SLACK_TS) + 12
    got = verify("slack", SLACK_SECRET, headers, SLACK_BODY, now=now)
    assert got == Verified(None, int(SLACK_TS))  # a form body has no event_id
    assert sign("slack", SLACK_SECRET, SLACK_BODY, timestamp=int(SLACK_TS)) == headers
    rejected(lambda: verify("slack", SLACK_SECRET, headers, SLACK_BODY + b"&", now=now))
    moved = {**headers, "X-Slack-Request-Timestamp": str(int(SLACK_TS) + 1)}
    rejected(lambda: verify("slack", SLACK_SECRET, moved, SLACK_BODY, now=now), "invalid_signature")
    rejected(
        lambda: verify("slack", SLACK_SECRET, headers, SLACK_BODY, now=now + MAX_AGE),
        "stale_signature",
    )


def test_standard_webhooks_vector() -> None:
    headers = {"webhook-id": STD_ID, "webhook-timestamp": str(STD_TS), "webhook-signature": STD_SIG}
    assert verify("standard", STD_SECRET, headers, STD_BODY, now=STD_TS) == Verified(STD_ID, STD_TS)
    assert standard_webhook_headers(STD_SECRET, STD_ID, STD_TS, STD_BODY) == headers
    assert sign("standard", STD_SECRET, STD_BODY, timestamp=STD_TS, delivery_id=STD_ID) == headers
    # Any one matching v1 entry in the list is enough; other versions are ignored.
    several = {**headers, "webhook-signature": f"v1a,xyz= v1,{'A' * 43}= {STD_SIG}"}
    assert verify("standard", STD_SECRET, several, STD_BODY, now=STD_TS).delivery_id == STD_ID
    rejected(lambda: verify("standard", STD_SECRET, headers, b'{"test": 2432232315}', now=STD_TS))
    other_id = {**headers, "webhook-id": STD_ID + "x"}
    rejected(lambda: verify("standard", STD_SECRET, other_id, STD_BODY, now=STD_TS))
    rejected(
        lambda: verify("standard", STD_SECRET, headers, STD_BODY, now=STD_TS - MAX_AGE - 1),
        "stale_signature",
    )


def test_stripe_computed_independently() -> None:
    secret = "whsec_test_secret"
    body = b'{"id": "evt_123", "object": "event"}'
    ts = NOW - 10
    digest = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    header = {"Stripe-Signature": f"t={ts},v1={'0' * 64},v1={digest},v0=abc"}
    assert verify("stripe", secret, header, body, now=NOW) == Verified("evt_123", ts)
    assert sign("stripe", secret, body, timestamp=ts) == {"Stripe-Signature": f"t={ts},v1={digest}"}
    for bad in (f"v1={digest}", f"t={ts}", f"t={ts},t={ts},v1={digest}", f"t={ts},v1{digest}"):
        rejected(partial(verify, "stripe", secret, {"Stripe-Signature": bad}, body, now=NOW))


def test_hmac_algorithms_and_timestamp() -> None:
    secret, body = "s3cret", b"payload"
    for alg in ALGORITHMS:
        digest = hmac.new(secret.encode(), body, alg).hexdigest()
        headers = {"X-Signature": f"{alg}={digest}", "X-Webhook-Id": "w-1"}
        assert verify("hmac", secret, headers, body, now=NOW, algorithm=alg) == Verified(
            "w-1", None
        )
        for other in ALGORITHMS:
            if other != alg:  # the prefix must be the hook's algorithm
                with pytest.raises(GatewayError) as info:
                    verify("hmac", secret, headers, body, now=NOW, algorithm=other)
                assert info.value.code == "invalid_signature"
    signed = sign("hmac", secret, body, timestamp=NOW, algorithm="sha384", timestamped=True)
    expected = hmac.new(secret.encode(), f"{NOW}.".encode() + body, "sha384").hexdigest()
    assert signed == {"X-Signature": f"sha384={expected}", "X-Signature-Timestamp": str(NOW)}
    assert verify("hmac", secret, signed, body, now=NOW, algorithm="sha384").timestamp == NOW
    rejected(
        lambda: verify("hmac", secret, signed, body, now=NOW + 301, algorithm="sha384"),
        "stale_signature",
    )
    # Uppercase hex is the same signature.
    upper = {
        "X-SIGNATURE": f"sha256={hmac.new(secret.encode(), body, 'sha256').hexdigest().upper()}"
    }
    assert verify("hmac", secret, upper, body, now=NOW) == Verified(None, None)


@pytest.mark.parametrize(
    "value",
    [
        "sha256=abc",  # odd length
        "sha256=zz" * 32,  # not hex
        "sha256=" + "ab " * 32,  # bytes.fromhex would accept spaces
        "sha256",
        "=" + "ab" * 32,
        "sha1=" + "ab" * 20,
        "sha256=" + "ab" * 31 + "\u0661\u0662",  # non-ASCII digits
        b"sha256=\xff\xfe",
    ],
)
def test_malformed_hmac_values_are_invalid(value: str | bytes) -> None:
    rejected(
        lambda: verify("hmac", "k", {"X-Signature": value}, b"x", now=NOW), "invalid_signature"
    )


@pytest.mark.parametrize("headers", [{}, {"X-Signature": ""}, {"x-signature": b"  "}])
def test_absent_or_empty_signature_is_missing(headers: dict[str, Any]) -> None:
    rejected(lambda: verify("hmac", "k", headers, b"x", now=NOW), "missing_signature")
    rejected(lambda: verify("github", "k", headers, b"x", now=NOW), "missing_signature")


@pytest.mark.parametrize("ts", ["", "12a", "-5", "1.5", "1e9", "\u0661\u0662", "9" * 40, " "])
def test_malformed_timestamps(ts: str) -> None:
    body = b"{}"
    for scheme in ("slack", "standard", "stripe", "hmac"):
        headers = sign(scheme, STD_SECRET, body, timestamp=NOW, delivery_id="id", timestamped=True)
        for name in headers:
            if "timestamp" in name.lower():
                headers[name] = ts
        if scheme == "stripe":
            headers["Stripe-Signature"] = headers["Stripe-Signature"].replace(f"t={NOW}", f"t={ts}")

        # Empty counts as absent: missing for required headers, unsigned-by-time for hmac.
        def attempt(scheme: str = scheme, headers: dict[str, str] = headers) -> object:
            return verify(scheme, STD_SECRET, headers, body, now=NOW)

        err = rejected(attempt)
        if ts.strip():
            assert err.code == "invalid_signature"


def test_header_containers() -> None:
    from twisted.web.http_headers import Headers

    body = b"hi"
    signed = sign("hmac", "k", body, timestamp=NOW, delivery_id="id-9", timestamped=True)
    twisted_headers = Headers({k.encode(): [v.encode()] for k, v in signed.items()})
    assert verify("hmac", "k", twisted_headers, body, now=NOW) == Verified("id-9", NOW)
    byte_keys = {k.lower().encode(): v.encode() for k, v in signed.items()}
    assert verify("hmac", "k", byte_keys, body, now=NOW) == Verified("id-9", NOW)
    lists: dict[str, list[str | bytes]] = {k.upper(): [v] for k, v in signed.items()}
    assert verify("hmac", "k", lists, body, now=NOW) == Verified("id-9", NOW)
    # Repeating a header with the same value is fine; with different values it is refused.
    same: dict[str, list[str | bytes]] = {**lists, "X-Webhook-Id": [b"id-9", "id-9"]}
    assert verify("hmac", "k", same, body, now=NOW).delivery_id == "id-9"
    clash = {**signed, "x-signature-timestamp": str(NOW + 1)}
    rejected(lambda: verify("hmac", "k", clash, body, now=NOW), "invalid_signature")
    # A Kelvin sign does not lower-case into a real header name.
    kelvin = {"X-Signature-Timestamp": signed["X-Signature-Timestamp"], "X-Webhoo\u212a-Id": "x"}
    kelvin["X-Signature"] = signed["X-Signature"]
    assert verify("hmac", "k", kelvin, body, now=NOW).delivery_id is None


def test_check_scheme() -> None:
    for scheme in sorted(SCHEMES - {"standard"}):
        check_scheme(scheme, "secret")
    check_scheme("standard", STD_SECRET)
    check_scheme("standard", STD_SECRET.rstrip("="))  # unpadded base64 is tolerated
    for alg in ALGORITHMS:
        check_scheme("hmac", "secret", alg)
    bad: list[tuple[str, str, str]] = [
        ("svix", "secret", "sha256"),
        ("hmac", "secret", "sha1"),
        ("hmac", "secret", "md5"),
        ("github", "secret", "sha512"),
        ("hmac", "", "sha256"),
        ("stripe", "", "sha256"),
        ("standard", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "sha256"),
        ("standard", "whsec_", "sha256"),
        ("standard", "whsec_not*base64!", "sha256"),
    ]
    for scheme, secret, alg in bad:
        with pytest.raises(ValueError) as info:
            check_scheme(scheme, secret, alg)
        assert not secret or secret not in str(info.value)
    with pytest.raises(ValueError):
        verify("svix", "secret", {}, b"", now=NOW)
    with pytest.raises(ValueError):
        verify("hmac", "", {"X-Signature": "sha256=00"}, b"", now=NOW)


def test_signer_guards() -> None:
    with pytest.raises(ValueError):
        sign("standard", STD_SECRET, b"", timestamp=NOW)  # needs a message id
    with pytest.raises(ValueError):
        sign("hmac", "k", b"", timestamp=NOW, delivery_id="a\r\nX-Evil: 1")
    with pytest.raises(ValueError):
        standard_webhook_headers(STD_SECRET, "id", -1, b"")
    with pytest.raises(ValueError):
        sign("unknown", "k", b"", timestamp=NOW)


def test_json_field() -> None:
    assert json_field(b'{"id": "evt_1", "n": 1}', "id") == "evt_1"
    assert json_field(b'{"id": "evt_1", "n": 1}', "n") is None
    assert json_field(b'{"id": "evt_1"}', "event_id") is None
    assert json_field(b'["id"]', "id") is None
    assert json_field(b"id=evt_1", "id") is None
    assert json_field(b"\xff\xfe\x00", "id") is None
    assert json_field(b"[" * 100_000, "id") is None
    assert json_field(b'{"a": {"id": "inner"}}', "id") is None
    assert json_field('{"id": "é"}'.encode("utf-16"), "id") == "é"


# --- properties --------------------------------------------------------------------------------

TIMESTAMPED = {"standard", "slack", "stripe"}
OTHER_STD_SECRET = "whsec_" + base64.b64encode(b"another key").decode()
ID_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
ids = st.text(ID_CHARS, min_size=1, max_size=40)
text_secrets = st.text(min_size=1, max_size=40)
std_secrets = st.binary(min_size=1, max_size=64).map(
    lambda raw: "whsec_" + base64.b64encode(raw).decode()
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Raw bytes, or a JSON object carrying the replay-id fields Slack and Stripe use."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    doc = {"id": draw(ids), "event_id": draw(ids), "text": draw(st.text(max_size=50))}
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def deliveries(draw: st.DrawFn, scheme: str) -> dict[str, Any]:
    secret = draw(std_secrets if scheme == "standard" else text_secrets)
    algorithm = draw(st.sampled_from(ALGORITHMS)) if scheme == "hmac" else "sha256"
    timestamped = scheme in TIMESTAMPED or (scheme == "hmac" and draw(st.booleans()))
    ts = NOW + draw(st.integers(-MAX_AGE, MAX_AGE))
    delivery_id = draw(ids) if scheme == "standard" else draw(st.none() | ids)
    body = draw(bodies())
    headers = sign(
        scheme,
        secret,
        body,
        timestamp=ts,
        delivery_id=delivery_id,
        algorithm=algorithm,
        timestamped=timestamped,
    )
    return {
        "scheme": scheme,
        "secret": secret,
        "algorithm": algorithm,
        "timestamped": timestamped,
        "ts": ts,
        "delivery_id": delivery_id,
        "body": body,
        "headers": headers,
    }


def expected_result(d: dict[str, Any]) -> Verified:
    scheme, body = d["scheme"], d["body"]
    ts = d["ts"] if d["timestamped"] else None
    if scheme == "slack":
        return Verified(json_field(body, "event_id"), ts)
    if scheme == "stripe":
        return Verified(json_field(body, "id"), ts)
    return Verified(d["delivery_id"], ts)


def check(d: dict[str, Any], headers: Mapping[str, Any], body: bytes) -> Verified:
    return verify(
        d["scheme"],
        d["secret"],
        headers,
        body,
        now=NOW,
        max_age_s=MAX_AGE,
        algorithm=d["algorithm"],
    )


def recase(data: st.DataObject, headers: dict[str, str]) -> dict[str, str | bytes]:
    """The same headers with random name case and random str/bytes values."""
    out: dict[str, str | bytes] = {}
    for name, value in headers.items():
        mask = data.draw(MASKS)  # one draw per header: bit i upper-cases letter i
        name = "".join(c.upper() if mask >> i & 1 else c.lower() for i, c in enumerate(name))
        out[name] = value.encode() if mask & 1 << 40 else value
    return out


MASKS = st.integers(0, 2**41 - 1)


def signature_header(scheme: str) -> str:
    return {
        "hmac": "X-Signature",
        "github": "X-Hub-Signature-256",
        "standard": "webhook-signature",
        "slack": "X-Slack-Signature",
        "stripe": "Stripe-Signature",
    }[scheme]


def flip_signature(scheme: str, value: str, bit: int) -> str:
    """Flip one bit of the signature itself, keeping its encoding well formed."""
    if scheme == "standard":
        raw = bytearray(base64.b64decode(value[3:]))
        raw[bit % len(raw)] ^= 1 << (bit % 8)
        return "v1," + base64.b64encode(bytes(raw)).decode()
    prefix, hexpart = value.rsplit("=", 1)
    raw = bytearray(bytes.fromhex(hexpart))
    raw[bit % len(raw)] ^= 1 << (bit % 8)
    return f"{prefix}={raw.hex()}"


def flip_body(data: st.DataObject, body: bytes) -> bytes:
    how = data.draw(st.sampled_from(["flip", "append", "truncate"] if body else ["append"]))
    if how == "append":
        return body + data.draw(st.binary(min_size=1, max_size=3))
    if how == "truncate":
        return body[: data.draw(st.integers(0, len(body) - 1))]
    i = data.draw(st.integers(0, len(body) - 1))
    return body[:i] + bytes([body[i] ^ (1 << data.draw(st.integers(0, 7)))]) + body[i + 1 :]


def move_timestamp(d: dict[str, Any], headers: dict[str, str], new_ts: str) -> dict[str, str]:
    headers = dict(headers)
    scheme = d["scheme"]
    if scheme == "stripe":
        headers["Stripe-Signature"] = headers["Stripe-Signature"].replace(
            f"t={d['ts']},", f"t={new_ts},"
        )
    elif scheme == "slack":
        headers["X-Slack-Request-Timestamp"] = new_ts
    elif scheme == "standard":
        headers["webhook-timestamp"] = new_ts
    else:  # hmac: moving, adding or removing the timestamp all change what was signed
        headers["X-Signature-Timestamp"] = new_ts
    return headers


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_signed_is_accepted_and_any_change_rejected(scheme: str) -> None:
    signed_then_tampered(scheme)


@PROPS
@given(data=st.data())
def signed_then_tampered(scheme: str, data: st.DataObject) -> None:
    d = data.draw(deliveries(scheme))
    headers, body = d["headers"], d["body"]
    assert check(d, headers, body) == expected_result(d)
    assert check(d, recase(data, headers), body) == expected_result(d)

    kinds = ["body", "signature", "drop"]
    if scheme != "github":
        kinds.append("timestamp")
    if scheme == "standard":
        kinds.append("id")
    kind = data.draw(st.sampled_from(kinds))
    bad_headers, bad_body = dict(headers), body
    if kind == "body":
        bad_body = flip_body(data, body)
    elif kind == "signature":
        name = signature_header(scheme)
        if scheme == "stripe":
            t, v1 = headers[name].split(",")
            bad_headers[name] = t + "," + flip_signature(scheme, v1, data.draw(st.integers(0, 511)))
        else:
            bad_headers[name] = flip_signature(
                scheme, headers[name], data.draw(st.integers(0, 511))
            )
    elif kind == "drop":
        # Ids outside the signed content (hmac, github) only guard against replay.
        signed_names = sorted(set(headers) - {"X-Webhook-Id", "X-GitHub-Delivery"})
        bad_headers.pop(data.draw(st.sampled_from(signed_names)))
    elif kind == "timestamp":
        delta = data.draw(st.integers(-MAX_AGE, MAX_AGE).filter(bool))
        new_ts = data.draw(st.sampled_from([str(d["ts"] + delta), "0" + str(d["ts"])]))
        bad_headers = move_timestamp(d, headers, new_ts)
    else:
        bad_headers["webhook-id"] = data.draw(ids.filter(lambda i: i != d["delivery_id"]))
    err = rejected(lambda: check(d, recase(data, bad_headers), bad_body))
    assert err.code != "stale_signature" or kind == "timestamp"
    # The message is the same under another secret, so it cannot carry the secret, and it
    # never echoes a signature (the genuine one or the one sent).
    other = {**d, "secret": OTHER_STD_SECRET if scheme == "standard" else d["secret"] + "!"}
    assert rejected(lambda: check(other, bad_headers, bad_body)).message == err.message
    name = signature_header(scheme)
    for value in (headers[name], bad_headers.get(name, "")):
        for token in re.findall(r"[A-Za-z0-9+/]{16,}", value):
            assert token not in err.message


@pytest.mark.parametrize("scheme", sorted(TIMESTAMPED | {"hmac"}))
def test_correctly_signed_but_old_or_future_is_stale(scheme: str) -> None:
    signed_but_stale(scheme)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def signed_but_stale(scheme: str, data: st.DataObject) -> None:
    d = data.draw(deliveries(scheme))
    d["timestamped"] = True
    offset = data.draw(st.integers(MAX_AGE + 1, 10**9)) * data.draw(st.sampled_from([-1, 1]))
    ts = max(0, NOW + offset)
    headers = sign(
        scheme,
        d["secret"],
        d["body"],
        timestamp=ts,
        delivery_id=d["delivery_id"],
        algorithm=d["algorithm"],
        timestamped=True,
    )
    rejected(lambda: check(d, headers, d["body"]), "stale_signature")


ALL_HEADER_NAMES = [
    "X-Signature",
    "X-Hub-Signature-256",
    "X-Signature-Timestamp",
    "X-Webhook-Id",
    "X-GitHub-Delivery",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "X-Slack-Signature",
    "X-Slack-Request-Timestamp",
    "Stripe-Signature",
    "X-Signature-Ed25519",
    "X-Telegram-Bot-Api-Secret-Token",
]
garbage_text = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda p, t: p + t,
        st.sampled_from(["sha256=", "sha512=", "v0=", "v1,", "t=1700000000,v1=", "t=", " v1,"]),
        st.one_of(st.text(max_size=80), st.text("0123456789abcdefABCDEF=,+/ ", max_size=140)),
    ),
    st.integers(-(10**20), 10**20).map(str),
)
garbage_value = st.one_of(
    garbage_text,
    garbage_text.map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=80),
    st.lists(st.one_of(garbage_text, st.binary(max_size=20)), max_size=3),
    st.none(),
)


@st.composite
def garbage_headers(draw: st.DrawFn) -> dict[Any, Any]:
    names = draw(st.lists(st.sampled_from(ALL_HEADER_NAMES) | st.text(max_size=20), max_size=8))
    out: dict[Any, Any] = {}
    for name in names:
        name = name.upper() if draw(st.booleans()) else name
        key = name.encode("utf-8", "surrogatepass") if draw(st.booleans()) else name
        out[key] = draw(garbage_value)
    return out


DISCORD_SEED = bytes(range(32))
DISCORD_KEY = nacl.signing.SigningKey(DISCORD_SEED)
DISCORD_PUBLIC = DISCORD_KEY.verify_key.encode().hex()


def only_401(fn: Callable[[], object]) -> None:
    try:
        fn()
    except GatewayError as err:
        assert err.status == 401 and err.code in CODES, err


EDITS = st.tuples(
    st.integers(0, 3),  # which header
    st.integers(0, 200),  # where
    st.sampled_from(["delete", "insert", "replace", "truncate"]),
    st.characters() | st.sampled_from(list("=, v1tA+/0")),
)


def edited(headers: dict[str, str], edits: list[tuple[int, int, str, str]]) -> dict[str, str]:
    """Character-level edits of real header values: near misses of every format."""
    out = dict(headers)
    names = sorted(out)
    for which, where, op, char in edits:
        name = names[which % len(names)]
        value = out[name]
        i = where % (len(value) + 1)
        if op == "delete":
            value = value[:i] + value[i + 1 :]
        elif op == "insert":
            value = value[:i] + char + value[i:]
        elif op == "replace":
            value = value[:i] + char + value[i + 1 :]
        else:
            value = value[:i]
        out[name] = value
    return out


def test_garbage_headers_only_ever_give_401() -> None:
    garbage_gives_401()


@PROPS
@given(
    headers=garbage_headers(),
    replacements=st.dictionaries(st.sampled_from(ALL_HEADER_NAMES), garbage_value, max_size=2),
    edits=st.lists(EDITS, max_size=3),
    body=st.binary(max_size=100),
    alg=st.sampled_from(ALGORITHMS),
)
def garbage_gives_401(
    headers: dict[Any, Any],
    replacements: dict[str, Any],
    edits: list[tuple[int, int, str, str]],
    body: bytes,
    alg: str,
) -> None:
    """Every verifier sees each of the 1,000 examples: a garbage header set, and a correctly
    signed set with character edits and some values replaced by garbage (so that parsing gets
    past the presence checks and meets near-valid values)."""
    for scheme in sorted(SCHEMES):
        secret = STD_SECRET if scheme == "standard" else "garbage-secret"
        algorithm = alg if scheme == "hmac" else "sha256"
        signed = sign(scheme, secret, body, timestamp=NOW, delivery_id="id-1", algorithm=algorithm)
        for candidate in (headers, {**edited(signed, edits), **replacements}):
            only_401(partial(verify, scheme, secret, candidate, body, now=NOW, algorithm=algorithm))
    discord = {
        **edited(sign_discord(DISCORD_SEED.hex(), body, timestamp=NOW), edits),
        **replacements,
    }
    for candidate in (headers, discord):
        only_401(partial(verify_discord, DISCORD_PUBLIC, candidate, body, now=NOW))
        only_401(partial(verify_telegram, "tg-secret", candidate))


# --- Discord -----------------------------------------------------------------------------------


def test_discord_sign_and_tamper() -> None:
    body = b'{"type": 1}'
    ts = str(NOW)
    signature = DISCORD_KEY.sign(ts.encode() + body).signature.hex()
    headers = {"X-Signature-Ed25519": signature, "X-Signature-Timestamp": ts}
    assert sign_discord(DISCORD_SEED.hex(), body, timestamp=NOW) == headers
    verify_discord(DISCORD_PUBLIC, headers, body, now=NOW)
    verify_discord(
        DISCORD_PUBLIC, {k.lower(): v.encode() for k, v in headers.items()}, body, now=NOW
    )
    rejected(
        lambda: verify_discord(DISCORD_PUBLIC, headers, body + b" ", now=NOW), "invalid_signature"
    )
    moved = {**headers, "X-Signature-Timestamp": str(NOW + 1)}
    rejected(lambda: verify_discord(DISCORD_PUBLIC, moved, body, now=NOW), "invalid_signature")
    flipped = {
        **headers,
        "X-Signature-Ed25519": ("1" if signature[0] == "0" else "0") + signature[1:],
    }
    rejected(lambda: verify_discord(DISCORD_PUBLIC, flipped, body, now=NOW), "invalid_signature")
    other = nacl.signing.SigningKey.generate().verify_key.encode().hex()
    rejected(lambda: verify_discord(other, headers, body, now=NOW), "invalid_signature")
    rejected(
        lambda: verify_discord(DISCORD_PUBLIC, headers, body, now=NOW + MAX_AGE + 1),
        "stale_signature",
    )
    for bad in (
        "zz" * 64,
        signature[:-1],
        signature[:-2],
        signature + "00",
        "é" * 128,
        b"\xff" * 128,
    ):
        malformed = {**headers, "X-Signature-Ed25519": bad}
        rejected(
            partial(verify_discord, DISCORD_PUBLIC, malformed, body, now=NOW),
            "invalid_signature",
        )
    for drop in headers:
        headers_without = {k: v for k, v in headers.items() if k != drop}
        rejected(
            partial(verify_discord, DISCORD_PUBLIC, headers_without, body, now=NOW),
            "missing_signature",
        )
    for bad_key in ("", "00" * 31, "zz" * 32, DISCORD_PUBLIC + "00"):
        with pytest.raises(ValueError):
            check_discord_public_key(bad_key)
        with pytest.raises(ValueError):
            verify_discord(bad_key, headers, body, now=NOW)
    check_discord_public_key(DISCORD_PUBLIC)


def test_discord_properties() -> None:
    discord_properties()


@PROPS
@given(
    body=st.binary(max_size=200),
    ts=st.integers(NOW - MAX_AGE, NOW + MAX_AGE),
    bit=st.integers(0, 511),
)
def discord_properties(body: bytes, ts: int, bit: int) -> None:
    headers = sign_discord(DISCORD_SEED.hex(), body, timestamp=ts)
    verify_discord(DISCORD_PUBLIC, headers, body, now=NOW)
    sig = bytearray(bytes.fromhex(headers["X-Signature-Ed25519"]))
    sig[bit // 8] ^= 1 << (bit % 8)
    bad = {**headers, "X-Signature-Ed25519": sig.hex()}
    rejected(lambda: verify_discord(DISCORD_PUBLIC, bad, body, now=NOW), "invalid_signature")
    rejected(lambda: verify_discord(DISCORD_PUBLIC, headers, body + b"!", now=NOW))


# --- Telegram ----------------------------------------------------------------------------------


def test_telegram() -> None:
    secret = "tg_Secret-token_123"
    verify_telegram(secret, {"X-Telegram-Bot-Api-Secret-Token": secret})
    verify_telegram(secret, {b"x-telegram-bot-api-secret-token": secret.encode()})
    for wrong in (
        "tg_Secret-token_124",
        secret + "x",
        secret[:-1],
        "é",
        b"\xff\xfe",
        [secret, "x"],
    ):
        err = rejected(
            partial(verify_telegram, secret, {"X-Telegram-Bot-Api-Secret-Token": wrong}),
            "invalid_signature",
        )
        assert secret not in err.message
    rejected(lambda: verify_telegram(secret, {}), "missing_signature")
    rejected(
        lambda: verify_telegram(secret, {"X-Telegram-Bot-Api-Secret-Token": ""}),
        "missing_signature",
    )
    with pytest.raises(ValueError):
        verify_telegram("", {"X-Telegram-Bot-Api-Secret-Token": ""})
