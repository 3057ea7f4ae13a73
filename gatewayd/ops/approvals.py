"""Tool calls waiting for a person: list them, approve or deny one (once)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gatewayd.ops import Call, Param, operation
from gatewayd.views import approval_view

if TYPE_CHECKING:
    from gatewayd.core import Gateway

STATUSES = ("pending", "approved", "denied", "expired", "cancelled")


@operation(
    "approvals.list",
    "own",
    Param("status", str, choices=STATUSES),
    Param("limit", int, default=200, minimum=1, maximum=1000),
    summary="Approvals, newest first (a chat token sees its own)",
)
async def approvals_list(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    rows = await gw.store.list_approvals(p["status"], call.principal.owner_filter, p["limit"])
    return {"approvals": [approval_view(a) for a in rows]}


@operation(
    "approvals.resolve",
    "operate",
    Param("approval_id", str, required=True, is_id=True, aliases=("id",)),
    Param("decision", str, required=True, choices=("approve", "deny")),
    Param("reason", str, max_length=2000),
    summary="Approve or deny a pending tool call; a second resolve is 409",
)
async def approvals_resolve(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    approval = await gw.approvals.resolve(
        call.principal, p["approval_id"], p["decision"], p["reason"]
    )
    return approval_view(approval)


APPROVAL_ID = Param("approval_id", str, required=True, is_id=True, aliases=("id",))
REASON = Param("reason", str, max_length=2000)


@operation(
    "approvals.approve",
    "operate",
    APPROVAL_ID,
    REASON,
    summary="Approve a pending tool call (REST: POST /api/approvals/{id}/approve)",
)
async def approvals_approve(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return await approvals_resolve(gw, call, {**p, "decision": "approve"})


@operation(
    "approvals.deny",
    "operate",
    APPROVAL_ID,
    REASON,
    summary="Deny a pending tool call (REST: POST /api/approvals/{id}/deny)",
)
async def approvals_deny(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return await approvals_resolve(gw, call, {**p, "decision": "deny"})
