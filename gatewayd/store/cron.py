"""Cron jobs and their runs in the store: values and the query functions behind them.

The functions take a ``sqlite3.Connection`` first and are called through ``store.run`` so
they join the writer thread's queue in order with every other write (a firing's job update
always lands before the run it records).  The cron service keeps the jobs in memory and
writes whole-row snapshots; the store is what survives a restart.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import attrs

from gatewayd.schedule import CatchUp, Schedule, parse_catch_up, parse_schedule

__all__ = [
    "CronJob",
    "CronRun",
    "delete_job",
    "delete_jobs",
    "finish_cron_run",
    "job_from_row",
    "list_cron_runs",
    "load_job_rows",
    "record_cron_run",
    "save_jobs",
]

_JOB_COLUMNS = (
    "id, name, schedule, payload, channel, enabled, catch_up, created_at, next_run_at, "
    "last_run_at, last_status, origin, owner"
)


@attrs.frozen
class CronJob:
    """One scheduled agent turn.

    ``created_at`` is also the grid anchor of an ``every`` schedule (reset when the schedule
    changes); ``next_run_at`` is None for a disabled job or one with no firing left.
    """

    id: str
    name: str
    schedule: Schedule
    prompt: str
    session_id: str | None = None
    channel: str = ""
    enabled: bool = True
    catch_up: CatchUp = "once"
    created_at: float = 0.0
    next_run_at: float | None = None
    last_run_at: float | None = None
    last_status: str | None = None
    #: "api" (made over the API) or "config" (declared in [[cron.jobs]])
    origin: str = "api"
    #: the token id runs are started for ("cron" for config jobs)
    owner: str = ""

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "agentTurn", "prompt": self.prompt}
        if self.session_id is not None:
            out["session_id"] = self.session_id
        return out


@attrs.frozen
class CronRun:
    """One firing of a job: the run it started (None when skipped or refused) and its end."""

    id: int
    job_id: str
    run_id: str | None
    started_at: float
    finished_at: float | None
    status: str
    excerpt: str | None
    session_id: str | None = None


@functools.lru_cache(maxsize=4096)
def _schedule(text: str) -> Schedule:
    """Stored schedules repeat (many jobs, few expressions): parse each text once."""
    return parse_schedule(json.loads(text))


def job_from_row(row: tuple[Any, ...]) -> CronJob:
    """Rebuild a job; raises (GatewayError / ValueError) if the stored row no longer parses."""
    (
        jid,
        name,
        schedule,
        payload,
        channel,
        enabled,
        catch_up,
        created_at,
        next_run_at,
        last_run_at,
        last_status,
        origin,
        owner,
    ) = row
    body = json.loads(payload)
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        raise ValueError("payload without a prompt")
    session_id = body.get("session_id")
    return CronJob(
        id=jid,
        name=name,
        schedule=_schedule(schedule),
        prompt=body["prompt"],
        session_id=session_id if isinstance(session_id, str) else None,
        channel=channel,
        enabled=bool(enabled),
        catch_up=parse_catch_up(catch_up),
        created_at=created_at,
        next_run_at=next_run_at,
        last_run_at=last_run_at,
        last_status=last_status,
        origin=origin,
        owner=owner,
    )


def _job_values(job: CronJob) -> tuple[Any, ...]:
    return (
        job.id,
        job.name,
        json.dumps(job.schedule.to_json()),
        json.dumps(job.payload()),
        job.channel,
        int(job.enabled),
        job.catch_up,
        job.created_at,
        job.next_run_at,
        job.last_run_at,
        job.last_status,
        job.origin,
        job.owner,
    )


def load_job_rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(f"SELECT {_JOB_COLUMNS} FROM cron_jobs ORDER BY created_at, id").fetchall()


def save_jobs(conn: sqlite3.Connection, jobs: Sequence[CronJob]) -> None:
    """Insert or replace whole jobs (the service's in-memory copy is the newest)."""
    updates = ", ".join(
        f"{c} = excluded.{c}" for c in (s.strip() for s in _JOB_COLUMNS.split(",")) if c != "id"
    )
    conn.executemany(
        f"INSERT INTO cron_jobs ({_JOB_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
        f"ON CONFLICT(id) DO UPDATE SET {updates}",
        [_job_values(j) for j in jobs],
    )


def delete_job(conn: sqlite3.Connection, job_id: str) -> bool:
    conn.execute("DELETE FROM cron_runs WHERE job_id = ?", (job_id,))
    return conn.execute("DELETE FROM cron_jobs WHERE id = ?", (job_id,)).rowcount > 0


def delete_jobs(conn: sqlite3.Connection, job_ids: Sequence[str]) -> None:
    for job_id in job_ids:
        delete_job(conn, job_id)


def record_cron_run(
    conn: sqlite3.Connection,
    job_id: str,
    run_id: str | None,
    started_at: float,
    status: str,
    excerpt: str | None,
    finished_at: float | None,
    keep: int,
) -> int:
    """Add a run to a job's history, dropping the oldest beyond ``keep``; returns its row id."""
    cur = conn.execute(
        "INSERT INTO cron_runs (job_id, run_id, started_at, finished_at, status, excerpt) "
        "VALUES (?,?,?,?,?,?)",
        (job_id, run_id, started_at, finished_at, status, excerpt),
    )
    conn.execute(
        "DELETE FROM cron_runs WHERE job_id = ? AND id <= ("
        "SELECT id FROM cron_runs WHERE job_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (job_id, job_id, max(1, keep)),
    )
    row_id = cur.lastrowid
    assert row_id is not None
    return row_id


def finish_cron_run(
    conn: sqlite3.Connection, row_id: int, finished_at: float, status: str, excerpt: str | None
) -> None:
    conn.execute(
        "UPDATE cron_runs SET finished_at = ?, status = ?, excerpt = ? WHERE id = ?",
        (finished_at, status, excerpt, row_id),
    )


def list_cron_runs(conn: sqlite3.Connection, job_id: str, limit: int) -> list[CronRun]:
    """A job's runs, newest first, with the session each run used."""
    rows = conn.execute(
        "SELECT c.id, c.job_id, c.run_id, c.started_at, c.finished_at, c.status, c.excerpt, "
        "r.session_id FROM cron_runs c LEFT JOIN runs r ON r.id = c.run_id "
        "WHERE c.job_id = ? ORDER BY c.id DESC LIMIT ?",
        (job_id, limit),
    )
    return [CronRun(*row) for row in rows]
