"""The cron service on a fake Clock: one armed timer, firing, catch-up, no double start."""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar, cast

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure

from gatewayd import scheduler
from gatewayd.config import Config, ConfigError
from gatewayd.cron_jobs import job_view, parse_job_fields
from gatewayd.errors import GatewayError
from gatewayd.schedule import parse_rfc3339, rfc3339
from gatewayd.scheduler import CronService
from tests.clockgw import OPERATOR, T0, ClockGateway, GateProvider, clock_gateway, evolve_config

T = TypeVar("T")


def done(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that, on the synchronous store, finishes at once."""
    d: Deferred[T] = ensureDeferred(coro)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "did not finish synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return cast(T, results[0])


def every(seconds: float, prompt: str = "tick", **extra: Any) -> dict[str, Any]:
    return {
        "schedule": {"type": "every", "seconds": seconds},
        "payload": {"prompt": prompt},
        **extra,
    }


def at(ts: float, prompt: str = "once", **extra: Any) -> dict[str, Any]:
    return {"schedule": {"type": "at", "at": rfc3339(ts)}, "payload": {"prompt": prompt}, **extra}


def timer_calls(cg: ClockGateway, svc: CronService) -> list[Any]:
    """Pending calls of the cron timer (the bus's batched event saves are not it)."""
    return [
        c for c in cg.clock.getDelayedCalls() if getattr(c.func, "__self__", None) is svc._timer
    ]


def started(tmp: str, config: Config | None = None, **kw: Any) -> tuple[ClockGateway, CronService]:
    cg = clock_gateway(tmp, config, **kw)
    svc = CronService(cg.gw, clock=cg.clock)
    svc.startService()
    return cg, svc


def runs(cg: ClockGateway, job_id: str) -> list[tuple[Any, ...]]:
    return cg.sql(
        "SELECT status, excerpt, run_id, started_at FROM cron_runs WHERE job_id = ? ORDER BY id",
        job_id,
    )


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


# --- arming ------------------------------------------------------------------------------


def test_one_call_armed_for_the_earliest_job_and_rearmed_on_every_change(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    assert svc.armed_at is None and timer_calls(cg, svc) == []
    a = done(svc.add(OPERATOR, every(100)))
    assert svc.armed_at == T0 + 100
    b = done(svc.add(OPERATOR, every(50)))
    c = done(svc.add(OPERATOR, {**every(10), "enabled": False}))
    [call] = timer_calls(cg, svc)
    assert call.getTime() == T0 + 50 and svc.armed_at == T0 + 50
    assert c.next_run_at is None
    # update: b moves later, so a is now the earliest
    b = done(svc.update(b.id, {"schedule": {"type": "every", "seconds": 500}}))
    assert b.next_run_at == T0 + 500
    [call] = timer_calls(cg, svc)
    assert call.getTime() == T0 + 100
    # enabling c (every 10 from now) makes it the earliest
    done(svc.update(c.id, {"enabled": True}))
    [call] = timer_calls(cg, svc)
    assert call.getTime() == T0 + 10
    done(svc.remove(c.id))
    done(svc.remove(a.id))
    [call] = timer_calls(cg, svc)
    assert call.getTime() == T0 + 500
    done(svc.update(b.id, {"enabled": False}))
    assert timer_calls(cg, svc) == [] and svc.armed_at is None
    svc.stopService()
    cg.clock.advance(0)
    assert cg.clock.getDelayedCalls() == []


def test_stop_disarms_and_jobs_survive_in_the_store(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    job = done(svc.add(OPERATOR, every(30, channel="telegram", name="hello")))
    svc.stopService()
    assert timer_calls(cg, svc) == []
    again = CronService(cg.gw, clock=cg.clock)
    again.startService()
    [loaded] = done(again.all_jobs())
    assert loaded == job
    assert job_view(loaded) == {
        "id": job.id,
        "name": "hello",
        "schedule": {"type": "every", "seconds": 30},
        "payload": {"type": "agentTurn", "prompt": "tick"},
        "channel": "telegram",
        "enabled": True,
        "catch_up": "once",
        "next_run_at": rfc3339(T0 + 30, digits=3),
        "last_run_at": None,
        "last_status": None,
        "origin": "api",
    }
    again.stopService()


# --- firing ------------------------------------------------------------------------------


def test_every_job_fires_on_its_grid_and_records_its_runs(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    job = done(svc.add(OPERATOR, every(10, prompt="status report", channel="slack")))
    cg.clock.advance(9.9)
    assert cg.of_type("cron_fired") == []
    cg.clock.advance(0.1)
    [fired] = cg.of_type("cron_fired")
    assert fired.payload == {"job_id": job.id, "name": job.id, "channel": "slack", "manual": False}
    [(status, excerpt, run_id, started_at)] = runs(cg, job.id)
    assert (status, excerpt, started_at) == ("completed", "status report", T0 + 10)
    [(source, channel, owner)] = cg.sql(
        "SELECT source, channel, owner FROM runs WHERE id = ?", run_id
    )
    assert (source, channel, owner) == ("cron", "slack", OPERATOR.token_id)
    now = done(svc.get(job.id))
    assert (now.next_run_at, now.last_run_at, now.last_status) == (T0 + 20, T0 + 10, "completed")
    assert svc.armed_at == T0 + 20
    cg.clock.advance(10)
    assert [r[0] for r in runs(cg, job.id)] == ["completed", "completed"]
    # each firing runs in a fresh session; payload.session_id pins one
    sessions = {r[0] for r in cg.sql("SELECT session_id FROM runs")}
    assert len(sessions) == 2
    svc.stopService()


def test_pinned_session_and_late_timer_do_not_burst(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    job = done(svc.add(OPERATOR, {**every(10), "payload": {"prompt": "p", "session_id": "s1"}}))
    # the reactor was blocked for 55 s: one firing, then back on the grid (no burst of five)
    cg.clock.advance(55)
    assert len(runs(cg, job.id)) == 1
    assert done(svc.get(job.id)).next_run_at == T0 + 60
    cg.clock.advance(5)
    assert len(runs(cg, job.id)) == 2
    assert {r[0] for r in cg.sql("SELECT session_id FROM runs")} == {"s1"}
    svc.stopService()


def test_at_job_fires_once_then_disables_itself(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    job = done(svc.add(OPERATOR, at(T0 + 30)))
    assert svc.armed_at == T0 + 30
    cg.clock.advance(30)
    assert len(runs(cg, job.id)) == 1
    after = done(svc.get(job.id))
    assert (after.enabled, after.next_run_at, after.last_status) == (False, None, "completed")
    assert timer_calls(cg, svc) == []
    cg.clock.advance(10_000)
    assert len(runs(cg, job.id)) == 1
    [(enabled,)] = cg.sql("SELECT enabled FROM cron_jobs WHERE id = ?", job.id)
    assert enabled == 0
    svc.stopService()


def test_an_at_in_the_past_fires_at_once(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    job = done(svc.add(OPERATOR, at(T0 - 5)))
    cg.clock.advance(0)
    assert len(runs(cg, job.id)) == 1
    assert not done(svc.get(job.id)).enabled
    svc.stopService()


def test_a_job_whose_run_is_still_going_is_not_started_twice(tmp_path: Any) -> None:
    provider = GateProvider()
    cg, svc = started(str(tmp_path), provider=provider)
    job = done(svc.add(OPERATOR, every(10)))
    cg.clock.advance(10)
    assert len(provider.waiting) == 1
    assert [r[0] for r in runs(cg, job.id)] == ["running"]
    with pytest.raises(GatewayError) as e:
        done(svc.run_now(job.id))
    assert e.value.code == "conflict"
    cg.clock.advance(10)  # still going: recorded as skipped, nothing submitted
    assert len(provider.waiting) == 1
    assert [r[0] for r in runs(cg, job.id)] == ["running", "skipped"]
    assert done(svc.get(job.id)).last_status == "skipped"
    assert len(cg.of_type("cron_fired")) == 1
    provider.release()
    assert [r[0] for r in runs(cg, job.id)] == ["completed", "skipped"]
    cg.clock.advance(10)
    assert len(provider.waiting) == 1
    provider.release()
    assert [r[0] for r in runs(cg, job.id)] == ["completed", "skipped", "completed"]
    svc.stopService()


def test_run_now_outside_the_schedule(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    job = done(svc.add(OPERATOR, {**every(3600), "enabled": False}))
    live = done(svc.run_now(job.id))
    assert live.run.source == "cron"
    [(status, _, run_id, _)] = runs(cg, job.id)
    assert (status, run_id) == ("completed", live.run.id)
    assert cg.of_type("cron_fired")[0].payload["manual"] is True
    assert done(svc.get(job.id)).last_run_at == T0
    with pytest.raises(GatewayError) as e:
        done(svc.run_now("nope"))
    assert e.value.code == "not_found"
    svc.stopService()


def test_a_run_that_cannot_start_is_recorded_failed(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    job = done(svc.add(OPERATOR, every(10)))
    cg.gw.runs.accepting = False  # as while shutting down
    cg.clock.advance(10)
    [(status, excerpt, run_id, _)] = runs(cg, job.id)
    assert (status, run_id) == ("failed", None)
    assert "shutting down" in excerpt
    assert svc.armed_at == T0 + 20
    svc.stopService()


def test_history_is_trimmed_to_cron_runs_keep(tmp_path: Any) -> None:
    config = evolve_config(Config(), retention={"cron_runs_keep": 3})
    cg, svc = started(str(tmp_path), config)
    job = done(svc.add(OPERATOR, every(1)))
    other = done(svc.add(OPERATOR, every(100)))
    cg.clock.pump([1] * 6)
    assert [r[3] for r in runs(cg, job.id)] == [T0 + 4, T0 + 5, T0 + 6]
    assert done(svc.job_runs(job.id, 2))[0].started_at == T0 + 6
    assert runs(cg, other.id) == []
    svc.stopService()


def test_the_timer_survives_a_job_that_raises(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, logged: list[LogEvent]
) -> None:
    cg, svc = started(str(tmp_path))
    bad = done(svc.add(OPERATOR, every(10, prompt="bad")))
    good = done(svc.add(OPERATOR, every(10, prompt="good")))
    real = scheduler.next_fire

    def broken(schedule: Any, *, after: float, created_at: float) -> float | None:
        if svc._jobs[bad.id].schedule is schedule and after < T0 + 15:
            raise RuntimeError("boom")
        return real(schedule, after=after, created_at=created_at)

    monkeypatch.setattr(scheduler, "next_fire", broken)
    cg.clock.advance(10)
    assert [e for e in logged if "log_failure" in e and e["log_failure"].check(RuntimeError)]
    assert runs(cg, bad.id) == []
    assert len(runs(cg, good.id)) == 1
    assert done(svc.get(bad.id)).next_run_at == T0 + 10 + scheduler.RETRY_AFTER_ERROR_S
    assert svc.armed_at == T0 + 20  # still ticking
    cg.clock.advance(10)
    assert len(runs(cg, good.id)) == 2
    cg.clock.advance(50)
    assert len(runs(cg, bad.id)) == 1  # retried, and back on its grid
    assert done(svc.get(bad.id)).next_run_at == T0 + 80
    svc.stopService()


def test_cron_expression_across_the_spring_forward_gap(tmp_path: Any) -> None:
    # Europe/Berlin skips 02:00-03:00 on 2026-03-29: "30 2 * * *" fires at 03:00 CEST that day
    start = parse_rfc3339("2026-03-28T12:00:00Z")
    cg, svc = started(str(tmp_path), now=start)
    spec = {
        "schedule": {"type": "cron", "expr": "30 2 * * *", "tz": "Europe/Berlin"},
        "payload": {"prompt": "nightly"},
    }
    job = done(svc.add(OPERATOR, spec))
    expected = ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z", "2026-03-31T00:30:00Z"]
    seen = []
    for want in expected:
        assert svc.armed_at == parse_rfc3339(want)
        cg.clock.advance(parse_rfc3339(want) - cg.clock.seconds())
        seen.append(rfc3339(runs(cg, job.id)[-1][3]))
    assert seen == expected
    svc.stopService()


# --- start-up ----------------------------------------------------------------------------


def _restart(cg: ClockGateway, svc: CronService, down_s: float) -> CronService:
    svc.stopService()
    cg.clock.advance(down_s)
    again = CronService(cg.gw, clock=cg.clock)
    again.startService()
    return again


def test_catch_up_once_runs_one_missed_firing_and_skip_none(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    once = done(svc.add(OPERATOR, every(60, prompt="once")))
    skip = done(svc.add(OPERATOR, every(60, prompt="skip", catch_up="skip")))
    svc = _restart(cg, svc, 10 * 60 + 30)  # ten firings missed
    now = T0 + 630
    assert done(svc.get(once.id)).next_run_at == now  # due at once
    assert done(svc.get(skip.id)).next_run_at == T0 + 660
    cg.clock.advance(0)
    assert [r[3] for r in runs(cg, once.id)] == [now]
    assert runs(cg, skip.id) == []
    assert done(svc.get(once.id)).next_run_at == T0 + 660  # back on the grid
    cg.clock.advance(30)
    assert [r[3] for r in runs(cg, once.id)] == [now, T0 + 660]
    assert [r[3] for r in runs(cg, skip.id)] == [T0 + 660]
    svc.stopService()


def test_no_catch_up_when_nothing_was_missed(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    job = done(svc.add(OPERATOR, every(60)))
    cg.clock.advance(60)
    svc = _restart(cg, svc, 30)
    cg.clock.advance(0)
    assert len(runs(cg, job.id)) == 1
    assert svc.armed_at == T0 + 120
    svc.stopService()


def test_missed_at_jobs_run_once_or_not_and_disable(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    once = done(svc.add(OPERATOR, at(T0 + 10)))
    skip = done(svc.add(OPERATOR, at(T0 + 10, catch_up="skip")))
    svc = _restart(cg, svc, 100)
    cg.clock.advance(0)
    assert len(runs(cg, once.id)) == 1 and runs(cg, skip.id) == []
    assert not done(svc.get(once.id)).enabled
    assert not done(svc.get(skip.id)).enabled
    svc = _restart(cg, svc, 100)  # and never again
    cg.clock.advance(0)
    assert len(runs(cg, once.id)) == 1
    assert svc.armed_at is None
    svc.stopService()


# --- config jobs -------------------------------------------------------------------------


def _with_jobs(*jobs: dict[str, Any]) -> Config:
    return evolve_config(Config(), cron={"jobs": tuple(jobs)})


def test_config_jobs_sit_beside_api_jobs_and_are_upserted_by_id(tmp_path: Any) -> None:
    config = _with_jobs(
        {"id": "daily", "name": "Daily", **every(86400, prompt="report")},
        {"name": "named-only", **at(T0 + 5)},
    )
    cg, svc = started(str(tmp_path), config)
    api = done(svc.add(OPERATOR, every(50)))
    jobs = {j.id: j for j in done(svc.all_jobs())}
    assert set(jobs) == {"daily", "named-only", api.id}
    assert jobs["daily"].origin == "config" and jobs["daily"].owner == "cron"
    assert jobs["daily"].name == "Daily"
    for change in (svc.update("daily", {"enabled": False}), svc.remove("daily")):
        with pytest.raises(GatewayError) as e:
            done(change)
        assert e.value.code == "conflict"
    cg.clock.advance(5)  # the config `at` fires and disables itself
    [(owner,)] = cg.sql("SELECT owner FROM runs")
    assert owner == "cron"
    svc.stopService()
    # restart with the daily job changed and the at job gone from the config
    cg.gw.config = _with_jobs({"id": "daily", "name": "Daily!", **every(3600, prompt="r")})
    again = CronService(cg.gw, clock=cg.clock)
    again.startService()
    jobs = {j.id: j for j in done(again.all_jobs())}
    assert set(jobs) == {"daily", api.id}
    assert jobs["daily"].name == "Daily!" and jobs["daily"].prompt == "r"
    assert jobs["daily"].next_run_at == cg.clock.seconds() + 3600  # new schedule, from now
    assert runs(cg, "named-only") == []  # its history went with it
    again.stopService()


def test_a_fired_config_at_job_stays_disabled_across_restarts(tmp_path: Any) -> None:
    config = _with_jobs({"id": "once", **at(T0 + 5)})
    cg, svc = started(str(tmp_path), config)
    cg.clock.advance(5)
    svc = _restart(cg, svc, 10)
    cg.clock.advance(0)
    assert len(runs(cg, "once")) == 1
    assert not done(svc.get("once")).enabled
    svc.stopService()


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (
            {"schedule": {"type": "every", "seconds": 5}, "payload": {"prompt": "x"}},
            "cron.jobs[0].id: required",
        ),
        (
            {"id": "a", "schedule": {"type": "hourly"}, "payload": {"prompt": "x"}},
            "cron.jobs[0]: schedule.type must be one of",
        ),
        ({"id": "a", "schedule": {"type": "every", "seconds": 5}}, "cron.jobs[0]: payload"),
        (
            {"id": "a", "schedule": {"type": "every", "seconds": 5}, "prompt": "x", "color": 1},
            "unknown field(s): color",
        ),
    ],
)
def test_a_bad_config_job_is_a_config_error(
    tmp_path: Any, job: dict[str, Any], message: str
) -> None:
    cg = clock_gateway(str(tmp_path), _with_jobs(job))
    with pytest.raises(ConfigError) as e:
        CronService(cg.gw, clock=cg.clock)
    assert message in str(e.value)


def test_duplicate_config_ids_are_refused(tmp_path: Any) -> None:
    cg = clock_gateway(str(tmp_path), _with_jobs({"id": "a", **every(5)}, {"id": "a", **every(6)}))
    with pytest.raises(ConfigError, match="declared twice"):
        CronService(cg.gw, clock=cg.clock)


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"schedule": {"type": "at", "at": "tomorrow"}, "prompt": "x"}, "schedule.at"),
        ({"schedule": {"type": "at", "at": "2026-03-15T14:32:00"}, "prompt": "x"}, "schedule.at"),
        ({"schedule": {"type": "every", "seconds": 0}, "prompt": "x"}, "schedule.seconds"),
        ({"schedule": {"type": "every", "seconds": -5}, "prompt": "x"}, "schedule.seconds"),
        ({"schedule": {"type": "every", "seconds": "5"}, "prompt": "x"}, "schedule.seconds"),
        ({"schedule": {"type": "weekly"}, "prompt": "x"}, "schedule.type"),
        ({"schedule": {"type": "cron", "expr": "61 * * * *"}, "prompt": "x"}, "schedule.expr"),
        ({"schedule": {"type": "cron", "expr": "* * *"}, "prompt": "x"}, "schedule.expr"),
        (
            {
                "schedule": {"type": "cron", "expr": "0 9 * * *", "tz": "Mars/Olympus"},
                "prompt": "x",
            },
            "schedule.tz",
        ),
        ({"schedule": {"type": "every", "seconds": 5}}, "payload"),
        ({"schedule": {"type": "every", "seconds": 5}, "payload": "x"}, "payload"),
        (
            {
                "schedule": {"type": "every", "seconds": 5},
                "payload": {"type": "shell", "prompt": "x"},
            },
            "payload.type",
        ),
        (
            {"schedule": {"type": "every", "seconds": 5}, "payload": {"prompt": "  "}},
            "payload.prompt",
        ),
        (
            {"schedule": {"type": "every", "seconds": 5}, "payload": {"prompt": "x", "extra": 1}},
            "payload has unknown",
        ),
        (
            {
                "schedule": {"type": "every", "seconds": 5},
                "payload": {"prompt": "x", "session_id": "a b"},
            },
            "payload.session_id",
        ),
        (
            {"schedule": {"type": "every", "seconds": 5}, "prompt": "x", "catch_up": "twice"},
            "catch_up",
        ),
        ({"schedule": {"type": "every", "seconds": 5}, "prompt": "x", "enabled": "yes"}, "enabled"),
    ],
)
def test_invalid_jobs_are_400(body: dict[str, Any], message: str) -> None:
    with pytest.raises(GatewayError) as e:
        parse_job_fields(body)
    assert e.value.code == "invalid_request" and e.value.status == 400
    assert message in e.value.message


def test_patch_merges_the_payload(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    job = done(svc.add(OPERATOR, {**every(10), "payload": {"prompt": "a", "session_id": "s"}}))
    job = done(svc.update(job.id, {"payload": {"prompt": "b"}}))
    assert (job.prompt, job.session_id) == ("b", "s")
    job = done(svc.update(job.id, {"payload": {"session_id": None}}))
    assert (job.prompt, job.session_id) == ("b", None)
    assert job.next_run_at == T0 + 10  # unchanged schedule keeps its time
    svc.stopService()


def test_a_crowd_of_due_jobs_fires_over_several_turns(tmp_path: Any) -> None:
    cg, svc = started(str(tmp_path))
    jobs = [done(svc.add(OPERATOR, at(T0 + 10, prompt=f"j{i}"))) for i in range(40)]
    per_turn: list[int] = []
    fire = svc._on_timer

    def counted() -> None:
        before = len(cg.of_type("cron_fired"))
        fire()
        per_turn.append(len(cg.of_type("cron_fired")) - before)

    svc._on_timer = counted  # type: ignore[method-assign]
    svc._timer.cancel()
    svc._arm()
    cg.clock.advance(10)
    assert per_turn == [scheduler.FIRE_SLICE, 40 - scheduler.FIRE_SLICE]
    assert all(len(runs(cg, j.id)) == 1 for j in jobs)
    assert svc.armed_at is None
    svc.stopService()
