"""The heartbeat: self-checks (and an optional agent check-in) every ``heartbeat.interval_s``.

Each problem is published as ``heartbeat_alert {check, message, channel}``; the bridges
deliver alerts that carry a ``channel`` (``heartbeat.channel``), so this module never talks to
a chat platform itself.  A check that hangs counts as failed after ``check_timeout_s``; a beat
never overlaps the previous one (:class:`~gatewayd.timers.GuardedTimerService`).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gatewayd.agent.base import ProviderError
from gatewayd.auth import Principal
from gatewayd.errors import GatewayError
from gatewayd.schedule import rfc3339
from gatewayd.timers import GuardedTimerService

if TYPE_CHECKING:
    from gatewayd.core import Gateway

__all__ = ["HEARTBEAT_OK", "HEARTBEAT_SESSION", "HeartbeatService", "disk_usage"]

HEARTBEAT_OK = "HEARTBEAT_OK"
#: the one session the heartbeat prompt runs in (cleared before each check-in)
HEARTBEAT_SESSION = "heartbeat"
MIN_FREE_BYTES = 100 * 1024 * 1024
MIN_FREE_FRACTION = 0.01
MAX_ALERT_CHARS = 2000
_MIB = 1024 * 1024


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes free to unprivileged users, total bytes) of the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _describe(e: BaseException) -> str:
    """A short, secret-free description of why a check failed."""
    if isinstance(e, GatewayError | ProviderError):
        text = e.message
    elif isinstance(e, TimeoutError) or type(e).__name__ == "TimeoutError":
        text = "timed out"
    else:
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return text[:MAX_ALERT_CHARS]


class HeartbeatService(GuardedTimerService):
    """Beats every ``heartbeat.interval_s`` (the first one an interval after start).

    ``last`` maps each check of the latest beat to its problem (None when it passed).
    """

    _log = Logger()

    def __init__(
        self,
        gw: Gateway,
        *,
        clock: IReactorTime | None = None,
        disk: Callable[[str], tuple[int, int]] = disk_usage,
        check_timeout_s: float = 30.0,
        min_free_bytes: int = MIN_FREE_BYTES,
        min_free_fraction: float = MIN_FREE_FRACTION,
    ) -> None:
        interval = gw.config.heartbeat.interval_s
        super().__init__(
            interval,
            self.beat,
            clock=clock if clock is not None else gw.clock,
            name="heartbeat",
            now=False,
            timeout=interval,
        )
        self.gw = gw
        self._disk = disk
        self._check_timeout = min(check_timeout_s, interval)
        self._min_free_bytes = min_free_bytes
        self._min_free_fraction = min_free_fraction
        self.last: dict[str, str | None] = {}
        self.last_beat_at: float | None = None

    async def beat(self) -> dict[str, str | None]:
        """Run every check once; alerts for the failing ones.  Returns check -> problem."""
        results: dict[str, str | None] = {}
        checks: list[tuple[str, Callable[[], Awaitable[str | None]]]] = [
            ("store", self._store_writable),
            ("disk", self._disk_space),
            ("provider", self._provider_reachable),
        ]
        if self.gw.config.heartbeat.prompt.strip():
            checks.append(("prompt", self._prompt))
        for name, check in checks:
            problem = await self._bounded(name, check)
            results[name] = problem
            if problem is not None:
                self.alert(name, problem)
        self.last = results
        self.last_beat_at = self.clock.seconds()
        return results

    def alert(self, check: str, message: str) -> None:
        self._log.warn("heartbeat: {check} check failed: {message}", check=check, message=message)
        self.gw.bus.publish(
            "heartbeat_alert",
            check=check,
            message=message[:MAX_ALERT_CHARS],
            channel=self.gw.config.heartbeat.channel,
        )

    async def _bounded(self, name: str, check: Callable[[], Awaitable[str | None]]) -> str | None:
        # the agent check-in may take as long as the beat allows; the self-checks may not
        timeout = None if name == "prompt" else self._check_timeout
        d: Deferred[str | None] = Deferred.fromCoroutine(_await(check()))
        if timeout is not None:
            d.addTimeout(timeout, self.clock)
        try:
            return await d
        except Exception as e:
            return _describe(e)

    async def _store_writable(self) -> str | None:
        await self.gw.store.set_meta("heartbeat_at", rfc3339(self.clock.seconds()))
        return None

    async def _disk_space(self) -> str | None:
        free, total = self._disk(self.gw.state_dir)
        fraction = free / total if total > 0 else 0.0
        if free < self._min_free_bytes or fraction < self._min_free_fraction:
            return (
                f"only {free / _MIB:.0f} MiB ({fraction:.1%}) free in the state directory "
                f"{self.gw.state_dir}"
            )
        return None

    async def _provider_reachable(self) -> str | None:
        await self.gw.provider.check()
        return None

    async def _prompt(self) -> str | None:
        """Run ``heartbeat.prompt``; any answer but ``HEARTBEAT_OK`` is the alert's message."""
        gw = self.gw
        principal = Principal(
            token_id="heartbeat", role="operator", name="heartbeat", kind="system"
        )
        await gw.store.reset_session(HEARTBEAT_SESSION, self.clock.seconds())
        live = await gw.runs.submit(
            principal,
            gw.config.heartbeat.prompt,
            session_id=HEARTBEAT_SESSION,
            source="heartbeat",
            allow_tool_commands=False,
        )
        run = await gw.runs.wait(live.run.id)
        if run.status != "completed":
            return f"the heartbeat run ended {run.status}: {run.error or 'no answer'}"
        reply = (run.response or "").strip()
        if reply == HEARTBEAT_OK:
            return None
        return reply or "(an empty answer)"


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
