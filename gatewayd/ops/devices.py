"""Devices and pairing: an admin asks for a short code, a device trades it once for a token.

A code is 8 base32 characters (40 bits) and lives 10 minutes, so guessing is throttled
hard: 5 wrong codes from one address (one /64 for IPv6) lock that address out for 5
minutes, during which every attempt, even with a right code, is 429; and 10 wrong codes in
total within a code's lifetime void every outstanding code.  Codes live only in memory (a
restart voids them) and are kept by their SHA-256, never as text.
"""

from __future__ import annotations

import base64
import secrets
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs

from gatewayd.auth import Principal, hash_token, new_id
from gatewayd.config import ROLES
from gatewayd.errors import GatewayError, not_found
from gatewayd.ops import Call, Param, operation
from gatewayd.ops.tokens import issue_token, revoked
from gatewayd.ratelimit import address_key
from gatewayd.schedule import rfc3339

if TYPE_CHECKING:
    from gatewayd.core import Gateway

CODE_TTL_S = 600.0
LOCKOUT_S = 300.0
FAILURES_PER_ADDRESS = 5
FAILURES_IN_TOTAL = 10
_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


@attrs.frozen
class PendingCode:
    role: str
    name: str
    expires_at: float
    created_by: str


def new_code() -> str:
    """8 base32 characters: exactly 40 random bits."""
    return base64.b32encode(secrets.token_bytes(5)).decode("ascii")


def normalise_code(code: str) -> str | None:
    code = code.strip().upper().replace("-", "").replace(" ", "")
    return code if len(code) == 8 and set(code) <= _ALPHABET else None


class Pairing:
    """Outstanding codes and the guessing defences; driven by the gateway clock."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._codes: dict[str, PendingCode] = {}
        self._failures: dict[str, deque[float]] = {}
        self._locked: dict[str, float] = {}
        self._recent_failures: deque[float] = deque()

    def issue(self, role: str, name: str, created_by: str) -> tuple[str, float]:
        now = self.clock.seconds()
        self._expire(now)
        code = new_code()
        expires_at = now + CODE_TTL_S
        self._codes[hash_token(code)] = PendingCode(role, name, expires_at, created_by)
        return code, expires_at

    def locked_for(self, peer: str) -> int | None:
        """Seconds left of this address's lockout, or None."""
        now = self.clock.seconds()
        until = self._locked.get(address_key(peer))
        if until is None:
            return None
        if until <= now:
            del self._locked[address_key(peer)]
            return None
        return max(1, int(until - now + 0.999))

    def redeem(self, code: str, peer: str) -> PendingCode:
        """The code's grant, used up; 429 while locked out, 401 for a wrong code."""
        wait = self.locked_for(peer)
        if wait is not None:
            raise GatewayError(
                "rate_limited", "too many wrong pairing codes; try again later", retry_after=wait
            )
        now = self.clock.seconds()
        self._expire(now)
        normal = normalise_code(code)
        pending = self._codes.pop(hash_token(normal), None) if normal else None
        if pending is None:
            self._failed(peer, now)
            raise GatewayError("unauthorized", "unknown, used or expired pairing code")
        self._failures.pop(address_key(peer), None)
        return pending

    @property
    def outstanding(self) -> int:
        self._expire(self.clock.seconds())
        return len(self._codes)

    def _failed(self, peer: str, now: float) -> None:
        key = address_key(peer)
        failures = self._failures.setdefault(key, deque())
        failures.append(now)
        while failures and failures[0] <= now - LOCKOUT_S:
            failures.popleft()
        if len(failures) >= FAILURES_PER_ADDRESS:
            self._locked[key] = now + LOCKOUT_S
            del self._failures[key]
        recent = self._recent_failures
        recent.append(now)
        while recent and recent[0] <= now - CODE_TTL_S:
            recent.popleft()
        if len(recent) >= FAILURES_IN_TOTAL:
            self._codes.clear()
            recent.clear()

    def _expire(self, now: float) -> None:
        for digest, pending in list(self._codes.items()):
            if pending.expires_at <= now:
                del self._codes[digest]
        if len(self._failures) > 10_000:
            self._failures = {
                k: q for k, q in self._failures.items() if q and q[-1] > now - LOCKOUT_S
            }
        if len(self._locked) > 10_000:
            self._locked = {k: t for k, t in self._locked.items() if t > now}


_pairings: weakref.WeakKeyDictionary[Gateway, Pairing] = weakref.WeakKeyDictionary()


def pairing_for(gw: Gateway) -> Pairing:
    """The gateway's pairing state (one per gateway, made on first use)."""
    pairing = _pairings.get(gw)
    if pairing is None:
        pairing = _pairings[gw] = Pairing(gw.clock)
    return pairing


def issue_code(gw: Gateway, principal: Principal, role: str, name: str) -> dict[str, Any]:
    code, expires_at = pairing_for(gw).issue(role, name, principal.token_id)
    gw.audit(principal, "device.pair_code", "", role=role, name=name)
    return {"code": code, "expires_at": rfc3339(expires_at)}


def device_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "role": row["role"],
        "token_id": row["token_id"],
        "created_at": rfc3339(row["created_at"]),
        "paired_from": row["paired_from"],
    }


ROLE = Param(
    "role", str, default="operator", choices=ROLES, doc="the role the paired device's token gets"
)
NAME = Param("name", str, default="", max_length=128)


@operation(
    "devices.pair",
    "admin",
    NAME,
    ROLE,
    status=201,
    audit=True,
    summary="A pairing code (8 base32 characters, 10 minutes) for one device",
)
async def devices_pair(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return issue_code(gw, call.principal, p["role"], p["name"])


@operation(
    "pair",
    "any",
    Param("code", str, required=True, max_length=64),
    NAME,
    status=201,
    summary="Trade a pairing code (once) for a device token",
)
async def pair(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    pending = pairing_for(gw).redeem(p["code"], call.peer)
    name = p["name"] or pending.name or "device"
    device_id = new_id("dev")
    token, row = await issue_token(
        gw,
        name=name,
        role=pending.role,
        kind="device",
        created_by=pending.created_by,
        device={"id": device_id, "name": name, "role": pending.role, "paired_from": call.peer},
    )
    gw.bus.publish("device_paired", device_id=device_id, name=name, role=pending.role)
    device = Principal(token_id=row["id"], role=pending.role, name=name, kind="device")
    gw.audit(device, "device.paired", device_id, code_from=pending.created_by, peer=call.peer)
    return {"device_id": device_id, "token": token, "role": pending.role}


@operation("devices.list", "admin", summary="Paired devices that are not revoked")
async def devices_list(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    rows = await gw.store.list_devices()
    return {"devices": [device_view(r) for r in rows]}


@operation(
    "devices.revoke",
    "admin",
    Param("device_id", str, required=True, is_id=True, aliases=("id",)),
    status=204,
    audit=True,
    summary="Revoke a device: its token fails at once and its streams are closed",
)
async def devices_revoke(gw: Gateway, call: Call, p: dict[str, Any]) -> None:
    device_id = p["device_id"]
    row = await gw.store.revoke_device(device_id, gw.clock.seconds())
    if row is None:
        raise not_found("no such device")
    gw.bus.publish("device_revoked", device_id=device_id)
    gw.audit(call.principal, "device.revoke", device_id, token_id=row["token_id"])
    await revoked(gw, call.principal, row["token_id"])
