"""Durable cron: jobs in the store, one timer armed for the earliest, agent turns on time.

The service holds every job in memory with a heap of due times and arms a single
:class:`~gatewayd.timers.OneShotTimer` at the earliest one; adding, changing or removing a
job re-arms it.  Nothing polls, so ten thousand idle jobs cost one pending ``callLater``.

A firing moves the job to its next time first (and saves that), so a crash mid-run never
runs it twice, then emits ``cron_fired`` and starts an agent turn through the run manager
with ``source="cron"`` and the job's ``channel`` (bridges deliver the answer of a run with a
channel).  The cron run is recorded when it starts and completed with the run's final status
and an excerpt of its answer.  A job whose previous run is still going is not started again:
the firing is recorded as ``skipped``.  At start-up, :func:`~gatewayd.schedule.plan_startup`
decides what missed firings get (``catch_up``: once or skip).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from gatewayd.auth import Principal, new_id
from gatewayd.cron_jobs import config_jobs, excerpt, parse_job_fields
from gatewayd.errors import GatewayError, not_found
from gatewayd.schedule import (
    AtSchedule,
    next_fire,
    plan_startup,
)
from gatewayd.store import cron as q
from gatewayd.store.cron import CronJob, CronRun
from gatewayd.timers import OneShotTimer

if TYPE_CHECKING:
    from gatewayd.core import Gateway
    from gatewayd.runs import LiveRun

__all__ = ["CRON_OWNER", "CronJob", "CronRun", "CronService", "cron_service"]

#: the principal that owns the runs of jobs declared in the config
CRON_OWNER = "cron"
#: a job whose firing raised is tried again this much later, instead of spinning
RETRY_AFTER_ERROR_S = 60.0
#: jobs parsed or planned per reactor turn at start-up (a cron job costs ~0.1-0.3 ms)
LOAD_SLICE = 32
#: firings started per reactor turn when many jobs fall due at once
FIRE_SLICE = 32
#: a timer may fire a hair before a due time it was armed for (float rounding)
_EPSILON = 0.001


def cron_service(gw: Gateway) -> CronService:
    """The running cron service of ``gw`` (503 when the service tree has none)."""
    if gw.cron is None:
        raise GatewayError("unavailable", "the scheduler is not running")
    return gw.cron


# --- the service -------------------------------------------------------------------------


def _first_due(job: CronJob, now: float) -> float | None:
    """When a job that was just made, enabled or rescheduled fires first.

    An ``at`` in the past fires at once (clocks differ; the caller meant "then").
    """
    if isinstance(job.schedule, AtSchedule):
        return job.schedule.at
    return next_fire(job.schedule, after=now, created_at=job.created_at)


def _apply(job: CronJob, fields: Mapping[str, Any], now: float) -> CronJob:
    """``job`` with new definition fields; a new schedule restarts its grid from now."""
    new = attrs.evolve(job, **fields)
    rescheduled = new.schedule != job.schedule
    if rescheduled:
        new = attrs.evolve(new, created_at=now)
    if not new.enabled:
        return attrs.evolve(new, next_run_at=None)
    if rescheduled or not job.enabled or job.next_run_at is None:
        return attrs.evolve(new, next_run_at=_first_due(new, now))
    return new


class CronService(Service):
    """Fires cron jobs on the injected clock; the operations in ``gatewayd.ops.cron`` use it.

    ``result_hooks`` are called with each recorded result (completed, failed, aborted,
    skipped), for metrics.
    """

    _log = Logger()

    def __init__(self, gw: Gateway, *, clock: IReactorTime | None = None) -> None:
        self.gw = gw
        self.clock: IReactorTime = clock if clock is not None else gw.clock
        self.setName("cron")
        #: validated now, so a bad [[cron.jobs]] entry stops the start like any config error
        self._config = config_jobs(gw.config.cron.jobs)
        self._jobs: dict[str, CronJob] = {}
        self._heap: list[tuple[float, int, str]] = []
        #: the due time each job has in the heap, so saving a job twice does not queue it twice
        self._queued: dict[str, float] = {}
        self._seq = itertools.count()
        self._timer = OneShotTimer(self.clock, name="cron timer")
        #: job id -> the run it is waiting for ("" while that run is being submitted)
        self._running: dict[str, str] = {}
        self._loaded: Deferred[None] | None = None
        self._load_error: GatewayError | None = None
        self._waiters: list[Deferred[None]] = []
        #: firings still being recorded (tests and shutdown can wait for them)
        self.pending: set[Deferred[Any]] = set()
        self.result_hooks: list[Callable[[str], None]] = []
        gw.cron = self

    # -- life ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loaded = ensureDeferred(self._load())
        self._loaded.addCallbacks(self._load_done, self._load_failed)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._timer.cancel()
        return succeed(None)

    def _load_done(self, _: None) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _load_failed(self, failure: Any) -> None:
        self._log.failure("the scheduler could not load its jobs", failure)
        self._load_error = GatewayError("unavailable", "the scheduler could not load its jobs")
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(self._load_error)

    def ready(self) -> Deferred[None]:
        """Fires once the jobs are loaded (a fresh Deferred per caller, safe to cancel)."""
        if self._load_error is not None:
            error: Deferred[None] = Deferred()
            error.errback(self._load_error)
            return error
        if self._loaded is not None and self._loaded.called:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(d)
        return d

    async def _breathe(self, i: int) -> None:
        """Let the reactor run between slices of a long start-up (thousands of jobs)."""
        if i and i % LOAD_SLICE == 0:
            await deferLater(self.clock, 0, lambda: None)

    async def _load(self) -> None:
        jobs: dict[str, CronJob] = {}
        for i, row in enumerate(await self.gw.store.run(q.load_job_rows)):
            await self._breathe(i)
            try:
                jobs[row[0]] = q.job_from_row(row)
            except Exception:
                self._log.failure(
                    "cron job {job_id} in the store does not parse; skipped", job_id=row[0]
                )
        now = self.clock.seconds()
        changed: list[CronJob] = []
        fresh: set[str] = set()
        for jid, fields in self._config:
            old = jobs.get(jid)
            if old is None or old.origin != "config":
                job = CronJob(id=jid, created_at=now, origin="config", owner=CRON_OWNER, **fields)
                job = attrs.evolve(job, next_run_at=_first_due(job, now) if job.enabled else None)
                fresh.add(jid)
            else:
                if isinstance(old.schedule, AtSchedule) and old.schedule == fields["schedule"]:
                    # it fired (or was skipped) already: the config cannot re-enable it
                    fields = {**fields, "enabled": fields.get("enabled", True) and old.enabled}
                job = _apply(old, fields, now)
                if job.next_run_at != old.next_run_at or not job.enabled:
                    fresh.add(jid)  # (re)scheduled from now: nothing was missed
            jobs[jid] = job
            changed.append(job)
        declared = {jid for jid, _ in self._config}
        stale = [j.id for j in jobs.values() if j.origin == "config" and j.id not in declared]
        for jid in stale:
            del jobs[jid]
            self._log.info("cron job {job_id} left the config; removed", job_id=jid)
        for i, (jid, job) in enumerate(list(jobs.items())):
            await self._breathe(i + 1)
            if not job.enabled or jid in fresh:
                continue
            plan = plan_startup(
                job.schedule,
                job.catch_up,
                job.next_run_at,
                now,
                job.created_at,
                last_run_at=job.last_run_at,
            )
            if plan.missed:
                self._log.info(
                    "cron job {job_id} missed {missed} firing(s) while stopped; catch_up={mode}",
                    job_id=jid,
                    missed=plan.missed,
                    mode=job.catch_up,
                )
            if plan.run_now:
                new = attrs.evolve(job, next_run_at=now)  # fires on the first turn
            else:
                new = attrs.evolve(job, next_run_at=plan.next_run_at, enabled=not plan.disable)
            if new != job:
                jobs[jid] = new
                changed.append(new)
        await self.gw.store.run(q.delete_jobs, stale)
        await self.gw.store.run(q.save_jobs, changed)
        self._jobs = jobs
        self._rebuild_heap()
        self._arm()

    # -- the timer -------------------------------------------------------------------------

    @property
    def armed_at(self) -> float | None:
        """When the one pending timer fires (None: nothing is scheduled)."""
        return self._timer.armed_at

    def _push(self, job: CronJob) -> None:
        due = job.next_run_at
        if job.enabled and due is not None and self._queued.get(job.id) != due:
            self._queued[job.id] = due
            heapq.heappush(self._heap, (due, next(self._seq), job.id))

    def _pop(self) -> CronJob | None:
        """Take the earliest heap entry; the job it stands for if it is still that job's time."""
        due, _, jid = heapq.heappop(self._heap)
        if self._queued.get(jid) == due:
            del self._queued[jid]
        job = self._jobs.get(jid)
        if job is None or not job.enabled or job.next_run_at != due:
            return None
        return job

    def _rebuild_heap(self) -> None:
        self._heap, self._queued = [], {}
        for job in self._jobs.values():
            if job.enabled and job.next_run_at is not None:
                self._queued[job.id] = job.next_run_at
                self._heap.append((job.next_run_at, next(self._seq), job.id))
        heapq.heapify(self._heap)

    def _arm(self) -> None:
        """Arm the one timer at the earliest live due time (or disarm)."""
        heap = self._heap
        while heap:
            due, _, jid = heap[0]
            job = self._jobs.get(jid)
            if job is not None and job.enabled and job.next_run_at == due:
                break
            self._pop()
        if len(heap) > 2 * len(self._jobs) + 1024:
            self._rebuild_heap()
        if not heap or not self.running:
            self._timer.cancel()
        elif self._timer.armed_at != heap[0][0] or not self._timer.armed:
            self._timer.arm(heap[0][0], self._on_timer)

    def _on_timer(self) -> None:
        try:
            now = self.clock.seconds()
            fired = 0
            while self._heap and self._heap[0][0] <= now + _EPSILON:
                if fired >= FIRE_SLICE:
                    break  # the rest fire on the next turn: the timer is re-armed at once
                job = self._pop()
                if job is None:
                    continue
                fired += 1
                try:
                    self._fire(job, now)
                except Exception:
                    self._log.failure(
                        "cron job {job_id} could not fire; retrying in {s:g} s",
                        job_id=job.id,
                        s=RETRY_AFTER_ERROR_S,
                    )
                    self._save(attrs.evolve(job, next_run_at=now + RETRY_AFTER_ERROR_S))
        finally:
            self._arm()

    def _put(self, job: CronJob) -> Deferred[None]:
        """Make ``job`` the current version: memory, heap, then the store (in order)."""
        self._jobs[job.id] = job
        self._push(job)
        d: Deferred[None] = self.gw.store.run(q.save_jobs, [job])
        return d

    def _save(self, job: CronJob) -> None:
        self._put(job).addErrback(
            lambda f: self._log.failure("could not save cron job {job_id}", f, job_id=job.id)
        )

    def _fire(self, job: CronJob, now: float) -> None:
        scheduled = job.next_run_at if job.next_run_at is not None else now
        if isinstance(job.schedule, AtSchedule):
            upcoming, enabled = None, False
        else:
            upcoming = next_fire(job.schedule, after=max(now, scheduled), created_at=job.created_at)
            enabled = upcoming is not None
        if job.id in self._running:
            self._log.warn(
                "cron job {job_id}: the previous run is still going; skipped", job_id=job.id
            )
            self._save(
                attrs.evolve(job, next_run_at=upcoming, enabled=enabled, last_status="skipped")
            )
            self._track(
                self.gw.store.run(
                    q.record_cron_run,
                    job.id,
                    None,
                    now,
                    "skipped",
                    "the previous run was still going",
                    now,
                    self._keep,
                )
            )
            self._result("skipped")
            return
        job = attrs.evolve(job, next_run_at=upcoming, enabled=enabled, last_run_at=now)
        self._save(job)
        self._track(ensureDeferred(self._start(job, now, manual=False)))

    # -- runs ------------------------------------------------------------------------------

    @property
    def _keep(self) -> int:
        return int(self.gw.config.retention.cron_runs_keep)

    def _track(self, d: Deferred[Any]) -> None:
        self.pending.add(d)

        def done(result: object) -> None:
            self.pending.discard(d)

        d.addErrback(lambda f: self._log.failure("cron bookkeeping failed", f))
        d.addBoth(done)

    def _result(self, status: str) -> None:
        metrics = getattr(self.gw, "metrics", None)
        hooks = [*self.result_hooks, *([metrics.cron_run] if metrics is not None else [])]
        for hook in hooks:
            try:
                hook(status)
            except Exception:
                self._log.failure("cron result hook failed")

    def _principal(self, job: CronJob) -> Principal:
        """Runs belong to the job's creator (only operate-scope tokens can make jobs)."""
        return Principal(
            token_id=job.owner or CRON_OWNER, role="operator", name=f"cron:{job.id}", kind="cron"
        )

    async def _start(self, job: CronJob, fired_at: float, *, manual: bool) -> LiveRun | None:
        """Submit the job's turn and record the cron run; the run is followed to its end."""
        gw = self.gw
        self._running[job.id] = ""
        gw.bus.publish(
            "cron_fired",
            owner=job.owner,
            job_id=job.id,
            name=job.name,
            channel=job.channel,
            manual=manual,
        )
        try:
            live = await gw.runs.submit(
                self._principal(job),
                job.prompt,
                session_id=job.session_id,
                source="cron",
                channel=job.channel,
                allow_tool_commands=False,
            )
        except Exception as e:
            if self._running.get(job.id) == "":
                del self._running[job.id]
            if isinstance(e, GatewayError):
                message = e.message
            else:
                self._log.failure("cron job {job_id}: the run could not start", job_id=job.id)
                message = "internal error"
            self._log.warn(
                "cron job {job_id}: the run could not start: {message}",
                job_id=job.id,
                message=message,
            )
            self._set_status(job.id, "failed")
            self._result("failed")
            await gw.store.run(
                q.record_cron_run,
                job.id,
                None,
                fired_at,
                "failed",
                excerpt(message),
                gw.clock.seconds(),
                self._keep,
            )
            if manual:
                raise
            return None
        run_id = live.run.id
        self._running[job.id] = run_id
        waiter = gw.runs.wait(run_id)
        self._log.info("cron job {job_id} fired: run {run_id}", job_id=job.id, run_id=run_id)
        if job.id not in self._jobs:  # removed meanwhile: its history is gone, keep it so
            row_id = None
        else:
            row_id = await self._record_start(job.id, run_id, fired_at)
        self._track(ensureDeferred(self._follow(job.id, run_id, row_id, waiter)))
        return live

    async def _record_start(self, job_id: str, run_id: str, fired_at: float) -> int | None:
        try:
            row_id: int = await self.gw.store.run(
                q.record_cron_run, job_id, run_id, fired_at, "running", None, None, self._keep
            )
        except Exception:
            self._log.failure("could not record the run of cron job {job_id}", job_id=job_id)
            return None
        return row_id

    async def _follow(
        self, job_id: str, run_id: str, row_id: int | None, waiter: Deferred[Any]
    ) -> None:
        try:
            run = await waiter
            status = str(run.status)
            text = run.response if status == "completed" else (run.error or run.response)
        except Exception:
            self._log.failure(
                "cron job {job_id}: lost track of run {run_id}", job_id=job_id, run_id=run_id
            )
            status, text = "failed", "the run could not be followed"
        finally:
            if self._running.get(job_id) == run_id:
                del self._running[job_id]
        self._set_status(job_id, status)
        self._result(status)
        if row_id is not None:
            await self.gw.store.run(
                q.finish_cron_run, row_id, self.gw.clock.seconds(), status, excerpt(text)
            )

    def _set_status(self, job_id: str, status: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            self._save(attrs.evolve(job, last_status=status))

    # -- what the operations call ----------------------------------------------------------

    def _get(self, job_id: str) -> CronJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise not_found("no such cron job")
        return job

    def _editable(self, job_id: str) -> CronJob:
        job = self._get(job_id)
        if job.origin == "config":
            raise GatewayError(
                "conflict", "this job is declared in [[cron.jobs]]; change it in the config"
            )
        return job

    async def all_jobs(self) -> list[CronJob]:
        await self.ready()
        return sorted(self._jobs.values(), key=lambda j: (j.created_at, j.id))

    async def get(self, job_id: str) -> CronJob:
        await self.ready()
        return self._get(job_id)

    async def add(
        self, principal: Principal, fields: Mapping[str, Any], job_id: str | None = None
    ) -> CronJob:
        await self.ready()
        parsed = parse_job_fields(fields)
        jid = job_id or new_id("cron")
        if jid in self._jobs:
            raise GatewayError("conflict", "a cron job with this id exists")
        now = self.clock.seconds()
        parsed.setdefault("name", "")
        parsed["name"] = parsed["name"] or jid
        job = CronJob(id=jid, created_at=now, origin="api", owner=principal.token_id, **parsed)
        job = attrs.evolve(job, next_run_at=_first_due(job, now) if job.enabled else None)
        try:
            await self._put(job)
        except Exception:
            self._jobs.pop(jid, None)
            raise
        self._arm()
        return job

    async def update(self, job_id: str, fields: Mapping[str, Any]) -> CronJob:
        await self.ready()
        job = self._editable(job_id)
        new = _apply(job, parse_job_fields(fields, base=job), self.clock.seconds())
        if "name" in fields and not new.name:
            new = attrs.evolve(new, name=new.id)
        d = self._put(new)
        self._arm()
        await d
        return new

    async def disable_owned_by(self, token_id: str) -> list[str]:
        """Disable the enabled jobs a (revoked) token made; their ids."""
        await self.ready()
        ids = [
            j.id
            for j in self._jobs.values()
            if j.owner == token_id and j.origin == "api" and j.enabled
        ]
        for job_id in ids:
            await self.update(job_id, {"enabled": False})
        return ids

    async def remove(self, job_id: str) -> None:
        """Forget a job and its history; a run it started finishes on its own."""
        await self.ready()
        self._editable(job_id)
        del self._jobs[job_id]
        self._arm()
        await self.gw.store.run(q.delete_job, job_id)

    async def run_now(self, job_id: str) -> LiveRun:
        """Start the job's turn now, outside its schedule (409 while a run is going)."""
        await self.ready()
        job = self._get(job_id)
        if job_id in self._running:
            raise GatewayError("conflict", "this job's previous run is still going")
        now = self.clock.seconds()
        job = attrs.evolve(job, last_run_at=now)
        self._save(job)
        live = await self._start(job, now, manual=True)
        assert live is not None
        return live

    async def job_runs(self, job_id: str, limit: int = 100) -> list[CronRun]:
        await self.ready()
        self._get(job_id)
        result: list[CronRun] = await self.gw.store.run(q.list_cron_runs, job_id, limit)
        return result
