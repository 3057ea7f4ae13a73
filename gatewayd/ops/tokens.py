"""Tokens made over the API: shown once, kept only as SHA-256, revocable at once.

Revoking removes the token from the in-memory registry first (so the very next request with
it fails, and its open WebSocket and SSE streams are closed through the registry's revoke
listeners), then marks the row revoked in the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gatewayd.auth import Principal, hash_token, new_id, new_token
from gatewayd.config import ROLES
from gatewayd.errors import not_found
from gatewayd.ops import Call, Param, operation
from gatewayd.schedule import rfc3339

if TYPE_CHECKING:
    from gatewayd.core import Gateway

#: ten years: longer-lived tokens should simply not expire
MAX_EXPIRES_IN_S = 10 * 365 * 86400


def token_view(row: dict[str, Any]) -> dict[str, Any]:
    """The public shape of a stored token; never its hash."""
    return {
        "id": row["id"],
        "name": row["name"],
        "role": row["role"],
        "kind": row["kind"],
        "created_at": rfc3339(row["created_at"]),
        "expires_at": rfc3339(row["expires_at"]) if row["expires_at"] is not None else None,
        "created_by": row["created_by"],
    }


def principal_of(row: dict[str, Any]) -> Principal:
    return Principal(
        token_id=row["id"],
        role=row["role"],
        name=row["name"],
        kind=row["kind"],
        expires_at=row["expires_at"],
    )


async def load_stored_tokens(gw: Gateway) -> int:
    """Put every live stored token into the registry (at start-up)."""
    rows = await gw.store.live_tokens(gw.clock.seconds())
    for row in rows:
        gw.tokens.add_stored(row["hash"], principal_of(row))
    return len(rows)


async def issue_token(
    gw: Gateway,
    *,
    name: str,
    role: str,
    kind: str,
    created_by: str,
    expires_in_s: float | None = None,
    device: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Make, store and register a token; returns (the token itself, its row).

    With ``device``, the device row is written in the same transaction as the token.
    """
    now = gw.clock.seconds()
    token = new_token()
    row = {
        "id": new_id("tok"),
        "hash": hash_token(token),
        "role": role,
        "name": name,
        "kind": kind,
        "created_at": now,
        "expires_at": now + expires_in_s if expires_in_s is not None else None,
        "created_by": created_by,
    }
    if device is not None:
        device = {**device, "token_id": row["id"], "created_at": now}
    await gw.store.insert_token(row, device)
    gw.tokens.add_stored(row["hash"], principal_of(row))
    return token, row


async def revoked(gw: Gateway, principal: Principal | None, token_id: str) -> None:
    """What revoking a token means, whichever operation revoked it (tokens, devices): it
    fails at once, its streams close (TokenRegistry's revoke listeners), and its cron jobs
    stop firing (disabled, not deleted: an admin may look at them and turn them back on)."""
    gw.tokens.remove_stored(token_id)
    gw.bus.publish("token_revoked", token_id=token_id)
    if gw.cron is not None:
        for job_id in await gw.cron.disable_owned_by(token_id):
            gw.audit(principal, "cron.disable", job_id, reason="its token was revoked")


@operation("tokens.list", "admin", summary="Tokens made over the API (never their secrets)")
async def tokens_list(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    rows = await gw.store.list_tokens()
    return {"tokens": [token_view(r) for r in rows]}


@operation(
    "tokens.create",
    "admin",
    Param("name", str, required=True, max_length=128, doc="what the token is for"),
    Param("role", str, required=True, choices=ROLES),
    Param(
        "expires_in_s",
        float,
        minimum=1,
        maximum=MAX_EXPIRES_IN_S,
        doc="seconds until the token stops working (never, when absent)",
    ),
    status=201,
    strict=True,
    audit=True,
    summary="Make a token; it is shown once and stored only as its SHA-256",
)
async def tokens_create(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    token, row = await issue_token(
        gw,
        name=p["name"],
        role=p["role"],
        kind="api",
        created_by=call.principal.token_id,
        expires_in_s=p["expires_in_s"],
    )
    gw.bus.publish("token_created", token_id=row["id"], name=row["name"], role=row["role"])
    gw.audit(call.principal, "token.create", row["id"], name=row["name"], role=row["role"])
    view = token_view(row)
    return {
        "id": view["id"],
        "token": token,
        "role": view["role"],
        "name": view["name"],
        "expires_at": view["expires_at"],
    }


@operation(
    "tokens.revoke",
    "admin",
    Param("token_id", str, required=True, is_id=True, aliases=("id",)),
    status=204,
    audit=True,
    summary="Revoke a token: it fails at once and its streams are closed",
)
async def tokens_revoke(gw: Gateway, call: Call, p: dict[str, Any]) -> None:
    token_id = p["token_id"]
    row = await gw.store.revoke_token(token_id, gw.clock.seconds())
    if row is None:
        raise not_found("no such token")
    gw.audit(call.principal, "token.revoke", token_id)
    await revoked(gw, call.principal, token_id)
    if row.get("device_id"):
        gw.bus.publish("device_revoked", device_id=row["device_id"])
