"""Cron jobs survive a real ``twistd gateway`` restart, with exactly one catch-up run."""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from gatewayd.schedule import parse_rfc3339, rfc3339
from tests.harness import Process, spawn

T = TypeVar("T")
#: the checkout first on the path, so the child runs these sources whatever is installed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"PYTHONPATH": ROOT}


def poll(probe: Callable[[], T], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last: {value!r}")
        time.sleep(0.1)


def runs(p: Process, job_id: str) -> list[dict[str, Any]]:
    code, body = p.request("GET", f"/api/cron/{job_id}/runs")
    assert code == 200, body
    return sorted(body["runs"], key=lambda r: r["started_at"])


def done(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rs if r["status"] == "completed"]


def test_jobs_survive_sigterm_and_catch_up_once(tmp_path: Any) -> None:
    state = str(tmp_path / "state")
    p = spawn(state, env=ENV)
    try:
        code, every = p.request(
            "POST",
            "/api/cron",
            {"name": "tick", "schedule": {"type": "every", "seconds": 1}, "prompt": "tick"},
        )
        assert code == 201, every
        code, at = p.request(
            "POST",
            "/api/cron",
            {
                "schedule": {"type": "at", "at": rfc3339(time.time() + 1.2, digits=3)},
                "prompt": "once",
            },
        )
        assert code == 201, at
        assert p.terminate() == 0
    finally:
        p.kill()
    grid0 = parse_rfc3339(every["next_run_at"])
    due = next_run_at_offline(state, every["id"])  # grid0, or later if it fired before the stop
    # stay down until at least two firings of "tick" (and the `at`) were missed
    time.sleep(max(0.0, due + 1.3 - time.time()))
    restarted = time.time()
    p = spawn(state, env=ENV)
    try:
        code, job = p.request("GET", f"/api/cron/{every['id']}")
        assert code == 200 and job["name"] == "tick" and job["enabled"]

        def since_restart() -> list[dict[str, Any]]:
            return [
                r for r in done(runs(p, every["id"])) if parse_rfc3339(r["started_at"]) >= restarted
            ]

        after = poll(since_restart, lambda rs: len(rs) >= 2)
        first = parse_rfc3339(after[0]["started_at"])
        # the first regular firing after the catch-up, on the job's one-second grid
        grid = grid0 + math.floor(first - grid0 + 1e-3) + 1
        early = [r for r in after if parse_rfc3339(r["started_at"]) < grid - 0.01]
        assert len(early) == 1, (after, grid)
        assert abs(parse_rfc3339(after[1]["started_at"]) - grid) < 0.5, (after, grid)
        # the missed `at` job ran once at start, then disabled itself
        at_runs = poll(lambda: done(runs(p, at["id"])), lambda rs: len(rs) >= 1)
        assert len(at_runs) == 1
        code, at_job = p.request("GET", f"/api/cron/{at['id']}")
        assert (at_job["enabled"], at_job["next_run_at"]) == (False, None)
        assert p.terminate() == 0
    finally:
        p.kill()


def next_run_at_offline(state: str, job_id: str) -> float:
    """The job's next firing as the stopped gateway left it in its store."""
    conn = sqlite3.connect(os.path.join(state, "gatewayd.sqlite3"))
    try:
        [(due,)] = conn.execute("SELECT next_run_at FROM cron_jobs WHERE id = ?", (job_id,))
        return float(due)
    finally:
        conn.close()
