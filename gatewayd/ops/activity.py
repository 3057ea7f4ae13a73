"""Recent activity: the latest events, and (for admins) the audit trail.

``GET /api/activity?limit=N`` answers the newest N events (1..100, newest first) as their
envelopes.  They come from the bus's replay buffer and, when that holds fewer (after a
restart), from the store's ``events`` table, so the feed survives restarts.

``GET /api/activity?audit=true&limit=N`` answers the audit trail instead, newest first, each
entry shaped like an envelope of type ``audit``::

    {"id": 12, "type": "audit", "ts": "...", "actor": "tok_…", "action": "token.revoke",
     "target": "tok_…", "detail": {...}}

The audit trail records token, device and config changes, shutdowns, pairing, and admin
calls that were denied; it needs the admin scope (it names who did what).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from gatewayd.errors import GatewayError
from gatewayd.ops import Call, Param, operation
from gatewayd.schedule import rfc3339

if TYPE_CHECKING:
    from gatewayd.core import Gateway


async def recent_events(gw: Gateway, limit: int) -> list[dict[str, Any]]:
    events = [e.envelope() for e in gw.bus.recent(limit)]
    if len(events) < limit:
        before = events[-1]["id"] if events else gw.bus.last_id + 1
        for body in await gw.store.recent_events(before, limit - len(events)):
            try:
                events.append(json.loads(body))
            except ValueError:
                continue
    return events


def audit_view(row: tuple[Any, ...]) -> dict[str, Any]:
    aid, ts, actor, action, target, detail = row
    try:
        details = json.loads(detail) if detail else {}
    except ValueError:
        details = {}
    return {
        "id": aid,
        "type": "audit",
        "ts": rfc3339(ts),
        "actor": actor,
        "action": action,
        "target": target,
        "detail": details,
    }


@operation(
    "activity",
    "read",
    Param("limit", int, default=50, minimum=1, maximum=100),
    Param("audit", bool, default=False, doc="the audit trail instead of events (admin)"),
    summary="Recent events, newest first; with audit=true the audit trail",
)
async def activity(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    if p["audit"]:
        if not call.principal.can("admin"):
            raise GatewayError("forbidden", "the audit trail needs the admin scope")
        rows = await gw.store.recent_audit(p["limit"])
        return {"events": [audit_view(r) for r in rows]}
    return {"events": await recent_events(gw, p["limit"])}
