"""The JSON shapes of stored things, the same for every transport (CONTRACT §5, §15)."""

from __future__ import annotations

from typing import Any

from gatewayd.schedule import rfc3339
from gatewayd.store.records import Message, Run, Session


def session_view(s: Session) -> dict[str, Any]:
    return {
        "id": s.id,
        "title": s.title,
        "created_at": rfc3339(s.created_at),
        "last_activity": rfc3339(s.last_activity),
        "message_count": s.message_count,
    }


def message_view(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": str(m.id),
        "role": m.role,
        "content": m.content,
        "created_at": rfc3339(m.created_at),
        "run_id": m.run_id,
    }
    if m.tool is not None:
        out["tool"] = m.tool
    if m.role == "tool" or m.is_error:
        out["is_error"] = m.is_error
    return out


def tokens_view(run: Run) -> dict[str, int]:
    return {"input": run.tokens_in, "output": run.tokens_out}


def run_view(run: Run) -> dict[str, Any]:
    out: dict[str, Any] = {
        "run_id": run.id,
        "session_id": run.session_id,
        "status": run.status,
        "tokens": tokens_view(run),
        "cost_cents": run.cost_cents,
        "tools_used": list(run.tools_used),
        "created_at": rfc3339(run.created_at),
    }
    if run.response is not None:
        out["response"] = run.response
    if run.error is not None:
        out["error"] = run.error
    if run.error_code is not None:
        out["error_code"] = run.error_code
    if run.started_at is not None:
        out["started_at"] = rfc3339(run.started_at)
    if run.finished_at is not None:
        out["finished_at"] = rfc3339(run.finished_at)
    return out


def chat_result(run: Run) -> dict[str, Any]:
    """The body of ``POST /api/chat`` (and of chat.send, agent.wait, the SSE ``done``)."""
    return {
        "session_id": run.session_id,
        "run_id": run.id,
        "status": run.status,
        "response": run.response or "",
        "tools_used": list(run.tools_used),
        "tokens": tokens_view(run),
        "cost_cents": run.cost_cents,
    }


def approval_view(a: dict[str, Any]) -> dict[str, Any]:
    out = {k: a[k] for k in ("id", "run_id", "session_id", "tool", "input", "status")}
    out["created_at"] = rfc3339(a["created_at"])
    if a.get("resolved_at") is not None:
        out["resolved_at"] = rfc3339(a["resolved_at"])
    if a.get("reason") is not None:
        out["reason"] = a["reason"]
    return out
