"""Cron at scale: 10,000 scheduled jobs on the real reactor and the real SQLite store.

Reports the memory the jobs take, the time to compute next firings (per job, and for the
whole set when the service loads at start-up), the number of pending timers, and the reactor's
lag p50/p99/max (a 10 ms LoopingCall measuring how late it runs) while the jobs are armed and
while the service (re)loads them.  Goal: p99 lag under 5 ms while armed.

    .venv/bin/python bench/cron_scale.py [--jobs 10000] [--seconds 3] [--fire 0]

``--fire N`` adds N jobs all due at the same instant and reports the lag while they fire
(each starts an echo-provider run).  Bounded: the script stops itself after two minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from gatewayd.auth import Principal  # noqa: E402
from gatewayd.config import Config  # noqa: E402
from gatewayd.schedule import next_fire, parse_schedule, rfc3339  # noqa: E402

OPERATOR = Principal(token_id="bench", role="operator", name="bench")
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Sydney"]
EXPRS = ["*/15 * * * *", "0 9 * * 1-5", "30 2 * * *", "0 */6 * * *", "5 4 1 * *", "@daily"]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def job_spec(i: int, now: float, rng: random.Random) -> dict[str, Any]:
    kind = i % 3
    if kind == 0:
        schedule = {"type": "every", "seconds": rng.randint(600, 86400)}
    elif kind == 1:
        schedule = {"type": "cron", "expr": rng.choice(EXPRS), "tz": rng.choice(ZONES)}
    else:
        schedule = {"type": "at", "at": rfc3339(now + rng.uniform(600, 30 * 86400))}
    return {"name": f"job {i}", "schedule": schedule, "payload": {"prompt": f"job {i} check-in"}}


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LagProbe:
    """How late a 10 ms LoopingCall runs: each delay is one sample (ms)."""

    def __init__(self, reactor: Any, step: float = 0.01) -> None:
        self.reactor = reactor
        self.step = step
        self.samples: list[float] = []
        self._last = 0.0
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last:
            self.samples.append(max(0.0, (now - self._last - self.step) * 1000))
        self._last = now

    def start(self) -> None:
        self.samples, self._last = [], 0.0
        self._loop.start(self.step, now=True)

    def stop(self) -> dict[str, float]:
        self._loop.stop()
        s = self.samples
        return {
            "samples": len(s),
            "p50_ms": round(pct(s, 0.5), 3),
            "p99_ms": round(pct(s, 0.99), 3),
            "max_ms": round(max(s, default=0.0), 3),
        }


async def bench(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    from gatewayd.app import build_gateway
    from gatewayd.scheduler import CronService

    out: dict[str, Any] = {"jobs": args.jobs}
    rng = random.Random(7)
    tmp = tempfile.mkdtemp(prefix="gatewayd-cron-bench-")
    gw, _ = build_gateway(Config(), reactor=reactor, state_dir=tmp, cli_token="b" * 32)
    await gw.start()
    now = reactor.seconds()
    specs = [job_spec(i, now, rng) for i in range(args.jobs)]

    # pure schedule math: one next firing per job
    parsed = [parse_schedule(s["schedule"]) for s in specs]
    t = time.perf_counter()
    for sched in parsed:
        next_fire(sched, after=now, created_at=now)
    per_job = (time.perf_counter() - t) / len(parsed) * 1e6
    by_kind: dict[str, list[float]] = {}
    for sched in parsed[:3000]:
        t = time.perf_counter()
        next_fire(sched, after=now, created_at=now)
        by_kind.setdefault(type(sched).__name__, []).append((time.perf_counter() - t) * 1e6)
    out["next_fire_us"] = {
        "mean_all": round(per_job, 1),
        **{k: round(statistics.mean(v), 1) for k, v in by_kind.items()},
    }

    svc = CronService(gw, clock=reactor)
    svc.startService()
    await svc.ready()
    gc.collect()
    rss0 = rss_bytes()
    t = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(svc.add(OPERATOR, s)) for s in specs])
    out["add_all_s"] = round(time.perf_counter() - t, 3)
    gc.collect()
    out["rss_delta_after_add_mib"] = round((rss_bytes() - rss0) / 2**20, 2)
    cron_timers = [
        c for c in reactor.getDelayedCalls() if getattr(c.func, "__self__", None) is svc._timer
    ]
    out["pending_cron_timers"] = len(cron_timers)
    out["armed_at"] = rfc3339(svc.armed_at) if svc.armed_at is not None else None
    t = time.perf_counter()
    for _ in range(1000):
        svc._arm()
    out["rearm_us"] = round((time.perf_counter() - t) / 1000 * 1e6, 2)

    probe = LagProbe(reactor)
    probe.start()
    await task.deferLater(reactor, args.seconds, lambda: None)
    out["lag_while_armed"] = probe.stop()

    # a restart: load every job from the store and plan it (catch-up rules, next firing)
    svc.stopService()
    again = CronService(gw, clock=reactor)
    probe.start()
    t = time.perf_counter()
    again.startService()
    await again.ready()
    out["startup_load_s"] = round(time.perf_counter() - t, 3)
    await task.deferLater(reactor, 0.2, lambda: None)
    out["lag_during_startup_load"] = probe.stop()

    # what the loaded jobs hold in memory: a third service, loaded under tracemalloc
    again.stopService()
    gc.collect()
    tracemalloc.start()
    measured = CronService(gw, clock=reactor)
    measured.startService()
    await measured.ready()
    gc.collect()
    traced, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["memory_loaded"] = {
        "python_heap_mib": round(traced / 2**20, 2),
        "per_job_bytes": round(traced / args.jobs),
        "load_peak_mib": round(peak / 2**20, 2),
    }
    measured.stopService()
    again = CronService(gw, clock=reactor)
    again.startService()
    await again.ready()

    if args.fire:
        due = reactor.seconds() + 1.0
        burst = [
            {"schedule": {"type": "at", "at": rfc3339(due, digits=3)}, "prompt": f"burst {i}"}
            for i in range(args.fire)
        ]
        await defer.gatherResults([defer.ensureDeferred(again.add(OPERATOR, s)) for s in burst])
        probe.start()
        t = time.perf_counter()
        while again.pending or reactor.seconds() < due + 0.1:
            await task.deferLater(reactor, 0.05, lambda: None)
        out["fire_burst"] = {
            "jobs": args.fire,
            "all_recorded_s": round(time.perf_counter() - t - 1, 3),
            "lag": probe.stop(),
        }
    again.stopService()
    await gw.stop(0)
    shutil.rmtree(tmp, ignore_errors=True)
    out["goal_p99_under_5ms"] = out["lag_while_armed"]["p99_ms"] < 5.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--fire", type=int, default=0)
    args = parser.parse_args()

    def run(reactor: Any) -> defer.Deferred[None]:
        reactor.callLater(120, reactor.stop)  # bounded, whatever happens

        async def go() -> None:
            result = await bench(reactor, args)
            print(json.dumps(result, indent=2))

        return defer.ensureDeferred(go())

    task.react(run)


if __name__ == "__main__":
    main()
