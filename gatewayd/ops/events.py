"""Following events: the parameters and checks every streaming transport shares.

``events.subscribe`` and ``events.unsubscribe`` live in the operations table so that
JSON-RPC, typed WebSocket frames and WAMP authorize and validate them the same way and list
them among the methods; the subscription itself belongs to a connection, so a streaming
transport intercepts these two names and keeps the :class:`~gatewayd.events.Subscription`.
Called through a transport without a stream (``POST /rpc``), they answer 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gatewayd.auth import Principal
from gatewayd.errors import invalid, not_found
from gatewayd.events import EventFilter, make_filter
from gatewayd.ops import Call, Param, operation

if TYPE_CHECKING:
    from gatewayd.core import Gateway


def _strings(value: Any) -> str | None:
    if all(isinstance(v, str) and 0 < len(v) <= 64 for v in value) and len(value) <= 64:
        return None
    return "must be a list of event type names"


TYPES = Param("types", list, check=_strings, doc="event types to receive (all when absent)")
SESSION = Param("session_id", str, is_id=True, doc="only this session's events")
AFTER = Param("after_id", int, minimum=0, doc="replay the kept events after this id first")


def normalize(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Accept ``types`` as a comma-separated string too, as SSE's ``?types=a,b`` does."""
    out = dict(raw)
    types = out.get("types")
    if isinstance(types, str):
        out["types"] = [t for t in (p.strip() for p in types.split(",")) if t]
    return out


async def subscription_filter(
    gw: Gateway, principal: Principal, types: list[str] | None, session_id: str | None
) -> EventFilter:
    """The filter a principal may follow; another owner's session is 404 to a chat token."""
    if session_id and principal.own_only:
        session = await gw.store.get_session(session_id)
        if session is not None and not principal.owns(session.owner):
            raise not_found("no such session")
    return make_filter(types, session_id, principal.owner_filter)


@operation(
    "events.subscribe",
    "own",
    TYPES,
    SESSION,
    AFTER,
    summary="Follow events on this connection (WebSocket and WAMP only)",
)
async def events_subscribe(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    raise invalid("events.subscribe needs a stream: use a WebSocket, or GET /api/events")


@operation(
    "events.unsubscribe",
    "own",
    summary="Stop following events on this connection (WebSocket and WAMP only)",
)
async def events_unsubscribe(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    raise invalid("events.unsubscribe needs a stream: use a WebSocket")
