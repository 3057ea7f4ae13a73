"""Pruning on a fake Clock: idle sessions expire with an event, retention removes old rows."""

from __future__ import annotations

from typing import Any

from gatewayd.config import Config
from gatewayd.prune import PruneService
from gatewayd.store.records import Run
from tests.clockgw import T0, ClockGateway, clock_gateway, evolve_config

DAY = 86400.0


def pruned(tmp: str, config: Config | None = None, **kw: Any) -> tuple[ClockGateway, PruneService]:
    config = config or evolve_config(
        Config(),
        sessions={"ttl_days": 30.0},
        retention={"runs_days": 90.0, "delivery_ids_days": 7.0},
    )
    cg = clock_gateway(tmp, config)
    return cg, PruneService(cg.gw, clock=cg.clock, **kw)


def session(cg: ClockGateway, sid: str, idle_days: float, owner: str = "config:chat") -> None:
    t = cg.clock.seconds() - idle_days * DAY
    cg.sql(
        "INSERT INTO sessions (id, owner, title, created_at, last_activity) VALUES (?,?,?,?,?)",
        sid,
        owner,
        "",
        t,
        t,
    )
    cg.sql(
        "INSERT INTO messages (session_id, role, content, created_at) VALUES (?,?,?,?)",
        sid,
        "user",
        "hi",
        t,
    )


def ids(cg: ClockGateway, table: str, column: str = "id") -> list[Any]:
    return sorted(r[0] for r in cg.sql(f"SELECT {column} FROM {table}"))


def test_idle_sessions_expire_at_start_and_every_five_minutes(tmp_path: Any) -> None:
    cg, svc = pruned(str(tmp_path))
    session(cg, "old", 31, owner="config:chat")
    session(cg, "fresh", 29.999)
    session(cg, "busy", 45)
    cg.store.begin_run(
        Run(id="run_1", session_id="busy", owner="x", status="running", created_at=T0),
        "m",
        T0,
        create_session=None,
    )
    svc.startService()  # prunes at once
    assert ids(cg, "sessions") == ["busy", "fresh"]
    [expired] = cg.of_type("session_expired")
    assert (expired.session_id, expired.owner) == ("old", "config:chat")
    assert ids(cg, "messages", "session_id") == ["busy", "busy", "fresh"]  # cascade
    cg.clock.advance(299)
    assert len(cg.of_type("session_expired")) == 1
    cg.clock.advance(1)  # five minutes on, "fresh" has passed 30 days
    assert ids(cg, "sessions") == ["busy"]
    assert [e.session_id for e in cg.of_type("session_expired")] == ["old", "fresh"]
    assert svc.ticks == 2
    svc.stopService()


def test_retention_removes_old_rows_but_nothing_unfinished(tmp_path: Any) -> None:
    cg, svc = pruned(str(tmp_path), batch=2)  # small batches: the loop must go round
    old, new = T0 - 91 * DAY, T0 - 89 * DAY
    for i, (created, status) in enumerate(
        [
            (old, "completed"),
            (old, "failed"),
            (old, "aborted"),
            (old, "running"),
            (new, "completed"),
        ]
    ):
        cg.sql(
            "INSERT INTO runs (id, session_id, owner, status, created_at) VALUES (?,?,?,?,?)",
            f"r{i}",
            "s",
            "o",
            status,
            created,
        )
    for i, (created, status) in enumerate([(old, "approved"), (old, "pending"), (new, "denied")]):
        cg.sql(
            "INSERT INTO approvals (id, run_id, session_id, tool, input, status, created_at) "
            "VALUES (?,?,?,?,?,?,?)",
            f"a{i}",
            "r",
            "s",
            "bash",
            "{}",
            status,
            created,
        )
    for i, ts in enumerate([old, old, old, old, old, new]):
        cg.sql("INSERT INTO audit (ts, actor, action) VALUES (?,?,?)", ts, "x", f"act{i}")
        cg.sql("INSERT INTO events (id, ts, type, body) VALUES (?,?,?,?)", i + 1, ts, "t", "{}")
    for i, days in enumerate([8, 8, 8, 6]):
        cg.sql(
            "INSERT INTO deliveries (hook, delivery_id, received_at) VALUES (?,?,?)",
            "gh",
            f"d{i}",
            T0 - days * DAY,
        )
    result = done_prune(svc)
    assert result == {
        "sessions": 0,
        "runs": 3,
        "approvals": 1,
        "audit": 5,
        "events": 5,
        "deliveries": 3,
    }
    assert ids(cg, "runs") == ["r3", "r4"]
    assert ids(cg, "approvals") == ["a1", "a2"]
    assert ids(cg, "audit", "action") == ["act5"]
    assert ids(cg, "events") == [6]
    assert ids(cg, "deliveries", "delivery_id") == ["d3"]
    assert done_prune(svc) == dict.fromkeys(result, 0)


def done_prune(svc: PruneService) -> dict[str, int]:
    from tests.test_scheduler import done

    return done(svc.prune())
