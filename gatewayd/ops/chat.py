"""Chat and runs: start a run, wait for it, look at it, abort it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gatewayd.errors import GatewayError, invalid, not_found
from gatewayd.ops import Call, Param, operation
from gatewayd.runs import LiveRun
from gatewayd.store.records import Run
from gatewayd.views import chat_result, message_view, run_view

if TYPE_CHECKING:
    from gatewayd.core import Gateway

MESSAGE = Param(
    "message",
    str,
    required=True,
    doc="the user's message",
    max_length=1_000_000,
    check=lambda v: None if v.strip() else "must not be empty",
)
SESSION = Param(
    "session_id",
    str,
    aliases=("sessionKey",),
    is_id=True,
    doc="continue this session (created when new)",
)
AGENT = Param("agent_id", str, default="", is_id=True)


async def start(gw: Gateway, call: Call, p: dict[str, Any], **extra: Any) -> LiveRun:
    """Submit a run for the caller; streamed events go to ``call.notify`` when set."""
    on_event = None
    if call.notify is not None:
        notify = call.notify

        def on_event(event: Any) -> None:
            notify("chat.event", event.envelope())

    return await gw.runs.submit(
        call.principal,
        p["message"],
        session_id=p["session_id"],
        agent_id=p["agent_id"] or "",
        on_event=on_event,
        **extra,
    )


def outcome(run: Run) -> dict[str, Any]:
    """The chat body of a finished run, or the error its end calls for."""
    if run.status == "completed":
        return chat_result(run)
    if run.error_code == "budget_exceeded":
        raise GatewayError("budget_exceeded", run.error or "the daily budget is spent")
    if run.status == "aborted":
        raise GatewayError(
            "conflict",
            f"the run was aborted: {run.error or 'aborted'}",
            data={"run_id": run.id, "session_id": run.session_id},
        )
    raise GatewayError(
        "unavailable",
        f"the run failed: {run.error or 'unknown error'}",
        data={"run_id": run.id, "session_id": run.session_id},
    )


@operation(
    "chat.send",
    "chat",
    MESSAGE,
    SESSION,
    AGENT,
    summary="Send a message and wait for the agent's answer",
)
async def chat_send(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    live = await start(gw, call, p)
    return outcome(await gw.runs.wait(live.run.id))


@operation(
    "agent.wait",
    "chat",
    MESSAGE,
    SESSION,
    AGENT,
    summary="Run the agent on a message and wait for the result (alias of chat.send)",
)
async def agent_wait(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return await chat_send(gw, call, p)


@operation(
    "agent", "chat", MESSAGE, SESSION, AGENT, status=202, summary="Start a run and return at once"
)
async def agent(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    live = await start(gw, call, p)
    if live.run.error_code == "budget_exceeded":  # refused at once: say so, as /api/chat does
        outcome(live.run)
    return {"run_id": live.run.id, "session_id": live.run.session_id}


async def visible_run(gw: Gateway, call: Call, run_id: str) -> Run:
    live = gw.runs.live(run_id)
    run = live.run if live is not None else await gw.store.get_run(run_id)
    if run is None or not call.principal.owns(run.owner):
        raise not_found("no such run")
    return run


@operation(
    "runs.get",
    "own",
    Param("run_id", str, required=True, is_id=True),
    summary="A run's state and outcome",
)
async def runs_get(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return run_view(await visible_run(gw, call, p["run_id"]))


@operation(
    "runs.wait",
    "own",
    Param("run_id", str, required=True, is_id=True),
    summary="Wait for a run to finish and return it",
)
async def runs_wait(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    await visible_run(gw, call, p["run_id"])
    return run_view(await gw.runs.wait(p["run_id"]))


def _check_abort_right(call: Call, owner: str) -> None:
    principal = call.principal
    if principal.token_id == owner or principal.can("operate"):
        if principal.owns(owner):
            return
    raise not_found("no such run")


@operation(
    "runs.abort",
    "chat",
    Param("run_id", str, required=True, is_id=True),
    status=202,
    summary="Abort a run (queued, running or awaiting approval)",
)
async def runs_abort(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    run = await visible_run(gw, call, p["run_id"])
    _check_abort_right(call, run.owner)
    gw.runs.abort(run.id, "aborted by request")
    live = gw.runs.live(run.id)
    status = live.run.status if live is not None else run.status
    if live is not None and live.aborted:
        status = "aborted" if status == "queued" else status
    return {"run_id": run.id, "status": "aborted" if live is not None else status}


@operation(
    "sessions.abort",
    "chat",
    Param("session_id", str, required=True, is_id=True),
    status=202,
    summary="Abort every queued or running run of a session",
)
async def sessions_abort(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    session = await gw.store.get_session(p["session_id"])
    if session is None or not call.principal.owns(session.owner):
        raise not_found("no such session")
    _check_abort_right(call, session.owner)
    ids = gw.runs.abort_session(session.id)
    return {"session_id": session.id, "run_ids": ids, "status": "aborted"}


@operation(
    "chat.abort",
    "chat",
    Param("run_id", str, is_id=True),
    Param("session_id", str, is_id=True),
    status=202,
    summary="Abort by run_id or by session_id",
)
async def chat_abort(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    if p["run_id"]:
        return await runs_abort(gw, call, {"run_id": p["run_id"]})
    if p["session_id"]:
        return await sessions_abort(gw, call, {"session_id": p["session_id"]})
    raise invalid("run_id or session_id is required")


@operation(
    "chat.history",
    "own",
    Param("session_id", str, required=True, is_id=True),
    Param("limit", int, minimum=1, maximum=10000),
    summary="A session's messages, oldest first",
)
async def chat_history(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    session = await gw.store.get_session(p["session_id"])
    if session is None or not call.principal.owns(session.owner):
        raise not_found("no such session")
    messages = await gw.store.history(session.id, p["limit"])
    return {"session_id": session.id, "messages": [message_view(m) for m in messages]}
