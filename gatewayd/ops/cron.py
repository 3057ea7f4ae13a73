"""Cron jobs: list, add, read, change, remove, run now, and their run history (CONTRACT §10)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gatewayd.cron_jobs import job_view, run_view
from gatewayd.ops import Call, Param, operation
from gatewayd.scheduler import cron_service

if TYPE_CHECKING:
    from gatewayd.core import Gateway

JOB_ID = Param("job_id", str, required=True, is_id=True, aliases=("id",))
_SCHEDULE_DOC = (
    '{"type": "at", "at": RFC 3339} | {"type": "every", "seconds": n} | '
    '{"type": "cron", "expr": "*/15 * * * *", "tz"?: IANA zone}'
)
_FIELDS = (
    Param("name", str, max_length=200),
    Param("payload", dict, doc='{"type": "agentTurn", "prompt": "...", "session_id"?: "..."}'),
    Param("prompt", str, doc="shorthand for payload.prompt"),
    Param("channel", str, max_length=200, doc="deliver each answer to this bridge[:target]"),
    Param("enabled", bool),
    Param(
        "catch_up",
        str,
        choices=("once", "skip"),
        doc="what a firing missed while the gateway was down gets (default once)",
    ),
)


def _fields(p: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in p.items() if v is not None and k not in ("id", "job_id")}


@operation("cron.list", "read", summary="Cron jobs")
async def cron_list(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return {"jobs": [job_view(j) for j in await cron_service(gw).all_jobs()]}


@operation(
    "cron.add",
    "operate",
    Param("id", str, is_id=True, doc="default: generated"),
    Param("schedule", dict, required=True, doc=_SCHEDULE_DOC),
    *_FIELDS,
    status=201,
    strict=True,
    summary="Add a cron job",
)
async def cron_add(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    job = await cron_service(gw).add(call.principal, _fields(p), job_id=p["id"])
    gw.audit(call.principal, "cron.add", job.id)
    return job_view(job)


@operation("cron.get", "read", JOB_ID, summary="A cron job")
async def cron_get(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return job_view(await cron_service(gw).get(p["job_id"]))


@operation(
    "cron.update",
    "operate",
    JOB_ID,
    Param("schedule", dict, doc=_SCHEDULE_DOC),
    *_FIELDS,
    strict=True,
    summary="Change a cron job (payload is merged; a new schedule restarts from now)",
)
async def cron_update(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    job = await cron_service(gw).update(p["job_id"], _fields(p))
    gw.audit(call.principal, "cron.update", job.id)
    return job_view(job)


@operation(
    "cron.remove", "operate", JOB_ID, status=204, summary="Remove a cron job and its run history"
)
async def cron_remove(gw: Gateway, call: Call, p: dict[str, Any]) -> None:
    await cron_service(gw).remove(p["job_id"])
    gw.audit(call.principal, "cron.remove", p["job_id"])


@operation("cron.run", "operate", JOB_ID, status=202, summary="Run a cron job now")
async def cron_run(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    live = await cron_service(gw).run_now(p["job_id"])
    gw.audit(call.principal, "cron.run", p["job_id"], run_id=live.run.id)
    return {"run_id": live.run.id, "session_id": live.run.session_id}


@operation(
    "cron.runs",
    "read",
    JOB_ID,
    Param("limit", int, default=100, minimum=1, maximum=1000),
    summary="A cron job's runs, newest first",
)
async def cron_runs(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    runs = await cron_service(gw).job_runs(p["job_id"], p["limit"])
    return {"runs": [run_view(r) for r in runs]}
