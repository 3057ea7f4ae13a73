"""Tokens, devices, pairing, /admin, activity and secrets at rest.

The rules (expiry, revocation, lockouts, voiding) are driven on a ``Clock`` through the
operations table (``tests.clockgw``: a real Gateway with a synchronous store); the routes,
shapes, the loopback gate and persistence are then checked over real sockets.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from gatewayd import ops
from gatewayd.auth import Principal, TokenRegistry
from gatewayd.errors import GatewayError
from gatewayd.ops.devices import pairing_for
from gatewayd.ops.tokens import load_stored_tokens
from gatewayd.web.admin import is_local
from tests.clockgw import ClockGateway, clock_gateway
from tests.harness import ADMIN, OPERATOR, VIEWER, Running, auth, start_gateway

ADMIN_P = Principal(token_id="config:admin", role="admin", name="admin")
VIEWER_P = Principal(token_id="config:viewer", role="viewer", name="viewer")


def run(
    cg: ClockGateway,
    name: str,
    raw: dict[str, Any],
    *,
    who: Principal = ADMIN_P,
    peer: str = "192.0.2.1",
) -> Any:
    """Call one operation; with the synchronous store it has finished on return."""
    ops.load_all()
    out: list[Any] = []
    d = ops.call(cg.gw, name, who, raw, peer=peer)
    d.addBoth(out.append)
    assert out, f"{name} did not finish synchronously"
    result = out[0]
    if hasattr(result, "value") and isinstance(result.value, GatewayError):
        raise result.value
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def error_of(cg: ClockGateway, name: str, raw: dict[str, Any], **kw: Any) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        run(cg, name, raw, **kw)
    return info.value


@pytest.fixture
def cg(tmp_path: Any) -> ClockGateway:
    return clock_gateway(str(tmp_path))


# --- tokens -------------------------------------------------------------------------------------


def test_create_shows_the_token_once_and_stores_only_its_hash(cg: ClockGateway) -> None:
    made = run(cg, "tokens.create", {"name": "ci", "role": "operator"})
    assert set(made) == {"id", "token", "role", "name", "expires_at"}
    assert made["role"] == "operator" and made["name"] == "ci" and made["expires_at"] is None
    assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", made["token"])  # 256 bits, URL-safe
    principal = cg.gw.tokens.authenticate(made["token"])
    assert principal is not None and principal.token_id == made["id"]
    assert principal.role == "operator" and principal.kind == "api"
    rows = cg.sql("SELECT hash FROM tokens WHERE id = ?", made["id"])
    assert rows and rows[0][0] != made["token"] and len(rows[0][0]) == 64
    assert made["token"] not in repr(cg.sql("SELECT * FROM tokens"))
    listed = run(cg, "tokens.list", {})["tokens"]
    assert [t["id"] for t in listed] == [made["id"]]
    assert "token" not in listed[0] and "hash" not in listed[0]
    assert listed[0]["created_by"] == ADMIN_P.token_id
    created = cg.of_type("token_created")
    assert created and created[-1].payload == {
        "token_id": made["id"],
        "name": "ci",
        "role": "operator",
    }
    audit = cg.sql("SELECT actor, action, target FROM audit")
    assert ("config:admin", "token.create", made["id"]) in audit


def test_expiring_token(cg: ClockGateway) -> None:
    made = run(cg, "tokens.create", {"name": "short", "role": "chat", "expires_in_s": 60})
    assert made["expires_at"].endswith("Z")
    assert cg.gw.tokens.authenticate(made["token"]) is not None
    cg.clock.advance(59)
    assert cg.gw.tokens.authenticate(made["token"]) is not None
    cg.clock.advance(1)
    assert cg.gw.tokens.authenticate(made["token"]) is None


def test_revoke_fails_at_once_and_closes_streams(cg: ClockGateway) -> None:
    made = run(cg, "tokens.create", {"name": "x", "role": "chat"})
    principal = cg.gw.tokens.authenticate(made["token"])
    assert principal is not None
    closed: list[str] = []
    cg.gw.streams.open(principal, "sse", closed.append)
    cg.gw.streams.open(principal, "websocket", closed.append)
    assert run(cg, "tokens.revoke", {"token_id": made["id"]}) is None
    assert cg.gw.tokens.authenticate(made["token"]) is None
    assert closed == ["token revoked", "token revoked"]
    assert cg.gw.connections == {"websocket": 0, "sse": 0}
    assert cg.of_type("token_revoked")[-1].payload == {"token_id": made["id"]}
    assert ("config:admin", "token.revoke", made["id"]) in cg.sql(
        "SELECT actor, action, target FROM audit"
    )
    assert run(cg, "tokens.list", {})["tokens"] == []
    assert error_of(cg, "tokens.revoke", {"token_id": made["id"]}).code == "not_found"
    # a static token cannot be revoked here (and its streams are left alone)
    assert error_of(cg, "tokens.revoke", {"token_id": "config:admin"}).code == "not_found"


def test_stored_tokens_are_loaded_at_start(cg: ClockGateway) -> None:
    keep = run(cg, "tokens.create", {"name": "keep", "role": "viewer"})
    gone = run(cg, "tokens.create", {"name": "gone", "role": "viewer"})
    old = run(cg, "tokens.create", {"name": "old", "role": "viewer", "expires_in_s": 5})
    run(cg, "tokens.revoke", {"token_id": gone["id"]})
    cg.clock.advance(10)
    cg.gw.tokens = TokenRegistry(cg.clock)  # a fresh process
    out: list[Any] = []
    from twisted.internet.defer import ensureDeferred

    ensureDeferred(load_stored_tokens(cg.gw)).addBoth(out.append)
    assert out == [1]
    assert cg.gw.tokens.authenticate(keep["token"]) is not None
    assert cg.gw.tokens.authenticate(gone["token"]) is None
    assert cg.gw.tokens.authenticate(old["token"]) is None


@pytest.mark.parametrize(
    "raw",
    [
        {"role": "admin"},
        {"name": "x"},
        {"name": "x", "role": "root"},
        {"name": "x", "role": "chat", "expires_in_s": 0},
        {"name": "x", "role": "chat", "expires_in_s": "soon"},
        {"name": "x", "role": "chat", "extra": 1},
        {"name": "x" * 200, "role": "chat"},
    ],
)
def test_create_validates(cg: ClockGateway, raw: dict[str, Any]) -> None:
    assert error_of(cg, "tokens.create", raw).code == "invalid_request"


def test_only_admins_manage_tokens_and_denials_are_audited(cg: ClockGateway) -> None:
    for name, raw in (
        ("tokens.list", {}),
        ("tokens.create", {"name": "x", "role": "admin"}),
        ("tokens.revoke", {"token_id": "tok_1"}),
        ("devices.pair", {}),
        ("devices.list", {}),
        ("devices.revoke", {"device_id": "dev_1"}),
    ):
        assert error_of(cg, name, raw, who=VIEWER_P).code == "forbidden"
    denied = [r for r in cg.sql("SELECT actor, action, target FROM audit") if r[1] == "denied"]
    assert ("config:viewer", "denied", "tokens.create") in denied and len(denied) == 6
    assert error_of(cg, "tokens.list", {}, who=None).code == "unauthorized"  # type: ignore[arg-type]


# --- pairing ------------------------------------------------------------------------------------


def test_pairing_flow(cg: ClockGateway) -> None:
    issued = run(cg, "devices.pair", {"name": "phone", "role": "chat"})
    assert re.fullmatch(r"[A-Z2-7]{8}", issued["code"])
    assert issued["expires_at"] == "2026-03-15T14:42:00Z"  # ten minutes
    paired = run(cg, "pair", {"code": issued["code"].lower()}, who=cg.gw.anonymous)
    assert set(paired) == {"device_id", "token", "role"} and paired["role"] == "chat"
    principal = cg.gw.tokens.authenticate(paired["token"])
    assert principal is not None and principal.kind == "device" and principal.name == "phone"
    devices = run(cg, "devices.list", {})["devices"]
    assert [d["id"] for d in devices] == [paired["device_id"]]
    assert devices[0]["paired_from"] == "192.0.2.1" and devices[0]["role"] == "chat"
    assert cg.of_type("device_paired")[-1].payload["device_id"] == paired["device_id"]
    # a code works once
    again = error_of(cg, "pair", {"code": issued["code"]}, who=cg.gw.anonymous)
    assert again.code == "unauthorized" and again.status == 401
    # the default role is operator
    op = run(cg, "devices.pair", {})
    assert run(cg, "pair", {"code": op["code"]}, who=cg.gw.anonymous)["role"] == "operator"


def test_revoking_a_device_kills_its_token_and_streams(cg: ClockGateway) -> None:
    code = run(cg, "devices.pair", {})["code"]
    paired = run(cg, "pair", {"code": code}, who=cg.gw.anonymous)
    principal = cg.gw.tokens.authenticate(paired["token"])
    assert principal is not None
    closed: list[str] = []
    cg.gw.streams.open(principal, "websocket", closed.append)
    assert run(cg, "devices.revoke", {"device_id": paired["device_id"]}) is None
    assert cg.gw.tokens.authenticate(paired["token"]) is None and closed == ["token revoked"]
    assert run(cg, "devices.list", {})["devices"] == []
    assert cg.of_type("device_revoked")[-1].payload == {"device_id": paired["device_id"]}
    assert error_of(cg, "devices.revoke", {"device_id": paired["device_id"]}).code == "not_found"
    # revoking the device's token through the tokens API revokes the device too
    code = run(cg, "devices.pair", {})["code"]
    paired = run(cg, "pair", {"code": code}, who=cg.gw.anonymous)
    token_id = cg.gw.tokens.authenticate(paired["token"]).token_id  # type: ignore[union-attr]
    run(cg, "tokens.revoke", {"token_id": token_id})
    assert run(cg, "devices.list", {})["devices"] == []


def test_codes_expire_after_ten_minutes(cg: ClockGateway) -> None:
    code = run(cg, "devices.pair", {})["code"]
    cg.clock.advance(600)
    assert error_of(cg, "pair", {"code": code}, who=cg.gw.anonymous).code == "unauthorized"


def _wrong(cg: ClockGateway, peer: str, n: int) -> list[str]:
    return [
        error_of(cg, "pair", {"code": "AAAAAAAA"}, who=cg.gw.anonymous, peer=peer).code
        for _ in range(n)
    ]


def test_five_wrong_codes_lock_an_address_out_for_five_minutes(cg: ClockGateway) -> None:
    code = run(cg, "devices.pair", {})["code"]
    assert _wrong(cg, "192.0.2.9", 5) == ["unauthorized"] * 5
    locked = error_of(cg, "pair", {"code": code}, who=cg.gw.anonymous, peer="192.0.2.9")
    assert locked.code == "rate_limited" and locked.status == 429 and locked.retry_after == 300
    # another address is not locked out, and the code was not used up by the refusal
    cg.clock.advance(299)
    locked = error_of(cg, "pair", {"code": code}, who=cg.gw.anonymous, peer="192.0.2.9")
    assert locked.retry_after == 1
    cg.clock.advance(1)
    assert run(cg, "pair", {"code": code}, who=cg.gw.anonymous, peer="192.0.2.9")["token"]


def test_ipv6_lockout_covers_the_whole_64(cg: ClockGateway) -> None:
    for i in range(5):
        _wrong(cg, f"2001:db8:0:7::{i + 1}", 1)
    code = run(cg, "devices.pair", {})["code"]
    locked = error_of(cg, "pair", {"code": code}, who=cg.gw.anonymous, peer="2001:db8:0:7::99")
    assert locked.code == "rate_limited"
    assert run(cg, "pair", {"code": code}, who=cg.gw.anonymous, peer="2001:db8:0:8::1")["token"]


def test_ten_wrong_codes_in_total_void_every_code(cg: ClockGateway) -> None:
    codes = [run(cg, "devices.pair", {})["code"] for _ in range(3)]
    for peer in ("192.0.2.1", "192.0.2.2"):
        _wrong(cg, peer, 4)  # not enough to lock either address out
    _wrong(cg, "192.0.2.3", 1)
    assert pairing_for(cg.gw).outstanding == 3
    _wrong(cg, "192.0.2.4", 1)  # the tenth
    assert pairing_for(cg.gw).outstanding == 0
    for code in codes:
        err = error_of(cg, "pair", {"code": code}, who=cg.gw.anonymous, peer="198.51.100.1")
        assert err.code == "unauthorized"
    # new codes work again
    code = run(cg, "devices.pair", {})["code"]
    assert run(cg, "pair", {"code": code}, who=cg.gw.anonymous, peer="198.51.100.1")["token"]


def test_malformed_codes_count_as_wrong(cg: ClockGateway) -> None:
    for code in ("", "short", "AAAAAAA1", "ÄÄÄÄÄÄÄÄ", "AAAA AAAA"):
        err = error_of(cg, "pair", {"code": code}, who=cg.gw.anonymous, peer="192.0.2.50")
        assert err.code == "unauthorized"
    assert error_of(cg, "pair", {"code": "x" * 100}, who=cg.gw.anonymous).code == "invalid_request"


# --- activity -----------------------------------------------------------------------------------


def test_activity_and_audit(cg: ClockGateway) -> None:
    made = run(cg, "tokens.create", {"name": "a", "role": "viewer"})
    run(cg, "tokens.revoke", {"token_id": made["id"]})
    events = run(cg, "activity", {"limit": 2}, who=VIEWER_P)["events"]
    assert [e["type"] for e in events] == ["token_revoked", "token_created"]
    assert events[0]["id"] > events[1]["id"]
    audit = run(cg, "activity", {"audit": True, "limit": 10})["events"]
    assert [(a["type"], a["action"], a["actor"]) for a in audit[:2]] == [
        ("audit", "token.revoke", "config:admin"),
        ("audit", "token.create", "config:admin"),
    ]
    assert audit[1]["detail"] == {"name": "a", "role": "viewer"}
    assert error_of(cg, "activity", {"audit": True}, who=VIEWER_P).code == "forbidden"
    for bad in (0, 101, "x"):
        assert error_of(cg, "activity", {"limit": bad}).code == "invalid_request"


# --- /admin: the loopback gate ------------------------------------------------------------------


def _dummy(peer: Any, host: bytes | None, **headers: bytes) -> DummyRequest:
    request = DummyRequest([b"admin", b"paircode"])
    request.client = peer
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value])
    return request


@pytest.mark.parametrize(
    "peer, host, headers, local",
    [
        (IPv4Address("TCP", "127.0.0.1", 1), b"127.0.0.1:18789", {}, True),
        (IPv4Address("TCP", "127.0.0.1", 1), b"localhost", {}, True),
        (IPv6Address("TCP", "::1", 1), b"[::1]:8080", {}, True),
        (IPv6Address("TCP", "::ffff:127.0.0.1", 1), b"LOCALHOST:1", {}, True),
        (IPv4Address("TCP", "127.0.0.1", 1), b"gateway.example.com", {}, False),  # rebinding
        (IPv4Address("TCP", "127.0.0.1", 1), None, {}, False),
        (IPv4Address("TCP", "192.0.2.1", 1), b"127.0.0.1", {}, False),
        (
            IPv4Address("TCP", "192.0.2.1", 1),
            b"127.0.0.1",
            {"x_forwarded_for": b"127.0.0.1"},
            False,
        ),
        (
            IPv4Address("TCP", "127.0.0.1", 1),
            b"127.0.0.1",
            {"origin": b"https://evil.example"},
            False,
        ),
        (
            IPv4Address("TCP", "127.0.0.1", 1),
            b"127.0.0.1",
            {"origin": b"http://localhost:3000"},
            True,
        ),
        (
            IPv4Address("TCP", "127.0.0.1", 1),
            b"127.0.0.1",
            {"sec_fetch_site": b"cross-site"},
            False,
        ),
    ],
)
def test_is_local(peer: Any, host: bytes | None, headers: dict[str, bytes], local: bool) -> None:
    assert is_local(_dummy(peer, host, **headers)) is local


# --- over real sockets --------------------------------------------------------------------------


async def jcall(
    g: Running,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = ADMIN,
    headers: dict[bytes, list[bytes]] | None = None,
) -> tuple[int, Any, Any]:
    h = dict(auth(token)) if token else {}
    h.update(headers or {})
    data = json.dumps(body).encode() if body is not None else None
    resp = await treq.request(method, g.url + path, data=data, headers=h)
    raw = await resp.content()
    return resp.code, (json.loads(raw) if raw else None), resp.headers


@pytest_twisted.ensureDeferred
async def test_tokens_devices_and_pairing_over_http(tmp_path: Any) -> None:
    state = str(tmp_path)
    g = await start_gateway(state)
    secrets: list[str] = []
    try:
        code, made, _ = await jcall(g, "POST", "/api/tokens", {"name": "ci", "role": "viewer"})
        assert code == 201 and made["role"] == "viewer"
        secrets.append(made["token"])
        assert (await jcall(g, "GET", "/api/status", token=made["token"]))[0] == 200
        code, listed, _ = await jcall(g, "GET", "/api/tokens")
        assert code == 200 and [t["id"] for t in listed["tokens"]] == [made["id"]]
        assert (await jcall(g, "GET", "/api/tokens", token=OPERATOR))[0] == 403

        # pairing: an admin asks, a device trades the code once (no token needed)
        code, issued, _ = await jcall(g, "POST", "/api/devices/pair", {"name": "phone"})
        assert code == 201 and set(issued) == {"code", "expires_at"}
        code, paired, _ = await jcall(g, "POST", "/pair", {"code": issued["code"]}, token=None)
        assert code == 201 and paired["role"] == "operator"
        secrets.append(paired["token"])
        assert (await jcall(g, "GET", "/api/status", token=paired["token"]))[0] == 200
        code, again, headers = await jcall(g, "POST", "/pair", {"code": issued["code"]}, token=None)
        assert code == 401 and again["error"]["code"] == "unauthorized"
        code, devices, _ = await jcall(g, "GET", "/api/devices")
        assert [d["id"] for d in devices["devices"]] == [paired["device_id"]]
        assert devices["devices"][0]["paired_from"] == "127.0.0.1"

        # four more wrong codes from this address lock it out, even for a right code
        for _ in range(4):
            code, _, _ = await jcall(g, "POST", "/pair", {"code": "AAAAAAAA"}, token=None)
            assert code == 401
        fresh = (await jcall(g, "POST", "/api/devices/pair", {}))[1]["code"]
        code, body, headers = await jcall(g, "POST", "/pair", {"code": fresh}, token=None)
        assert code == 429 and body["error"]["code"] == "rate_limited"
        assert int(headers.getRawHeaders(b"retry-after")[0]) == 300

        # revocations fail at once
        code, _, _ = await jcall(g, "DELETE", f"/api/devices/{paired['device_id']}")
        assert code == 204
        assert (await jcall(g, "GET", "/api/status", token=paired["token"]))[0] == 401
        assert (await jcall(g, "DELETE", f"/api/tokens/{made['id']}"))[0] == 204
        assert (await jcall(g, "GET", "/api/status", token=made["token"]))[0] == 401
        assert (await jcall(g, "DELETE", f"/api/tokens/{made['id']}"))[0] == 404

        # a token that survives a restart
        code, kept, _ = await jcall(g, "POST", "/api/tokens", {"name": "kept", "role": "viewer"})
        secrets.append(kept["token"])

        # activity: the events, newest first; the audit trail for admins
        code, activity, _ = await jcall(g, "GET", "/api/activity?limit=100", token=VIEWER)
        assert code == 200
        types = [e["type"] for e in activity["events"]]
        for t in ("token_created", "token_revoked", "device_paired", "device_revoked"):
            assert t in types
        assert (await jcall(g, "GET", "/api/activity?limit=101"))[0] == 400
        assert (await jcall(g, "GET", "/api/activity?limit=0"))[0] == 400
        code, audit, _ = await jcall(g, "GET", "/api/activity?audit=true&limit=50")
        actions = [a["action"] for a in audit["events"]]
        for action in (
            "token.create",
            "token.revoke",
            "device.pair_code",
            "device.paired",
            "device.revoke",
            "denied",
        ):
            assert action in actions, actions
    finally:
        await g.stop()

    g = await start_gateway(state)
    try:
        assert (await jcall(g, "GET", "/api/status", token=kept["token"]))[0] == 200
        assert (await jcall(g, "GET", "/api/status", token=made["token"]))[0] == 401
        code, activity, _ = await jcall(g, "GET", "/api/activity?limit=100")
        types = [e["type"] for e in activity["events"]]
        assert "token_created" in types and "device_paired" in types  # from the store
    finally:
        await g.stop()

    # secrets at rest: no token made over the API appears anywhere in the state dir
    found = []
    for root, _dirs, files in os.walk(state):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            for secret in secrets:
                if secret.encode() in data:
                    found.append(name)
    assert found == [], found
    assert any(n.startswith("gatewayd.sqlite3") for n in os.listdir(state))
    assert any(n.startswith("gatewayd.log") for n in os.listdir(state))


class _Stream(Protocol):
    """A raw SSE client: keeps what arrives; ``lost`` fires when the server ends it."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_revoking_a_token_disables_its_cron_jobs(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        code, made, _ = await jcall(g, "POST", "/api/tokens", {"name": "ops", "role": "operator"})
        assert code == 201
        job = {"schedule": {"type": "every", "seconds": 3600}, "payload": {"prompt": "tick"}}
        code, theirs, _ = await jcall(g, "POST", "/api/cron", job, token=made["token"])
        assert code == 201 and theirs["enabled"] is True
        code, mine, _ = await jcall(g, "POST", "/api/cron", job, token=OPERATOR)
        assert code == 201
        assert (await jcall(g, "DELETE", f"/api/tokens/{made['id']}"))[0] == 204
        code, after, _ = await jcall(g, "GET", f"/api/cron/{theirs['id']}")
        assert code == 200 and after["enabled"] is False and after["next_run_at"] is None
        code, other, _ = await jcall(g, "GET", f"/api/cron/{mine['id']}")
        assert other["enabled"] is True  # another token's job is left alone
        code, activity, _ = await jcall(g, "GET", "/api/activity?audit=true&limit=50")
        assert code == 200
        actions = [(a["action"], a["target"]) for a in activity["events"]]
        assert ("cron.disable", theirs["id"]) in actions
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_revoking_a_token_ends_its_open_sse_stream(tmp_path: Any) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    g = await start_gateway(str(tmp_path))
    stream: _Stream | None = None
    try:
        made = (await jcall(g, "POST", "/api/tokens", {"name": "sse", "role": "viewer"}))[1]
        request = (
            f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {made['token']}\r\n\r\n"
        ).encode()
        stream = _Stream(request)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", g.port), stream)
        await _until(lambda: b"retry: 3000" in stream.data)  # type: ignore[union-attr]
        assert g.gateway.connections["sse"] == 1
        assert (await jcall(g, "DELETE", f"/api/tokens/{made['id']}"))[0] == 204
        stream.lost.addTimeout(5, reactor)
        await stream.lost  # the server ended it
        assert g.gateway.connections["sse"] == 0
    finally:
        if stream is not None and not stream.lost.called and stream.transport is not None:
            stream.transport.abortConnection()  # type: ignore[attr-defined]
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_admin_routes_answer_only_loopback(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    stopped: list[bool] = []
    root = g.service.sites[0].resource
    shutdown = _find_fixed(root, b"/admin/shutdown")
    shutdown.stop = lambda: stopped.append(True)
    host = f"127.0.0.1:{g.port}".encode()
    try:
        code, issued, _ = await jcall(
            g, "GET", "/admin/paircode", token=None, headers={b"Host": [host]}
        )
        assert code == 201 and re.fullmatch(r"[A-Z2-7]{8}", issued["code"])
        code, paired, _ = await jcall(g, "POST", "/pair", {"code": issued["code"]}, token=None)
        assert code == 201
        for headers in (
            {b"Host": [b"gatewayd.example.com"]},
            {b"Host": [b"gatewayd.example.com"], b"X-Forwarded-For": [b"127.0.0.1"]},
            {b"Host": [host], b"Origin": [b"https://evil.example"]},
        ):
            code, body, _ = await jcall(g, "GET", "/admin/paircode", token=None, headers=headers)
            assert code == 403 and body["error"]["code"] == "forbidden"
            code, _, _ = await jcall(g, "POST", "/admin/shutdown", token=None, headers=headers)
            assert code == 403
        assert stopped == []
        code, _, _ = await jcall(g, "GET", "/admin/shutdown", token=None, headers={b"Host": [host]})
        assert code == 405
        code, body, _ = await jcall(
            g, "POST", "/admin/shutdown", token=None, headers={b"Host": [b"localhost"]}
        )
        assert code == 202 and body["status"] == "shutting_down"
        await _until(lambda: stopped == [True])
        code, audit, _ = await jcall(g, "GET", "/api/activity?audit=true&limit=20")
        actions = [(a["action"], a["actor"]) for a in audit["events"]]
        assert ("shutdown", "loopback") in actions
        assert ("admin.denied", "anonymous") in actions
    finally:
        await g.stop()


def _find_fixed(root: Any, path: bytes) -> Any:
    """The fixed resource the root serves at ``path`` (through any wrappers)."""
    seen = 0
    while seen < 5:
        fixed = getattr(root, "_fixed", None)
        if fixed is not None:
            return fixed[path]
        root = next(v for k, v in vars(root).items() if hasattr(v, "render") and k != "_gw")
        seen += 1
    raise AssertionError("no root with fixed paths")


async def _until(condition: Any, timeout: float = 5.0) -> None:
    import time

    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        await deferLater(reactor, 0.01, lambda: None)


def test_admin_shutdown_stops_a_real_process(tmp_path: Any) -> None:
    from tests.harness import spawn

    path = os.environ.get("PYTHONPATH", "")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = spawn(str(tmp_path), env={"PYTHONPATH": repo + (os.pathsep + path if path else "")})
    try:
        code, body = proc.request("POST", "/admin/shutdown", token=None)
        assert code == 202 and body["status"] == "shutting_down"
        assert proc.proc.wait(30) == 0
    finally:
        proc.kill()
