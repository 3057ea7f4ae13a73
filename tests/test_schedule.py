"""Schedule math: parsing, next firing across DST, and the catch-up rules after downtime."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.errors import GatewayError
from gatewayd.schedule import (
    AtSchedule,
    CronSchedule,
    EverySchedule,
    Schedule,
    StartupPlan,
    missed_firings,
    next_fire,
    parse_catch_up,
    parse_rfc3339,
    parse_schedule,
    plan_startup,
    rfc3339,
)

T0 = parse_rfc3339("2026-03-15T14:32:00Z")
HOUR = 3600.0
DAY = 86400.0


def utc(s: str) -> float:
    return parse_rfc3339(s)


def firings(schedule: Schedule, start: float, end: float, created_at: float = 0.0) -> list[float]:
    """Every firing in (start, end], by chaining next_fire."""
    out: list[float] = []
    t = start
    while True:
        n = next_fire(schedule, after=t, created_at=created_at)
        if n is None or n > end:
            return out
        out.append(n)
        t = n


def local(ts: float, tz: str) -> str:
    return datetime.fromtimestamp(ts, ZoneInfo(tz)).isoformat()


# --- RFC 3339 -----------------------------------------------------------------------------


def test_rfc3339_formats_utc_with_z() -> None:
    assert rfc3339(T0) == "2026-03-15T14:32:00Z"
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(-1.0) == "1969-12-31T23:59:59Z"


def test_rfc3339_truncates_fractions_to_digits() -> None:
    ts = T0 + 0.987654
    assert rfc3339(ts) == "2026-03-15T14:32:00Z"
    assert rfc3339(ts, digits=3) == "2026-03-15T14:32:00.987Z"
    assert rfc3339(ts, digits=6) == "2026-03-15T14:32:00.987654Z"
    assert rfc3339(ts, digits=None) == "2026-03-15T14:32:00.987654Z"
    assert rfc3339(T0 + 0.5, digits=None) == "2026-03-15T14:32:00.500Z"
    assert rfc3339(T0, digits=None) == "2026-03-15T14:32:00Z"


def test_rfc3339_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        rfc3339(math.nan)
    with pytest.raises(ValueError):
        rfc3339(1e300)
    with pytest.raises(ValueError):
        rfc3339(T0, digits=2)


@pytest.mark.parametrize(
    "text",
    [
        "2026-03-15T14:32:00Z",
        "2026-03-15t14:32:00z",
        "2026-03-15 14:32:00Z",
        "2026-03-15T15:32:00+01:00",
        "2026-03-15T09:02:00-05:30",
        "2026-03-15T14:32:00-00:00",
        "2026-03-15T14:32:00.000Z",
    ],
)
def test_parse_rfc3339_accepts_z_and_offsets(text: str) -> None:
    assert parse_rfc3339(text) == T0


def test_parse_rfc3339_fractions() -> None:
    assert parse_rfc3339("2026-03-15T14:32:00.25Z") == T0 + 0.25
    # Beyond microseconds is truncated, like everywhere else in Python.
    assert parse_rfc3339("2026-03-15T14:32:00.1234569Z") == pytest.approx(T0 + 0.123456)


@pytest.mark.parametrize(
    "text",
    [
        "2026-03-15T14:32:00",  # naive
        "2026-03-15",
        "2026-03-15T14:32Z",
        "20260315T143200Z",
        "2026-03-15T14:32:00+0100",
        "2026-03-15T14:32:00+24:00",
        "2026-02-30T00:00:00Z",
        "2026-03-15T24:00:00Z",
        "2026-12-31T23:59:60Z",
        " 2026-03-15T14:32:00Z",
        "2026-03-15T14:32:00Z ",
        "２０２６-03-15T14:32:00Z",
        "",
        "now",
    ],
)
def test_parse_rfc3339_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


def test_parse_rfc3339_rejects_non_strings() -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(12345)  # type: ignore[arg-type]


@given(st.integers(min_value=-(10**15), max_value=253402300799 * 10**6))
def test_rfc3339_round_trips_microseconds(micros: int) -> None:
    ts = micros / 1e6
    assert parse_rfc3339(rfc3339(ts, digits=6)) == pytest.approx(ts, abs=1e-6)
    assert parse_rfc3339(rfc3339(ts)) == math.floor(round(ts * 1e6) / 1e6)


# --- parsing schedules --------------------------------------------------------------------


def test_parse_at_normalises_to_utc_z() -> None:
    s = parse_schedule({"type": "at", "at": "2026-03-15T15:32:00+01:00"})
    assert s == AtSchedule(T0)
    assert s.to_json() == {"type": "at", "at": "2026-03-15T14:32:00Z"}
    frac = parse_schedule({"type": "at", "at": "2026-03-15T14:32:00.25Z"})
    assert frac.to_json() == {"type": "at", "at": "2026-03-15T14:32:00.250Z"}


def test_parse_every_keeps_int_or_float() -> None:
    s = parse_schedule({"type": "every", "seconds": 60})
    assert s == EverySchedule(60)
    assert s.to_json() == {"type": "every", "seconds": 60}
    assert isinstance(s.to_json()["seconds"], int)
    assert parse_schedule({"type": "every", "seconds": 0.5}).to_json()["seconds"] == 0.5


def test_parse_cron_defaults_to_utc_and_normalises_spaces() -> None:
    s = parse_schedule({"type": "cron", "expr": "  */15   *  * * *  "})
    assert s == CronSchedule("*/15 * * * *", "UTC")
    assert s.to_json() == {"type": "cron", "expr": "*/15 * * * *", "tz": "UTC"}
    assert parse_schedule({"type": "cron", "expr": "0 9 * * mon-fri", "tz": None}) == (
        CronSchedule("0 9 * * mon-fri", "UTC")
    )
    berlin = parse_schedule({"type": "cron", "expr": "30 2 * * *", "tz": "Europe/Berlin"})
    assert berlin == CronSchedule("30 2 * * *", "Europe/Berlin")


@pytest.mark.parametrize(
    "expr",
    ["@hourly", "@daily", "@DAILY", "0 0 L * *", "0 0 * * 1#2", "0 0 29 2 *", "* * ? * *"],
)
def test_parse_cron_accepts_croniter_extensions(expr: str) -> None:
    s = parse_schedule({"type": "cron", "expr": expr})
    assert isinstance(s, CronSchedule)
    assert next_fire(s, after=T0, created_at=T0) is not None


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "at", "at": "2026-03-15T14:32:00Z"},
        {"type": "at", "at": "2026-03-15T14:32:00.123456Z"},
        {"type": "every", "seconds": 3600},
        {"type": "every", "seconds": 2.5},
        {"type": "cron", "expr": "0 9 * * 1-5", "tz": "America/New_York"},
    ],
)
def test_to_json_round_trips(obj: dict[str, Any]) -> None:
    s = parse_schedule(obj)
    assert parse_schedule(s.to_json()) == s
    assert parse_schedule(s.to_json()).to_json() == s.to_json()


BAD_SCHEDULES: list[tuple[object, str]] = [
    (None, "schedule"),
    ([], "schedule"),
    ("every 5 minutes", "schedule"),
    ({}, "schedule.type"),
    ({"type": "weekly"}, "schedule.type"),
    ({"type": 1}, "schedule.type"),
    ({"type": "every", "seconds": 5, "tz": "UTC"}, "schedule"),
    # at
    ({"type": "at"}, "schedule.at"),
    ({"type": "at", "at": 1773585120}, "schedule.at"),
    ({"type": "at", "at": "2026-03-15T14:32:00"}, "schedule.at"),
    ({"type": "at", "at": "2026-03-15"}, "schedule.at"),
    ({"type": "at", "at": "tomorrow"}, "schedule.at"),
    ({"type": "at", "at": "2026-13-01T00:00:00Z"}, "schedule.at"),
    # every
    ({"type": "every"}, "schedule.seconds"),
    ({"type": "every", "seconds": 0}, "schedule.seconds"),
    ({"type": "every", "seconds": -5}, "schedule.seconds"),
    ({"type": "every", "seconds": -0.5}, "schedule.seconds"),
    ({"type": "every", "seconds": "60"}, "schedule.seconds"),
    ({"type": "every", "seconds": True}, "schedule.seconds"),
    ({"type": "every", "seconds": None}, "schedule.seconds"),
    ({"type": "every", "seconds": [60]}, "schedule.seconds"),
    ({"type": "every", "seconds": math.nan}, "schedule.seconds"),
    ({"type": "every", "seconds": math.inf}, "schedule.seconds"),
    ({"type": "every", "seconds": 1e-9}, "schedule.seconds"),
    ({"type": "every", "seconds": 10**12}, "schedule.seconds"),
    # cron expressions
    ({"type": "cron"}, "schedule.expr"),
    ({"type": "cron", "expr": 5}, "schedule.expr"),
    ({"type": "cron", "expr": ""}, "schedule.expr"),
    ({"type": "cron", "expr": "* * * *"}, "schedule.expr"),
    ({"type": "cron", "expr": "0 * * * * *"}, "schedule.expr"),
    ({"type": "cron", "expr": "0 0 * * * * 2030"}, "schedule.expr"),
    ({"type": "cron", "expr": "61 * * * *"}, "schedule.expr"),
    ({"type": "cron", "expr": "* 24 * * *"}, "schedule.expr"),
    ({"type": "cron", "expr": "*/0 * * * *"}, "schedule.expr"),
    ({"type": "cron", "expr": "* * * * 8"}, "schedule.expr"),
    ({"type": "cron", "expr": "* * * foo *"}, "schedule.expr"),
    ({"type": "cron", "expr": "0 0 30 2 *"}, "schedule.expr"),
    ({"type": "cron", "expr": "0 0 31 4,6 *"}, "schedule.expr"),
    ({"type": "cron", "expr": "H * * * *"}, "schedule.expr"),
    ({"type": "cron", "expr": "R * * * *"}, "schedule.expr"),
    ({"type": "cron", "expr": "@reboot"}, "schedule.expr"),
    ({"type": "cron", "expr": "* " * 200}, "schedule.expr"),
    # time zones
    ({"type": "cron", "expr": "* * * * *", "tz": "Mars/Olympus"}, "schedule.tz"),
    ({"type": "cron", "expr": "* * * * *", "tz": "utc"}, "schedule.tz"),
    ({"type": "cron", "expr": "* * * * *", "tz": ""}, "schedule.tz"),
    ({"type": "cron", "expr": "* * * * *", "tz": 1}, "schedule.tz"),
    ({"type": "cron", "expr": "* * * * *", "tz": "Europe"}, "schedule.tz"),
    ({"type": "cron", "expr": "* * * * *", "tz": "../etc/passwd"}, "schedule.tz"),
    ({"type": "cron", "expr": "* * * * *", "tz": "/etc/localtime"}, "schedule.tz"),
    ({"type": "cron", "expr": "* * * * *", "tz": "localtime"}, "schedule.tz"),
    ({"type": "cron", "expr": "* * * * *", "tz": "Europe/Berlin\x00"}, "schedule.tz"),
    ({"type": "cron", "expr": "* * * * *", "tz": "x" * 300}, "schedule.tz"),
]


@pytest.mark.parametrize(("obj", "field"), BAD_SCHEDULES)
def test_parse_schedule_rejects_with_400_naming_the_field(obj: object, field: str) -> None:
    with pytest.raises(GatewayError) as info:
        parse_schedule(obj)
    err = info.value
    assert (err.code, err.status) == ("invalid_request", 400)
    assert err.message.startswith(field)
    assert err.to_json() == {"error": {"code": "invalid_request", "message": err.message}}


def test_parse_schedule_field_prefix_is_configurable() -> None:
    with pytest.raises(GatewayError, match=r"^cron\.jobs\[2\]\.schedule\.seconds"):
        parse_schedule({"type": "every", "seconds": 0}, field="cron.jobs[2].schedule")


def test_parse_catch_up() -> None:
    assert parse_catch_up(None) == "once"
    assert parse_catch_up("once") == "once"
    assert parse_catch_up("skip") == "skip"
    for bad in ("always", "", 1, True):
        with pytest.raises(GatewayError, match="^catch_up"):
            parse_catch_up(bad)


# --- next_fire basics ---------------------------------------------------------------------


def test_at_fires_once_if_still_ahead() -> None:
    s = AtSchedule(T0)
    assert next_fire(s, after=T0 - 1, created_at=0) == T0
    assert next_fire(s, after=T0, created_at=0) is None
    assert next_fire(s, after=T0 + 1, created_at=0) is None


def test_every_first_fires_seconds_after_creation() -> None:
    s = EverySchedule(60)
    assert next_fire(s, after=T0, created_at=T0) == T0 + 60
    # Before creation (clock skew) still means the first grid point, never creation itself.
    assert next_fire(s, after=T0 - 500, created_at=T0) == T0 + 60
    assert next_fire(s, after=T0 + 59.9, created_at=T0) == T0 + 60
    assert next_fire(s, after=T0 + 60, created_at=T0) == T0 + 120
    assert next_fire(s, after=T0 + 3601, created_at=T0) == T0 + 3660
    assert firings(s, T0, T0 + 300, created_at=T0) == [T0 + 60 * k for k in range(1, 6)]


def test_every_with_fractional_seconds_stays_on_the_grid() -> None:
    s = EverySchedule(0.1)
    got = firings(s, T0, T0 + 1.0, created_at=T0)
    assert len(got) in (9, 10)
    assert all(b > a for a, b in zip(got, got[1:], strict=False))
    assert got[0] == pytest.approx(T0 + 0.1)


def test_cron_utc_basics() -> None:
    s = CronSchedule("*/15 * * * *")
    assert next_fire(s, after=T0, created_at=0) == utc("2026-03-15T14:45:00Z")
    # Exactly on a firing means the next one: strictly after.
    assert next_fire(s, after=utc("2026-03-15T14:45:00Z"), created_at=0) == utc(
        "2026-03-15T15:00:00Z"
    )
    assert next_fire(s, after=utc("2026-03-15T14:44:59.999Z"), created_at=0) == utc(
        "2026-03-15T14:45:00Z"
    )
    weekdays = CronSchedule("0 9 * * mon-fri")
    # 2026-03-14 is a Saturday: the next weekday 09:00 is Monday the 16th.
    assert next_fire(weekdays, after=utc("2026-03-14T10:00:00Z"), created_at=0) == utc(
        "2026-03-16T09:00:00Z"
    )


def test_cron_in_a_zone_uses_local_wall_time() -> None:
    s = CronSchedule("0 9 * * *", "America/New_York")
    # Mid-January New York is UTC-5.
    assert next_fire(s, after=utc("2026-01-15T00:00:00Z"), created_at=0) == utc(
        "2026-01-15T14:00:00Z"
    )
    # Mid-July it is UTC-4.
    assert next_fire(s, after=utc("2026-07-15T00:00:00Z"), created_at=0) == utc(
        "2026-07-15T13:00:00Z"
    )


# --- DST ----------------------------------------------------------------------------------


def per_local_day(ts: list[float], tz: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in ts:
        day = local(t, tz)[:10]
        out[day] = out.get(day, 0) + 1
    return out


@pytest.mark.parametrize(
    ("tz", "day", "expr", "expected_utc"),
    [
        # Berlin skips 02:00-03:00 on 2024-03-31: 02:30 does not exist, it fires at 03:00 CEST.
        ("Europe/Berlin", "2024-03-31", "30 2 * * *", "2024-03-31T01:00:00Z"),
        # New York skips 02:00-03:00 on 2024-03-10: fires at 03:00 EDT.
        ("America/New_York", "2024-03-10", "30 2 * * *", "2024-03-10T07:00:00Z"),
    ],
)
def test_spring_forward_missing_time_fires_once_at_the_next_existing_minute(
    tz: str, day: str, expr: str, expected_utc: str
) -> None:
    s = CronSchedule(expr, tz)
    start = utc(f"{day}T00:00:00Z") - 2 * DAY
    got = firings(s, start, start + 5 * DAY)
    assert utc(expected_utc) in got
    assert local(utc(expected_utc), tz)[11:19] == "03:00:00"
    assert set(per_local_day(got, tz).values()) == {1}
    # The day after, it is back at 02:30 local.
    after = next_fire(s, after=utc(expected_utc), created_at=0)
    assert after is not None and local(after, tz)[11:19] == "02:30:00"


def test_spring_forward_wildcard_jobs_do_not_duplicate() -> None:
    s = CronSchedule("*/15 * * * *", "Europe/Berlin")
    got = firings(s, utc("2024-03-31T00:00:00Z"), utc("2024-03-31T02:00:00Z"))
    # 01:15, 01:30, 01:45 CET, then 03:00 CEST: real time moves on in 15-minute steps.
    assert [b - a for a, b in zip(got, got[1:], strict=False)] == [900.0] * (len(got) - 1)
    assert [local(t, "Europe/Berlin")[11:16] for t in got[2:5]] == ["01:45", "03:00", "03:15"]


@pytest.mark.parametrize(
    ("tz", "day"),
    [("Europe/Berlin", "2024-10-27"), ("America/New_York", "2024-11-03")],
)
def test_fall_back_hourly_fires_in_both_passes_of_the_repeated_hour(tz: str, day: str) -> None:
    """What croniter does (and we keep for wildcard jobs): strictly hourly in real time.

    The repeated local hour fires twice (e.g. 02:00 CEST and 02:00 CET), so the local day has
    25 firings and no gap or double-booking in UTC.
    """
    s = CronSchedule("0 * * * *", tz)
    zone = ZoneInfo(tz)
    midnight = datetime.fromisoformat(day).replace(tzinfo=zone).timestamp()
    got = firings(s, midnight - 1, midnight + 25 * HOUR - 1)
    assert len(got) == 25
    assert [b - a for a, b in zip(got, got[1:], strict=False)] == [HOUR] * 24
    hours = [local(t, tz)[11:13] for t in got]
    repeated = "02" if tz == "Europe/Berlin" else "01"
    assert hours.count(repeated) == 2


@pytest.mark.parametrize(
    ("tz", "day", "expr", "first_pass_utc"),
    [
        ("Europe/Berlin", "2024-10-27", "30 2 * * *", "2024-10-27T00:30:00Z"),
        ("America/New_York", "2024-11-03", "30 1 * * *", "2024-11-03T05:30:00Z"),
    ],
)
def test_fall_back_fixed_time_jobs_fire_once(
    tz: str, day: str, expr: str, first_pass_utc: str
) -> None:
    """croniter alone would fire 02:30 CEST and 02:30 CET; we keep only the first (Vixie cron)."""
    s = CronSchedule(expr, tz)
    start = utc(f"{day}T00:00:00Z") - 2 * DAY
    got = firings(s, start, start + 5 * DAY)
    assert utc(first_pass_utc) in got
    assert utc(first_pass_utc) + HOUR not in got
    assert set(per_local_day(got, tz).values()) == {1}


def test_fall_back_wildcard_minute_in_fixed_hour_runs_both_passes() -> None:
    # Minute field starts with '*': a wildcard job by Vixie's rule, so both passes of 01:xx run.
    s = CronSchedule("*/30 1 * * *", "America/New_York")
    got = firings(s, utc("2024-11-03T04:00:00Z"), utc("2024-11-03T08:00:00Z"))
    assert got == [
        utc("2024-11-03T05:00:00Z"),
        utc("2024-11-03T05:30:00Z"),
        utc("2024-11-03T06:00:00Z"),
        utc("2024-11-03T06:30:00Z"),
    ]


def test_fall_back_starting_inside_the_second_pass() -> None:
    s = CronSchedule("*/15 * * * *", "Europe/Berlin")
    second_pass_0230 = utc("2024-10-27T01:30:00Z")  # 02:30 CET
    assert next_fire(s, after=second_pass_0230, created_at=0) == second_pass_0230 + 900


# --- hypothesis: next_fire moves forward --------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]


def _cron_field(lo: int, hi: int) -> st.SearchStrategy[str]:
    value = st.integers(lo, hi).map(str)
    rng = st.tuples(st.integers(lo, hi), st.integers(lo, hi)).map(lambda ab: f"{min(ab)}-{max(ab)}")
    step = st.integers(1, max(1, (hi - lo) // 2)).map(lambda n: f"*/{n}")
    lists = st.lists(st.integers(lo, hi), min_size=1, max_size=3, unique=True).map(
        lambda xs: ",".join(map(str, sorted(xs)))
    )
    return st.one_of(st.just("*"), value, rng, step, lists)


cron_schedules = st.builds(
    lambda m, h, dom, mon, dow, tz: CronSchedule(f"{m} {h} {dom} {mon} {dow}", tz),
    _cron_field(0, 59),
    _cron_field(0, 23),
    st.one_of(st.just("*"), _cron_field(1, 28)),
    st.one_of(st.just("*"), _cron_field(1, 12)),
    st.one_of(st.just("*"), _cron_field(0, 6)),
    st.sampled_from(ZONES),
)
every_schedules = st.one_of(
    st.integers(1, 10 * 86400), st.floats(0.001, 1e6, allow_nan=False, allow_infinity=False)
).map(EverySchedule)
# Whole microseconds: the precision RFC 3339 round-trips in to_json.
at_schedules = st.integers(946684800 * 10**6, 3000000000 * 10**6).map(
    lambda us: AtSchedule(us / 1e6)
)
# DST transitions are where it goes wrong: bias `after` towards them.
TRANSITIONS = [utc(s) for s in ("2024-03-31T01:00:00Z", "2024-10-27T01:00:00Z",
                                "2024-03-10T07:00:00Z", "2024-11-03T06:00:00Z",
                                "2024-04-06T15:00:00Z", "2024-10-05T15:30:00Z")]  # fmt: skip
afters = st.one_of(
    st.floats(946684800, 3000000000),
    st.builds(lambda t, d: t + d, st.sampled_from(TRANSITIONS), st.floats(-7200, 7200)),
)


@settings(max_examples=300, deadline=None)
@given(
    schedule=st.one_of(cron_schedules, every_schedules, at_schedules),
    after=afters,
    created_offset=st.floats(-1e7, 1e7),
)
def test_next_fire_is_after_and_strictly_increasing(
    schedule: Schedule, after: float, created_offset: float
) -> None:
    created_at = after + created_offset
    # What parse_schedule accepts, it can also compute with.
    assert parse_schedule(schedule.to_json()) == schedule
    t = after
    for _ in range(6):
        n = next_fire(schedule, after=t, created_at=created_at)
        if n is None:
            assert isinstance(schedule, AtSchedule)
            return
        assert n > t
        if isinstance(schedule, EverySchedule):
            assert n > created_at
        t = n


# --- downtime: missed_firings and plan_startup ---------------------------------------------


def test_missed_firings_counts_every_grid_point_up_to_now() -> None:
    s = EverySchedule(60)
    created = T0
    # Planned for T0+60; down until T0+300: 60, 120, 180, 240, 300 are all due.
    n = missed_firings(s, last_run_at=None, next_run_at=T0 + 60, now=T0 + 300, created_at=created)
    assert n == 5
    n = missed_firings(s, last_run_at=None, next_run_at=T0 + 60, now=T0 + 59, created_at=created)
    assert n == 0
    capped = missed_firings(
        s, last_run_at=None, next_run_at=T0 + 60, now=T0 + 365 * DAY, created_at=created, limit=7
    )
    assert capped == 7


def test_missed_firings_without_a_planned_time_uses_creation() -> None:
    s = CronSchedule("0 * * * *")
    created = utc("2026-03-15T14:10:00Z")
    assert (
        missed_firings(s, last_run_at=None, next_run_at=None, now=created + 10, created_at=created)
        == 0
    )
    assert (
        missed_firings(
            s, last_run_at=None, next_run_at=None, now=created + 3 * HOUR, created_at=created
        )
        == 3
    )


def test_missed_firings_ignores_a_firing_that_already_ran() -> None:
    """The run was recorded but the process died before next_run_at was saved."""
    s = CronSchedule("0 * * * *")
    planned = utc("2026-03-15T15:00:00Z")
    n = missed_firings(
        s, last_run_at=planned + 1, next_run_at=planned, now=planned + 600, created_at=0
    )
    assert n == 0
    n = missed_firings(
        s, last_run_at=planned + 1, next_run_at=planned, now=planned + HOUR, created_at=0
    )
    assert n == 1


def test_plan_every_once_after_long_downtime_runs_exactly_once() -> None:
    s = EverySchedule(60)
    now = T0 + 30 * DAY + 30
    plan = plan_startup(s, "once", T0 + 60, now, T0)
    assert plan == StartupPlan(run_now=True, next_run_at=T0 + 30 * DAY + 60, disable=False,
                               missed=100)  # fmt: skip


def test_plan_every_skip_after_downtime_does_not_run() -> None:
    s = EverySchedule(60)
    now = T0 + 30 * DAY + 30
    plan = plan_startup(s, "skip", T0 + 60, now, T0)
    assert plan.run_now is False
    assert plan.disable is False
    assert plan.next_run_at == T0 + 30 * DAY + 60
    assert plan.missed > 0


def test_plan_nothing_missed_keeps_schedule() -> None:
    s = EverySchedule(60)
    for catch_up in ("once", "skip"):
        plan = plan_startup(s, catch_up, T0 + 120, T0 + 100, T0)
        assert plan == StartupPlan(run_now=False, next_run_at=T0 + 120, disable=False, missed=0)


def test_plan_recomputes_a_next_run_at_far_in_the_future() -> None:
    """A stored time after the real next firing (clock stepped back) is not waited for."""
    s = CronSchedule("0 * * * *")
    now = utc("2026-03-15T14:32:00Z")
    plan = plan_startup(s, "once", now + 30 * DAY, now, 0)
    assert plan == StartupPlan(
        run_now=False, next_run_at=utc("2026-03-15T15:00:00Z"), disable=False
    )


def test_plan_never_planned_job_created_before_downtime() -> None:
    s = EverySchedule(3600)
    created = T0
    plan = plan_startup(s, "once", None, T0 + 5 * HOUR + 1, created)
    assert plan.run_now is True
    assert plan.next_run_at == T0 + 6 * HOUR
    fresh = plan_startup(s, "once", None, T0 + 1, created)
    assert fresh == StartupPlan(run_now=False, next_run_at=T0 + HOUR, disable=False)


def test_plan_last_run_covers_the_planned_firing() -> None:
    s = CronSchedule("0 * * * *")
    planned = utc("2026-03-15T15:00:00Z")
    plan = plan_startup(s, "once", planned, planned + 60, 0, last_run_at=planned + 0.5)
    assert plan == StartupPlan(run_now=False, next_run_at=planned + HOUR, disable=False)


@pytest.mark.parametrize(("catch_up", "runs"), [("once", True), ("skip", False)])
def test_plan_cron_after_downtime(catch_up: Any, runs: bool) -> None:
    s = CronSchedule("30 2 * * *", "Europe/Berlin")
    planned = utc("2024-10-20T00:30:00Z")
    now = utc("2024-11-05T12:00:00Z")
    plan = plan_startup(s, catch_up, planned, now, 0)
    assert plan.run_now is runs
    assert plan.disable is False
    assert plan.next_run_at == utc("2024-11-06T01:30:00Z")  # 02:30 CET
    assert plan.missed == 17


def test_plan_missed_at_with_once_runs_then_disables() -> None:
    s = AtSchedule(T0)
    plan = plan_startup(s, "once", T0, T0 + DAY, T0 - DAY)
    assert plan == StartupPlan(run_now=True, next_run_at=None, disable=True, missed=1)
    # Same when the store never saved a next_run_at.
    assert plan_startup(s, "once", None, T0 + DAY, T0 - DAY) == plan


def test_plan_missed_at_with_skip_disables_without_running() -> None:
    s = AtSchedule(T0)
    plan = plan_startup(s, "skip", T0, T0 + DAY, T0 - DAY)
    assert plan == StartupPlan(run_now=False, next_run_at=None, disable=True, missed=1)


def test_plan_future_at_waits() -> None:
    s = AtSchedule(T0)
    for catch_up in ("once", "skip"):
        plan = plan_startup(s, catch_up, T0, T0 - 10, T0 - DAY)
        assert plan == StartupPlan(run_now=False, next_run_at=T0, disable=False)


def test_plan_at_that_already_ran_disables_without_running() -> None:
    s = AtSchedule(T0)
    plan = plan_startup(s, "once", None, T0 + DAY, T0 - DAY, last_run_at=T0 + 1)
    assert plan == StartupPlan(run_now=False, next_run_at=None, disable=True, missed=0)


def test_plan_due_exactly_now_runs_with_once_and_plans_the_next() -> None:
    s = EverySchedule(60)
    plan = plan_startup(s, "once", T0 + 60, T0 + 60, T0)
    assert plan == StartupPlan(run_now=True, next_run_at=T0 + 120, disable=False, missed=1)


def test_plan_rejects_unknown_catch_up() -> None:
    with pytest.raises(ValueError):
        plan_startup(EverySchedule(60), "always", None, T0, T0)  # type: ignore[arg-type]


def test_timedelta_sanity_for_helpers() -> None:
    # rfc3339 and parse_rfc3339 agree with datetime's own arithmetic far from the epoch.
    dt = datetime.fromisoformat("2099-12-31T23:59:59+00:00")
    assert rfc3339(dt.timestamp()) == "2099-12-31T23:59:59Z"
    assert parse_rfc3339("2099-12-31T23:59:59Z") == dt.timestamp()
    assert parse_rfc3339("0001-01-01T00:00:00Z") == -62135596800.0
    assert rfc3339(-62135596800.0) == "0001-01-01T00:00:00Z"
    assert timedelta(seconds=parse_rfc3339("1970-01-02T00:00:00+01:00")) == timedelta(hours=23)
