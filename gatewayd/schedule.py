"""Schedule math for cron jobs: parsing, next firing, and what to do after downtime.

Pure functions on unix-second floats, so the cron service, the store and the tests all agree
on one notion of time; this module is also the project's one place for RFC 3339 timestamps.

DST, as verified on croniter 7 with ``zoneinfo`` zones (tests/test_schedule.py pins it):

- A local time that does not exist (spring forward) fires once, at the first existing minute
  after it: ``30 2 * * *`` in Europe/Berlin fires at 03:00 CEST on the day clocks skip 02:00-03:00.
- A local time that happens twice (fall back): croniter fires both instants.  For wildcard
  jobs (minute or hour field starting with ``*``) that is right, ``0 * * * *`` stays strictly
  hourly (02:00 CEST, then 02:00 CET).  For fixed-time jobs (``30 2 * * *``) it would mean two
  runs in one day, so, as Vixie cron does, we drop the second pass of a repeated wall time.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo, available_timezones

import attrs
from croniter import CroniterBadDateError, CroniterError, croniter

from gatewayd.errors import GatewayError

__all__ = [
    "AtSchedule",
    "CatchUp",
    "CronSchedule",
    "EverySchedule",
    "Schedule",
    "StartupPlan",
    "missed_firings",
    "next_fire",
    "parse_catch_up",
    "parse_rfc3339",
    "parse_schedule",
    "plan_startup",
    "rfc3339",
]

CatchUp = Literal["once", "skip"]

#: Bounds for ``every``: below a millisecond the grid drowns in float rounding (and the job
#: in runs); beyond ten years the timestamps stop being useful.
MIN_EVERY_SECONDS = 0.001
MAX_EVERY_SECONDS = 10 * 365 * 86400
MAX_EXPR_CHARS = 200
MAX_TZ_CHARS = 64

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# croniter's hashed (H) and random (R) items are not deterministic across calls: refuse them.
_HASH_OR_RANDOM = re.compile(r"^[hHrR](?:$|[(/])")

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


# --- timestamps ---------------------------------------------------------------------------


def rfc3339(ts: float, *, digits: int | None = 0) -> str:
    """Format unix seconds as RFC 3339 UTC with a ``Z`` suffix, the contract's timestamp shape.

    ``digits`` is the number of fraction digits (0, 3 or 6; the rest is truncated, so a
    timestamp never reads later than it is); ``None`` picks the fewest that lose nothing.
    """
    if digits not in (None, 0, 3, 6):
        raise ValueError("digits must be None, 0, 3 or 6")
    if not math.isfinite(ts):
        raise ValueError("timestamp must be finite")
    micros = round(ts * 1_000_000)
    try:
        dt = _EPOCH + timedelta(microseconds=micros)
    except OverflowError as e:
        raise ValueError("timestamp out of range") from e
    if digits is None:
        digits = 0 if dt.microsecond == 0 else 3 if dt.microsecond % 1000 == 0 else 6
    head = (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    )
    if digits == 0:
        return head + "Z"
    return f"{head}.{dt.microsecond:06d}"[: len(head) + 1 + digits] + "Z"


def parse_rfc3339(s: str) -> float:
    """Parse an RFC 3339 time (``Z`` or a ``±hh:mm`` offset) to unix seconds.

    Raises ValueError for anything else, naive times included: a time without a zone means a
    different instant on every machine.  Callers turn that into an error naming their field.
    """
    if not isinstance(s, str):
        raise ValueError("timestamp must be a string")
    m = _RFC3339.fullmatch(s)
    if m is None:
        raise ValueError("not an RFC 3339 time with Z or an offset")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    frac = m.group(7) or ""
    micros = int((frac + "000000")[:6])
    if m.group(8):
        offset = timedelta(0)
    else:
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise ValueError("time zone offset out of range")
        offset = timedelta(hours=oh, minutes=om)
        if m.group(9) == "-":
            offset = -offset
    try:
        dt = datetime(year, month, day, hour, minute, second, micros, tzinfo=timezone(offset))
    except ValueError as e:
        raise ValueError(f"not a valid time: {e}") from None
    return (dt - _EPOCH) / timedelta(seconds=1)


# --- schedules ----------------------------------------------------------------------------


@attrs.frozen
class AtSchedule:
    """Fire once, at ``at`` (unix seconds)."""

    at: float

    def to_json(self) -> dict[str, Any]:
        return {"type": "at", "at": rfc3339(self.at, digits=None)}


@attrs.frozen
class EverySchedule:
    """Fire every ``seconds``, on the grid ``created_at + k*seconds`` (k >= 1)."""

    seconds: int | float

    def to_json(self) -> dict[str, Any]:
        return {"type": "every", "seconds": self.seconds}


@attrs.frozen
class CronSchedule:
    """Fire on a 5-field cron expression evaluated in the IANA zone ``tz``."""

    expr: str
    tz: str = "UTC"

    def to_json(self) -> dict[str, Any]:
        return {"type": "cron", "expr": self.expr, "tz": self.tz}


Schedule = AtSchedule | EverySchedule | CronSchedule

_KEYS: dict[str, frozenset[str]] = {
    "at": frozenset({"type", "at"}),
    "every": frozenset({"type", "seconds"}),
    "cron": frozenset({"type", "expr", "tz"}),
}


def _invalid(message: str) -> GatewayError:
    return GatewayError("invalid_request", message)


def parse_schedule(obj: object, *, field: str = "schedule") -> Schedule:
    """Validate a schedule's JSON shape; every problem is a 400 naming the field at fault."""
    if not isinstance(obj, dict):
        raise _invalid(f"{field} must be an object")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _KEYS:
        raise _invalid(f"{field}.type must be one of: at, every, cron")
    unknown = sorted(str(k) for k in obj if k not in _KEYS[kind])
    if unknown:
        raise _invalid(f"{field} has unknown field(s) for type {kind}: {', '.join(unknown)}")
    if kind == "at":
        return AtSchedule(_parse_at(obj.get("at"), f"{field}.at"))
    if kind == "every":
        return EverySchedule(_parse_seconds(obj.get("seconds"), f"{field}.seconds"))
    tz = obj.get("tz")
    tz = "UTC" if tz is None else _parse_tz(tz, f"{field}.tz")
    expr = _parse_expr(obj.get("expr"), tz, f"{field}.expr")
    return CronSchedule(expr, tz)


def parse_catch_up(value: object, *, field: str = "catch_up") -> CatchUp:
    """``None`` (absent) means the contract's default, ``once``."""
    if value is None or value == "once":
        return "once"
    if value == "skip":
        return "skip"
    raise _invalid(f"{field} must be one of: once, skip")


def _parse_at(value: object, field: str) -> float:
    if not isinstance(value, str):
        raise _invalid(f"{field} must be an RFC 3339 time string")
    try:
        return parse_rfc3339(value)
    except ValueError:
        raise _invalid(
            f"{field} must be an RFC 3339 time with Z or an offset, like 2026-03-15T14:32:00Z"
        ) from None


def _parse_seconds(value: object, field: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"{field} must be a positive number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(f"{field} must be a finite positive number")
    if value <= 0:
        raise _invalid(f"{field} must be a positive number")
    if value < MIN_EVERY_SECONDS:
        raise _invalid(f"{field} must be at least {MIN_EVERY_SECONDS}")
    if value > MAX_EVERY_SECONDS:
        raise _invalid(f"{field} must be at most {MAX_EVERY_SECONDS}")
    return value


_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


@functools.cache
def _known_zones() -> frozenset[str]:
    return frozenset(available_timezones())


def _parse_tz(value: object, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TZ_CHARS:
        raise _invalid(f"{field} must be an IANA time zone name, like Europe/Berlin")
    try:
        ZoneInfo(value)
    except (KeyError, ValueError, OSError):
        raise _invalid(f"{field} is not a known IANA time zone") from None
    # ZoneInfo also opens files that are not IANA zones, and "localtime" means a different
    # zone on every machine.
    if value in _NOT_ZONES or (value not in _known_zones() and value != "UTC"):
        raise _invalid(f"{field} is not a known IANA time zone")
    return value


def _fields(expr: str) -> list[str]:
    return _ALIASES.get(expr.lower(), expr).split()


def _parse_expr(value: object, tz: str, field: str) -> str:
    bad = f"{field} must be a 5-field cron expression, like '*/15 * * * *'"
    if not isinstance(value, str) or len(value) > MAX_EXPR_CHARS:
        raise _invalid(bad)
    expr = " ".join(value.split())
    fields = _fields(expr)
    if len(fields) != 5:
        raise _invalid(bad)
    if any(_HASH_OR_RANDOM.match(item) for f in fields for item in f.split(",")):
        raise _invalid(f"{field}: hashed (H) and random (R) cron items are not supported")
    if not croniter.is_valid(" ".join(fields), strict=True):
        raise _invalid(f"{field} is not a valid cron expression")
    try:
        start = datetime(2000, 1, 1, tzinfo=ZoneInfo(tz))
        croniter(" ".join(fields), start).get_next(float)
    except CroniterBadDateError:
        raise _invalid(f"{field} never fires") from None
    except (CroniterError, ValueError, TypeError):
        raise _invalid(f"{field} is not a valid cron expression") from None
    return expr


# --- firing times -------------------------------------------------------------------------


def next_fire(schedule: Schedule, *, after: float, created_at: float) -> float | None:
    """The first firing strictly after ``after``, or None when there is none.

    An ``at`` already passed gives None: whether to catch up is :func:`plan_startup`'s call.
    """
    return next(_fires(schedule, after=after, created_at=created_at), None)


def _fires(schedule: Schedule, *, after: float, created_at: float) -> Iterator[float]:
    """Successive firings strictly after ``after``, strictly increasing."""
    if isinstance(schedule, AtSchedule):
        if schedule.at > after:
            yield schedule.at
    elif isinstance(schedule, EverySchedule):
        yield from _every_fires(float(schedule.seconds), after, created_at)
    else:
        yield from _cron_fires(schedule, after)


def _every_fires(seconds: float, after: float, created_at: float) -> Iterator[float]:
    k = max(1, math.floor((after - created_at) / seconds) + 1)
    last = after
    while True:
        t = created_at + k * seconds
        k += 1
        if t > last:  # false only when floor() rounded down by one step
            yield t
            last = t


def _is_fixed_time(fields: list[str]) -> bool:
    """Vixie cron's rule: a job is wildcard if its minute or hour field starts with ``*``."""
    return not fields[0].startswith(("*", "?")) and not fields[1].startswith(("*", "?"))


def _is_second_pass(ts: float, zone: ZoneInfo) -> bool:
    """True when the wall time at ``ts`` already happened once today (the later fall-back fold)."""
    local = datetime.fromtimestamp(ts, zone)
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _cron_fires(schedule: CronSchedule, after: float) -> Iterator[float]:
    zone = ZoneInfo(schedule.tz)
    fields = _fields(schedule.expr)
    fixed = _is_fixed_time(fields)
    it = croniter(" ".join(fields), datetime.fromtimestamp(after, zone))
    last = after
    stalls = 0
    while True:
        try:
            t = float(it.get_next(float))
        except CroniterBadDateError:
            return
        if t <= last or (fixed and _is_second_pass(t, zone)):
            stalls += 1
            if stalls > 1000:  # never seen; keeps a croniter surprise from spinning forever
                return
            continue
        stalls = 0
        last = t
        yield t


# --- downtime -----------------------------------------------------------------------------


def _first_due(
    schedule: Schedule,
    *,
    last_run_at: float | None,
    next_run_at: float | None,
    created_at: float,
) -> float | None:
    """The earliest firing not yet handled, from what the store remembers."""
    due: float | None
    if next_run_at is not None:
        due = next_run_at
    elif isinstance(schedule, AtSchedule):
        due = schedule.at
    else:
        due = next_fire(schedule, after=created_at, created_at=created_at)
    if due is not None and last_run_at is not None and due <= last_run_at:
        # It ran, but the process stopped before the next time was saved.
        due = next_fire(schedule, after=last_run_at, created_at=created_at)
    return due


def missed_firings(
    schedule: Schedule,
    *,
    last_run_at: float | None,
    next_run_at: float | None,
    now: float,
    created_at: float,
    limit: int = 1000,
) -> int:
    """How many firings fell due (at or before ``now``) and never ran, capped at ``limit``.

    ``next_run_at`` is the time the store had planned (None: never planned, so the first
    firing after ``created_at`` counts); ``last_run_at`` is when a scheduled firing last ran.
    """
    due = _first_due(
        schedule, last_run_at=last_run_at, next_run_at=next_run_at, created_at=created_at
    )
    if due is None or due > now or limit < 1:
        return 0
    count = 1
    for t in _fires(schedule, after=due, created_at=created_at):
        if t > now or count >= limit:
            break
        count += 1
    return count


@attrs.frozen
class StartupPlan:
    """What the cron service does with one enabled job when the gateway starts.

    ``run_now``: run it once, soon.  ``next_run_at``: the next regular firing to arm (None:
    nothing more).  ``disable``: set the job disabled (after the run, when ``run_now``).
    ``missed``: how many firings were missed (capped at 100), for the log.
    """

    run_now: bool
    next_run_at: float | None
    disable: bool
    missed: int = 0


def plan_startup(
    schedule: Schedule,
    catch_up: CatchUp,
    next_run_at: float | None,
    now: float,
    created_at: float,
    *,
    last_run_at: float | None = None,
) -> StartupPlan:
    """Apply the contract's catch-up rules to one enabled job.

    ``once``: any number of missed firings give exactly one run now.  ``skip``: none.  A
    missed ``at`` job disables itself either way (after its one run with ``once``).
    """
    if catch_up not in ("once", "skip"):
        raise ValueError(f"catch_up must be 'once' or 'skip', not {catch_up!r}")
    missed = missed_firings(
        schedule,
        last_run_at=last_run_at,
        next_run_at=next_run_at,
        now=now,
        created_at=created_at,
        limit=100,
    )
    run_now = missed > 0 and catch_up == "once"
    if isinstance(schedule, AtSchedule) and missed:
        return StartupPlan(run_now=run_now, next_run_at=None, disable=True, missed=missed)
    upcoming = next_fire(schedule, after=now, created_at=created_at)
    return StartupPlan(
        run_now=run_now, next_run_at=upcoming, disable=upcoming is None, missed=missed
    )
