"""Cron, heartbeat and the operations over REST against the real service tree on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest_twisted
import treq
from twisted.internet.defer import Deferred

from gatewayd.events import Event
from gatewayd.heartbeat import HeartbeatService
from gatewayd.schedule import parse_rfc3339, rfc3339
from gatewayd.scheduler import CronService
from tests.harness import ADMIN, CHAT, OPERATOR, VIEWER, Running, auth, start_gateway

T = TypeVar("T")


async def call(
    g: Running, method: str, path: str, body: Any = None, token: str = ADMIN
) -> tuple[int, Any]:
    from twisted.internet import reactor
    from twisted.web.client import HTTPConnectionPool

    data = None if body is None else json.dumps(body).encode()
    # no keep-alive: nothing (no idle-connection timer) outlives the test
    pool = HTTPConnectionPool(reactor, persistent=False)
    resp = await treq.request(method, g.url + path, data=data, headers=auth(token), pool=pool)
    raw = await resp.content()
    return resp.code, json.loads(raw) if raw else None


def pause(seconds: float) -> Deferred[None]:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


async def until(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 5.0
) -> T:
    """Poll ``probe`` until ``ok`` holds, within a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last value: {value!r}")
        await pause(0.1)


def cron_of(g: Running) -> CronService:
    svc = g.service.getServiceNamed("cron")
    assert isinstance(svc, CronService)
    return svc


def in_(seconds: float) -> str:
    return rfc3339(time.time() + seconds, digits=3)


async def runs_of(g: Running, job_id: str) -> list[dict[str, Any]]:
    code, body = await call(g, "GET", f"/api/cron/{job_id}/runs")
    assert code == 200
    return body["runs"]  # type: ignore[no-any-return]


def finished(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if r["status"] not in ("running", "queued")]


@pytest_twisted.ensureDeferred
async def test_every_second_job_fires_records_and_emits_cron_fired(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    fired: list[Event] = []
    sub = g.gateway.bus.subscribe(lambda e: fired.append(e) if e.type == "cron_fired" else None)
    try:
        body = {
            "name": "pulse",
            "schedule": {"type": "every", "seconds": 1},
            "payload": {"type": "agentTurn", "prompt": "pulse check"},
            "channel": "slack",
        }
        code, job = await call(g, "POST", "/api/cron", body, token=OPERATOR)
        assert code == 201
        assert list(job) == [
            "id",
            "name",
            "schedule",
            "payload",
            "channel",
            "enabled",
            "catch_up",
            "next_run_at",
            "last_run_at",
            "last_status",
            "origin",
        ]
        assert job["schedule"] == {"type": "every", "seconds": 1}
        assert job["payload"] == {"type": "agentTurn", "prompt": "pulse check"}
        assert (job["enabled"], job["catch_up"], job["last_run_at"]) == (True, "once", None)
        created = time.time()
        assert abs(parse_rfc3339(job["next_run_at"]) - (created + 1)) < 0.5
        runs = await until(lambda: runs_of(g, job["id"]), lambda r: bool(finished(r)))
        run = finished(runs)[-1]
        assert run["status"] == "completed" and run["excerpt"] == "pulse check"
        assert set(run) == {
            "run_id",
            "session_id",
            "started_at",
            "finished_at",
            "status",
            "excerpt",
        }
        assert fired and fired[0].payload["job_id"] == job["id"]
        assert fired[0].payload["name"] == "pulse"
        assert fired[0].envelope()["type"] == "cron_fired"
        code, r = await call(g, "GET", f"/api/runs/{run['run_id']}")
        assert code == 200 and r["response"] == "pulse check"
        code, listed = await call(g, "GET", "/api/cron", token=VIEWER)
        assert code == 200 and [j["id"] for j in listed["jobs"]] == [job["id"]]
        assert listed["jobs"][0]["last_status"] == "completed"
        code, _ = await call(g, "DELETE", f"/api/cron/{job['id']}")
        assert code == 204
        assert cron_of(g).armed_at is None
        code, _ = await call(g, "GET", f"/api/cron/{job['id']}")
        assert code == 404
    finally:
        sub.cancel()
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_at_job_fires_exactly_once(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        body = {"schedule": {"type": "at", "at": in_(0.3)}, "prompt": "just once"}
        code, job = await call(g, "POST", "/api/cron", body)
        assert code == 201 and job["name"] == job["id"]
        await until(lambda: runs_of(g, job["id"]), lambda r: bool(finished(r)))
        code, after = await call(g, "GET", f"/api/cron/{job['id']}")
        assert (after["enabled"], after["next_run_at"], after["last_status"]) == (
            False,
            None,
            "completed",
        )
        # nothing left to fire: the only timer is disarmed, and the history has one run
        assert cron_of(g).armed_at is None
        assert len(await runs_of(g, job["id"])) == 1
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_disabled_job_does_not_fire_and_run_now_works(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        sched = {"type": "every", "seconds": 0.2}
        code, off = await call(
            g, "POST", "/api/cron", {"schedule": sched, "prompt": "off", "enabled": False}
        )
        assert code == 201 and off["next_run_at"] is None
        code, on = await call(g, "POST", "/api/cron", {"schedule": sched, "prompt": "on"})
        assert code == 201
        # the enabled twin fires three times meanwhile; the disabled one never
        await until(lambda: runs_of(g, on["id"]), lambda r: len(finished(r)) >= 3)
        assert await runs_of(g, off["id"]) == []
        code, _ = await call(g, "PATCH", f"/api/cron/{on['id']}", {"enabled": False})
        assert code == 200
        # run now, on the disabled job
        code, started = await call(g, "POST", f"/api/cron/{off['id']}/run", token=OPERATOR)
        assert code == 202 and set(started) == {"run_id", "session_id"}
        code, run = await until(
            lambda: call(g, "GET", f"/api/runs/{started['run_id']}"),
            lambda r: r[1]["status"] == "completed",
        )
        assert run["response"] == "off" and run["session_id"] == started["session_id"]
        runs = await until(lambda: runs_of(g, off["id"]), lambda r: bool(finished(r)))
        assert [(r["run_id"], r["status"]) for r in runs] == [(started["run_id"], "completed")]
        code, job = await call(g, "GET", f"/api/cron/{off['id']}")
        assert job["enabled"] is False and job["last_run_at"] is not None
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_cron_validation_scopes_and_patch(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        bad = [
            {"schedule": {"type": "at", "at": "next tuesday"}, "prompt": "x"},
            {"schedule": {"type": "every", "seconds": 0}, "prompt": "x"},
            {"schedule": {"type": "every", "seconds": -1}, "prompt": "x"},
            {"schedule": {"type": "fortnightly"}, "prompt": "x"},
            {"schedule": {"type": "cron", "expr": "not a cron"}, "prompt": "x"},
            {
                "schedule": {"type": "cron", "expr": "0 9 * * *", "tz": "Nowhere/Land"},
                "prompt": "x",
            },
            {
                "schedule": {"type": "every", "seconds": 5},
                "payload": {"type": "shell", "prompt": "x"},
            },
            {"schedule": {"type": "every", "seconds": 5}},
            {"schedule": "every 5s", "prompt": "x"},
            {"schedule": {"type": "every", "seconds": 5}, "prompt": "x", "colour": "red"},
            {"prompt": "x"},
        ]
        for body in bad:
            code, err = await call(g, "POST", "/api/cron", body)
            assert (code, err["error"]["code"]) == (400, "invalid_request"), body
        good = {
            "schedule": {"type": "cron", "expr": "0 9 * * 1-5", "tz": "Europe/Berlin"},
            "payload": {"prompt": "standup", "session_id": "standup"},
            "id": "standup",
        }
        assert (await call(g, "POST", "/api/cron", good, token=VIEWER))[0] == 403
        assert (await call(g, "GET", "/api/cron", token=CHAT))[0] == 403
        code, job = await call(g, "POST", "/api/cron", good)
        assert code == 201 and job["id"] == "standup"
        assert parse_rfc3339(job["next_run_at"]) > time.time()
        assert (await call(g, "POST", "/api/cron", good))[0] == 409
        code, job = await call(
            g,
            "PATCH",
            "/api/cron/standup",
            {"schedule": {"type": "every", "seconds": 3600}, "name": "hourly"},
        )
        assert code == 200 and job["name"] == "hourly"
        assert abs(parse_rfc3339(job["next_run_at"]) - time.time() - 3600) < 5
        assert job["payload"]["session_id"] == "standup"
        code, err = await call(g, "PATCH", "/api/cron/standup", {"schedule": {"type": "x"}})
        assert code == 400
        assert (await call(g, "PATCH", "/api/cron/nope", {"name": "x"}))[0] == 404
        assert (await call(g, "POST", "/api/cron/nope/run"))[0] == 404
        assert (await call(g, "GET", "/api/cron/nope/runs"))[0] == 404
        assert (await call(g, "DELETE", "/api/cron/standup", token=VIEWER))[0] == 403
        assert (await call(g, "PUT", "/api/cron/standup", {}))[0] == 405
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_heartbeat_alerts_when_the_real_store_turns_read_only(tmp_path: Any) -> None:
    config = '[heartbeat]\ninterval_s = 3600\nprompt = "report"\nchannel = "telegram"\n'
    from tests.harness import TOKENS_TOML

    g = await start_gateway(str(tmp_path), TOKENS_TOML + config)
    alerts: list[Event] = []
    sub = g.gateway.bus.subscribe(
        lambda e: alerts.append(e) if e.type == "heartbeat_alert" else None
    )
    hb = g.service.getServiceNamed("heartbeat")
    assert isinstance(hb, HeartbeatService)
    # the writer thread's own connection (SQLite serializes use from two threads): once the
    # database refuses writes, even the engine's BEGIN IMMEDIATE fails, so it is switched
    # back from here rather than through store.run
    conn = await g.gateway.store.run(lambda conn: conn)
    try:
        conn.execute("PRAGMA query_only = 1")
        results = await hb.beat()
        assert results["store"] is not None and "readonly" in results["store"]
        checks = {e.payload["check"]: e.payload for e in alerts}
        assert checks["store"]["channel"] == "telegram"
        # the prompt could not even be stored, so that check fails too; the others pass
        assert results["disk"] is None and results["provider"] is None
        conn.execute("PRAGMA query_only = 0")
        alerts.clear()
        results = await hb.beat()
        assert results == {"store": None, "disk": None, "provider": None, "prompt": "report"}
        assert [(e.payload["check"], e.payload["message"]) for e in alerts] == [
            ("prompt", "report")
        ]
    finally:
        sub.cancel()
        conn.execute("PRAGMA query_only = 0")
        await g.stop()
