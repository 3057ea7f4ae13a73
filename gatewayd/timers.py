"""Timers that survive their own failures.

Twisted's ``TimerService`` stops for good after one failing tick while still reporting itself
running (DESIGN trap 5), and a ``callLater`` body that raises only reaches the reactor's log.
Everything periodic or scheduled in gatewayd goes through here instead: each body is
:func:`guarded`, so one bad tick is logged and the next one still happens.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import ParamSpec

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

__all__ = ["GuardedTimerService", "OneShotTimer", "guarded"]

P = ParamSpec("P")


def _as_deferred(result: object) -> Deferred[object] | None:
    """A Deferred for an asynchronous result (Deferred or coroutine), else None."""
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):
        return Deferred.fromCoroutine(result)
    return None


def guarded(fn: Callable[P, object], log: Logger, what: str) -> Callable[P, Deferred[None]]:
    """Wrap ``fn`` so that neither an exception nor a failed Deferred escapes.

    ``fn`` may be synchronous, return a Deferred, or be a coroutine function.  Failures are
    logged as ``"{what} failed"`` with the traceback; the returned Deferred always succeeds
    with None (cancelling it cancels ``fn``'s work, and the cancellation is logged too).
    """

    def run(*args: P.args, **kwargs: P.kwargs) -> Deferred[None]:
        try:
            d = _as_deferred(fn(*args, **kwargs))
        except Exception:
            log.failure("{what} failed", level=LogLevel.error, what=what)
            return succeed(None)
        if d is None:
            return succeed(None)

        def settle(result: object) -> None:
            if isinstance(result, Failure):
                log.failure("{what} failed", result, level=LogLevel.error, what=what)

        return d.addBoth(settle)

    return run


class GuardedTimerService(Service):
    """A ``TimerService`` replacement whose ticks cannot kill it and never overlap.

    Each tick runs ``fn`` guarded.  When a tick's Deferred is still pending at the next step,
    that step is skipped with a warning (the cadence is kept, so a stuck tick is visible in
    the log every step); ``timeout`` (seconds) cancels a tick that runs longer, which logs it
    as failed.  ``stopService`` stops the loop and waits for a running tick to finish.
    """

    _log = Logger()

    def __init__(
        self,
        step: float,
        fn: Callable[[], object],
        *,
        clock: IReactorTime,
        name: str,
        now: bool = True,
        timeout: float | None = None,
    ) -> None:
        if not (math.isfinite(step) and step > 0):
            raise ValueError("step must be a positive number of seconds")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError("timeout must be a positive number of seconds")
        self.step = step
        self.clock = clock
        self.name = name
        self._fn = fn
        self._now = now
        self._timeout = timeout
        self._body = guarded(self._call_fn, self._log, f"{name} tick")
        self._pending: Deferred[None] | None = None
        self._stop_waiters: list[Deferred[None]] = []
        self._loop: LoopingCall | None = None
        #: how many ticks ran and how many were skipped because one was still running
        self.ticks = 0
        self.skipped = 0

    @property
    def tick_running(self) -> bool:
        return self._pending is not None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.step, now=self._now).addErrback(self._loop_failed)

    def stopService(self) -> Deferred[None]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._pending is None:
            super().stopService()
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        return waiter

    def _call_fn(self) -> object:
        d = _as_deferred(self._fn())
        if d is not None and self._timeout is not None:
            d.addTimeout(self._timeout, self.clock)
        return d

    def _tick(self) -> None:
        if self._pending is not None:
            self.skipped += 1
            self._log.warn("{name}: previous tick still running; skipping this one", name=self.name)
            return
        self.ticks += 1
        d = self._body()
        self._pending = d
        d.addBoth(self._tick_done, d)

    def _tick_done(self, result: object, d: Deferred[None]) -> None:
        if self._pending is d:
            self._pending = None
        if self._stop_waiters and self._pending is None:
            if self._loop is None:  # not started again while we waited
                super().stopService()
            waiters, self._stop_waiters = self._stop_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _loop_failed(self, failure: Failure) -> None:
        # Only reachable if the guard itself broke; say so loudly rather than go quiet.
        self._log.failure("{name} timer loop stopped", failure, name=self.name)
        if self._loop is not None:
            self._loop.running = False


class OneShotTimer:
    """At most one pending ``callLater``, for the earliest due time; re-arming replaces it.

    Lets the cron service sleep until exactly the next job is due instead of polling.  The
    callback runs guarded and the timer is disarmed before it runs, so it may re-arm itself.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, *, name: str = "one-shot timer") -> None:
        self._clock = clock
        self._name = name
        self._call: IDelayedCall | None = None
        self._armed_at: float | None = None

    @property
    def armed_at(self) -> float | None:
        """When the pending call fires (unix seconds, as given to :meth:`arm`), or None."""
        return self._armed_at

    @property
    def armed(self) -> bool:
        return self._call is not None

    def arm(self, at: float, fn: Callable[[], object]) -> None:
        """Call ``fn`` at ``at`` (now, on the next turn, if ``at`` has passed)."""
        if not math.isfinite(at):
            raise ValueError("at must be a finite time")
        self.cancel()
        delay = max(0.0, at - self._clock.seconds())
        self._armed_at = at
        self._call = self._clock.callLater(delay, self._fire, fn)

    def cancel(self) -> None:
        call, self._call = self._call, None
        self._armed_at = None
        if call is not None and call.active():
            call.cancel()

    def _fire(self, fn: Callable[[], object]) -> None:
        self._call = None
        self._armed_at = None
        guarded(fn, self._log, self._name)()
