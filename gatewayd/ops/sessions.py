"""Sessions: list, create, read, rename, reset, delete, search."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gatewayd.auth import new_id
from gatewayd.errors import GatewayError, not_found
from gatewayd.ops import Call, Param, operation
from gatewayd.store.records import Session
from gatewayd.views import message_view, session_view

if TYPE_CHECKING:
    from gatewayd.core import Gateway

SESSION_ID = Param("session_id", str, required=True, is_id=True, aliases=("id",))
TITLE = Param("title", str, max_length=512)


async def visible_session(gw: Gateway, call: Call, session_id: str) -> Session:
    session = await gw.store.get_session(session_id)
    if session is None or not call.principal.owns(session.owner):
        raise not_found("no such session")
    return session


@operation(
    "sessions.list",
    "own",
    Param("limit", int, default=50, minimum=1, maximum=1000),
    Param("offset", int, default=0, minimum=0),
    summary="Sessions, newest activity first",
)
async def sessions_list(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    sessions = await gw.store.list_sessions(call.principal.owner_filter, p["limit"], p["offset"])
    return {"sessions": [session_view(s) for s in sessions]}


@operation(
    "sessions.create",
    "chat",
    Param("session_id", str, is_id=True, aliases=("id",)),
    TITLE,
    Param("agent_id", str, default="", is_id=True),
    status=201,
    summary="Create an empty session",
)
async def sessions_create(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    sid = p["session_id"] or new_id("ses")
    if await gw.store.get_session(sid) is not None:
        if call.principal.own_only:
            raise not_found("no such session")
        raise GatewayError("conflict", "a session with this id exists")
    session = await gw.store.create_session(
        sid, call.principal.token_id, p["title"] or "", gw.clock.seconds(), p["agent_id"] or ""
    )
    gw.bus.publish("session_created", session_id=sid, owner=session.owner, title=session.title)
    return session_view(session)


@operation("sessions.get", "own", SESSION_ID, summary="A session with its messages")
async def sessions_get(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    session = await visible_session(gw, call, p["session_id"])
    messages = await gw.store.history(session.id)
    return {**session_view(session), "messages": [message_view(m) for m in messages]}


@operation(
    "sessions.preview",
    "own",
    SESSION_ID,
    Param("limit", int, default=5, minimum=1, maximum=100),
    summary="A session with its last few messages",
)
async def sessions_preview(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    session = await visible_session(gw, call, p["session_id"])
    messages = await gw.store.history(session.id, p["limit"])
    return {**session_view(session), "messages": [message_view(m) for m in messages]}


@operation(
    "sessions.history",
    "own",
    SESSION_ID,
    Param("limit", int, minimum=1, maximum=10000),
    summary="A session's messages, oldest first (the last `limit` when given)",
)
async def sessions_history(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    session = await visible_session(gw, call, p["session_id"])
    messages = await gw.store.history(session.id, p["limit"])
    return {"messages": [message_view(m) for m in messages]}


@operation("sessions.patch", "operate", SESSION_ID, TITLE, summary="Rename a session")
async def sessions_patch(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    session = await visible_session(gw, call, p["session_id"])
    title = session.title if p["title"] is None else p["title"]
    updated = await gw.store.update_session(session.id, title, gw.clock.seconds())
    if updated is None:
        raise not_found("no such session")
    gw.bus.publish("session_updated", session_id=session.id, owner=session.owner, title=title)
    return session_view(updated)


@operation(
    "sessions.delete",
    "operate",
    SESSION_ID,
    status=204,
    summary="Delete a session and its messages (its runs are aborted)",
)
async def sessions_delete(gw: Gateway, call: Call, p: dict[str, Any]) -> None:
    session = await visible_session(gw, call, p["session_id"])
    gw.runs.abort_session(session.id, "the session was deleted")
    if not await gw.store.delete_session(session.id):
        raise not_found("no such session")
    gw.bus.publish("session_deleted", session_id=session.id, owner=session.owner)


@operation("sessions.reset", "operate", SESSION_ID, summary="Clear a session's messages")
async def sessions_reset(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    session = await visible_session(gw, call, p["session_id"])
    await gw.store.reset_session(session.id, gw.clock.seconds())
    gw.bus.publish("session_updated", session_id=session.id, owner=session.owner, reset=True)
    updated = await gw.store.get_session(session.id)
    assert updated is not None
    return session_view(updated)


@operation(
    "memory.search",
    "own",
    Param("q", str, required=True, max_length=1000, aliases=("query",)),
    Param("limit", int, default=20, minimum=1, maximum=100),
    summary="Full-text search over messages",
)
async def memory_search(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    found = await gw.store.search_messages(p["q"], call.principal.owner_filter, p["limit"])
    return {"messages": [{**message_view(m), "session_id": m.session_id} for m in found]}
