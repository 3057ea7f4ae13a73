"""Guarded timers on a fake Clock: they keep ticking after failures and never overlap."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, globalLogPublisher

from gatewayd.timers import GuardedTimerService, OneShotTimer, guarded


def capture(events: list[LogEvent]) -> Logger:
    """A Logger whose events land in ``events``."""
    return Logger(observer=cast(ILogObserver, events.append))


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def failures(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if "log_failure" in e]


class Boom(Exception):
    pass


# --- guarded ------------------------------------------------------------------------------


def test_guarded_passes_arguments_and_swallows_results() -> None:
    events: list[LogEvent] = []
    seen: list[tuple[Any, ...]] = []

    def fn(a: int, *, b: str) -> int:
        seen.append((a, b))
        return 42

    d = guarded(fn, capture(events), "thing")(1, b="x")
    assert seen == [(1, "x")]
    assert d.called and d.result is None
    assert events == []


def test_guarded_logs_a_raising_function_structured() -> None:
    events: list[LogEvent] = []

    def fn() -> None:
        raise Boom("nope")

    d = guarded(fn, capture(events), "prune")()
    assert d.called and d.result is None
    [event] = events
    assert event["log_format"] == "{what} failed"
    assert event["what"] == "prune"
    assert event["log_level"] == LogLevel.error
    assert event["log_failure"].check(Boom)


def test_guarded_logs_a_failed_deferred() -> None:
    events: list[LogEvent] = []
    d = guarded(lambda: fail(Boom("later")), capture(events), "hb")()
    assert d.called and d.result is None
    assert [e["log_failure"].check(Boom) for e in events] == [Boom]


def test_guarded_waits_for_a_pending_deferred() -> None:
    events: list[LogEvent] = []
    inner: Deferred[str] = Deferred()
    d = guarded(lambda: inner, capture(events), "x")()
    assert not d.called
    inner.errback(Boom())
    assert d.called and d.result is None
    assert len(events) == 1


def test_guarded_runs_coroutines() -> None:
    events: list[LogEvent] = []
    gate: Deferred[None] = Deferred()

    async def fn() -> None:
        await gate
        raise Boom("async")

    d = guarded(fn, capture(events), "coro")()
    assert not d.called
    gate.callback(None)
    assert d.called and d.result is None
    assert events[0]["log_failure"].check(Boom)


def test_guarded_cancel_reaches_the_work_and_is_logged() -> None:
    events: list[LogEvent] = []
    cancelled: list[bool] = []
    inner: Deferred[None] = Deferred(lambda _: cancelled.append(True))
    d = guarded(lambda: inner, capture(events), "slow")()
    d.cancel()
    assert cancelled == [True]
    assert d.called and d.result is None
    assert events[0]["log_failure"].check(CancelledError)


def test_guarded_does_not_swallow_base_exceptions() -> None:
    def fn() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        guarded(fn, capture([]), "x")()


# --- GuardedTimerService ------------------------------------------------------------------


def test_service_ticks_now_and_every_step_then_stops_clean() -> None:
    clock = Clock()
    ticks: list[float] = []
    svc = GuardedTimerService(10, lambda: ticks.append(clock.seconds()), clock=clock, name="t")
    assert svc.clock is clock
    svc.startService()
    assert svc.running
    clock.pump([10] * 3)
    assert ticks == [0, 10, 20, 30]
    d = svc.stopService()
    assert d.called
    assert not svc.running
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert len(ticks) == 4


def test_service_now_false_waits_one_step() -> None:
    clock = Clock()
    ticks: list[float] = []
    svc = GuardedTimerService(
        5, lambda: ticks.append(clock.seconds()), clock=clock, name="t", now=False
    )
    svc.startService()
    assert ticks == []
    clock.advance(5)
    assert ticks == [5]
    svc.stopService()
    assert clock.getDelayedCalls() == []


def test_service_keeps_ticking_after_an_exception(logged: list[LogEvent]) -> None:
    clock = Clock()
    calls: list[float] = []

    def tick() -> None:
        calls.append(clock.seconds())
        if len(calls) == 2:
            raise Boom("second tick")

    svc = GuardedTimerService(1, tick, clock=clock, name="prune")
    svc.startService()
    clock.pump([1] * 4)
    assert calls == [0, 1, 2, 3, 4]
    [event] = failures(logged)
    assert event["what"] == "prune tick"
    assert event["log_failure"].check(Boom)
    svc.stopService()
    assert clock.getDelayedCalls() == []


def test_service_keeps_ticking_after_a_failing_deferred(logged: list[LogEvent]) -> None:
    clock = Clock()
    calls: list[int] = []

    def tick() -> Deferred[None]:
        calls.append(1)
        d: Deferred[None] = Deferred()
        clock.callLater(0.5, d.errback, Boom("async failure"))
        return d

    svc = GuardedTimerService(1, tick, clock=clock, name="hb")
    svc.startService()
    clock.pump([0.5] * 8)  # ticks at 0, 1, 2, 3, 4; the last one fails at 4.5
    assert len(calls) == 5
    assert len(failures(logged)) == 4
    clock.advance(0.5)
    assert len(failures(logged)) == 5
    assert svc.skipped == 0
    assert svc.stopService().called
    assert clock.getDelayedCalls() == []


def test_service_skips_ticks_while_one_is_pending(logged: list[LogEvent]) -> None:
    clock = Clock()
    pending: list[Deferred[None]] = []

    def tick() -> Deferred[None]:
        d: Deferred[None] = Deferred()
        pending.append(d)
        return d

    svc = GuardedTimerService(1, tick, clock=clock, name="slow")
    svc.startService()
    assert len(pending) == 1 and svc.tick_running
    clock.pump([1] * 3)
    assert len(pending) == 1  # no overlap
    assert svc.skipped == 3
    warnings = [e for e in logged if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 3 and warnings[0]["name"] == "slow"
    pending[0].callback(None)
    assert not svc.tick_running
    clock.advance(1)
    assert len(pending) == 2  # the next step ticks again
    assert svc.ticks == 2
    pending[1].callback(None)
    svc.stopService()
    assert clock.getDelayedCalls() == []


def test_stop_waits_for_the_running_tick() -> None:
    clock = Clock()
    work: Deferred[None] = Deferred()
    svc = GuardedTimerService(1, lambda: work, clock=clock, name="t")
    svc.startService()
    stopped = svc.stopService()
    assert not stopped.called
    assert svc.running  # still running until its tick is done
    assert clock.getDelayedCalls() == []  # but no more ticks are scheduled
    work.errback(Boom("even a failure ends the wait"))
    assert stopped.called and stopped.result is None
    assert not svc.running


def test_timeout_cancels_a_stuck_tick_and_ticking_resumes(logged: list[LogEvent]) -> None:
    clock = Clock()
    started: list[Deferred[None]] = []

    def tick() -> Deferred[None]:
        d: Deferred[None] = Deferred()
        started.append(d)
        return d

    svc = GuardedTimerService(10, tick, clock=clock, name="hb", timeout=3)
    svc.startService()
    clock.advance(3)
    [event] = failures(logged)
    assert event["what"] == "hb tick"
    assert event["log_failure"].check(defer.TimeoutError)
    assert not svc.tick_running
    clock.advance(7)
    assert len(started) == 2
    started[1].callback(None)
    svc.stopService()
    assert clock.getDelayedCalls() == []


def test_service_stop_without_start_and_restart() -> None:
    clock = Clock()
    ticks: list[int] = []
    svc = GuardedTimerService(1, lambda: ticks.append(1), clock=clock, name="t")
    assert svc.stopService().called
    svc.startService()
    svc.stopService()
    svc.startService()
    clock.advance(1)
    assert len(ticks) == 3
    svc.stopService()
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("step", [0, -1, float("nan"), float("inf")])
def test_service_rejects_bad_steps(step: float) -> None:
    with pytest.raises(ValueError):
        GuardedTimerService(step, lambda: None, clock=Clock(), name="t")
    with pytest.raises(ValueError):
        GuardedTimerService(1, lambda: None, clock=Clock(), name="t", timeout=step)


def test_service_in_a_multiservice_stops_with_it() -> None:
    from twisted.application.service import MultiService

    clock = Clock()
    work: Deferred[None] = Deferred()
    parent = MultiService()  # type: ignore[no-untyped-call]
    svc = GuardedTimerService(60, lambda: work, clock=clock, name="cron")
    svc.setServiceParent(parent)  # type: ignore[no-untyped-call]
    parent.startService()  # type: ignore[no-untyped-call]
    done = parent.stopService()  # type: ignore[no-untyped-call]
    assert not done.called
    work.callback(None)
    assert done.called
    assert clock.getDelayedCalls() == []


# --- OneShotTimer -------------------------------------------------------------------------


def test_one_shot_fires_once_at_the_time() -> None:
    clock = Clock()
    clock.advance(1000)
    fired: list[float] = []
    timer = OneShotTimer(clock)
    assert timer.armed_at is None and not timer.armed
    timer.arm(1010, lambda: fired.append(clock.seconds()))
    assert timer.armed_at == 1010 and timer.armed
    clock.advance(9.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [1010]
    assert timer.armed_at is None and not timer.armed
    clock.advance(100)
    assert fired == [1010]
    assert clock.getDelayedCalls() == []


def test_one_shot_rearm_replaces_the_previous_call() -> None:
    clock = Clock()
    fired: list[str] = []
    timer = OneShotTimer(clock)
    timer.arm(50, lambda: fired.append("late"))
    timer.arm(20, lambda: fired.append("early"))
    assert len(clock.getDelayedCalls()) == 1
    assert timer.armed_at == 20
    clock.advance(100)
    assert fired == ["early"]
    timer.arm(120, lambda: fired.append("x"))
    timer.arm(300, lambda: fired.append("later"))  # later re-arm also replaces
    clock.advance(150)
    assert fired == ["early"]
    clock.advance(50)
    assert fired == ["early", "later"]
    assert clock.getDelayedCalls() == []


def test_one_shot_cancel_is_idempotent() -> None:
    clock = Clock()
    fired: list[int] = []
    timer = OneShotTimer(clock)
    timer.cancel()
    timer.arm(5, lambda: fired.append(1))
    timer.cancel()
    timer.cancel()
    assert timer.armed_at is None
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert fired == []


def test_one_shot_in_the_past_fires_on_the_next_turn() -> None:
    clock = Clock()
    clock.advance(100)
    fired: list[int] = []
    timer = OneShotTimer(clock)
    timer.arm(10, lambda: fired.append(1))
    assert fired == []  # never synchronously inside arm()
    assert clock.getDelayedCalls()[0].getTime() == 100
    clock.advance(0)
    assert fired == [1]


def test_one_shot_callback_can_rearm_itself_like_a_scheduler() -> None:
    clock = Clock()
    fired: list[float] = []
    timer = OneShotTimer(clock)

    def due() -> None:
        fired.append(clock.seconds())
        if len(fired) < 3:
            timer.arm(clock.seconds() + 60, due)

    timer.arm(60, due)
    clock.pump([60] * 5)
    assert fired == [60, 120, 180]
    assert not timer.armed
    assert clock.getDelayedCalls() == []


def test_one_shot_failing_callback_is_logged_and_timer_reusable(
    logged: list[LogEvent],
) -> None:
    clock = Clock()
    timer = OneShotTimer(clock, name="cron wake-up")

    def bad() -> None:
        raise Boom("job lookup failed")

    timer.arm(1, bad)
    clock.advance(1)
    [event] = failures(logged)
    assert event["what"] == "cron wake-up"
    fired: list[int] = []
    timer.arm(2, lambda: fired.append(1))

    def async_ok() -> Deferred[None]:
        fired.append(2)
        return succeed(None)

    timer.arm(3, async_ok)
    clock.advance(5)
    assert fired == [2]
    assert clock.getDelayedCalls() == []


def test_one_shot_rejects_non_finite_times() -> None:
    timer = OneShotTimer(Clock())
    with pytest.raises(ValueError):
        timer.arm(float("nan"), lambda: None)
    assert not timer.armed


def test_restart_while_a_stop_waits_keeps_running() -> None:
    clock = Clock()
    work: list[Deferred[None]] = []

    def tick() -> Deferred[None]:
        work.append(Deferred())
        return work[-1]

    svc = GuardedTimerService(1, tick, clock=clock, name="t")
    svc.startService()
    stopped = svc.stopService()
    svc.startService()  # the pending first tick makes this start's own tick skip
    work[0].callback(None)
    assert stopped.called
    assert svc.running
    clock.advance(1)
    assert len(work) == 2
    work[1].callback(None)
    assert svc.stopService().called
    assert not svc.running
    assert clock.getDelayedCalls() == []
