"""What the store holds, as frozen values the core hands to every transport."""

from __future__ import annotations

from typing import Any

import attrs

RUN_STATES = ("queued", "running", "awaiting_approval", "completed", "failed", "aborted")
FINAL_RUN_STATES = ("completed", "failed", "aborted")


@attrs.frozen
class Interrupted:
    """What a start found unfinished from the last process: runs (now failed) and the
    approvals they waited on (now expired)."""

    #: (run id, session id, owner)
    runs: tuple[tuple[str, str, str], ...] = ()
    #: (approval id, run id, session id, owner)
    approvals: tuple[tuple[str, str, str, str], ...] = ()


@attrs.frozen
class Session:
    id: str
    owner: str
    title: str
    created_at: float
    last_activity: float
    message_count: int
    agent_id: str = ""
    channel: str = ""


@attrs.frozen
class Message:
    id: int
    session_id: str
    role: str
    content: str
    created_at: float
    run_id: str | None = None
    tool: str | None = None
    is_error: bool = False


@attrs.frozen
class Run:
    id: str
    session_id: str
    owner: str
    status: str
    created_at: float
    source: str = "api"
    response: str | None = None
    error: str | None = None
    error_code: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_cents: float = 0.0
    tools_used: tuple[str, ...] = ()
    started_at: float | None = None
    finished_at: float | None = None
    channel: str = ""

    def fields(self) -> dict[str, Any]:
        return attrs.asdict(self)
