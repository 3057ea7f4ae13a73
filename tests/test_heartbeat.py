"""The heartbeat on a fake Clock: self-checks, the agent check-in, and alerts."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred

from gatewayd.config import Config
from gatewayd.heartbeat import HEARTBEAT_SESSION, HeartbeatService
from tests.clockgw import ClockGateway, GateProvider, clock_gateway, evolve_config
from tests.test_scheduler import done

MiB = 1024 * 1024
GiB = 1024 * MiB
PLENTY = (50 * GiB, 100 * GiB)


def heartbeat(
    tmp: str, *, prompt: str = "", channel: str = "", provider: Any = None, **kw: Any
) -> tuple[ClockGateway, HeartbeatService]:
    config = evolve_config(
        Config(), heartbeat={"interval_s": 60.0, "prompt": prompt, "channel": channel}
    )
    cg = clock_gateway(tmp, config, provider=provider)
    kw.setdefault("disk", lambda path: PLENTY)
    return cg, HeartbeatService(cg.gw, clock=cg.clock, **kw)


def alerts(cg: ClockGateway) -> list[dict[str, Any]]:
    return [e.payload for e in cg.of_type("heartbeat_alert")]


def test_a_healthy_gateway_raises_no_alert(tmp_path: Any) -> None:
    cg, hb = heartbeat(str(tmp_path))
    assert done(hb.beat()) == {"store": None, "disk": None, "provider": None}
    assert alerts(cg) == []
    [(value,)] = cg.sql("SELECT value FROM meta WHERE key = 'heartbeat_at'")
    assert value.startswith("2026-03-15T14:32:00")


def test_a_read_only_store_raises_an_alert(tmp_path: Any) -> None:
    cg, hb = heartbeat(str(tmp_path), channel="telegram")
    cg.sql("PRAGMA query_only = 1")  # the database now refuses every write
    results = done(hb.beat())
    assert results["store"] is not None and "readonly" in results["store"]
    [alert] = alerts(cg)
    assert alert["check"] == "store" and "readonly" in alert["message"]
    assert alert["channel"] == "telegram"
    cg.sql("PRAGMA query_only = 0")
    done(hb.beat())
    assert len(alerts(cg)) == 1  # recovered


def test_an_unreachable_provider_raises_an_alert(tmp_path: Any) -> None:
    provider = GateProvider()
    provider.healthy = False
    cg, hb = heartbeat(str(tmp_path), provider=provider)
    done(hb.beat())
    assert alerts(cg) == [{"check": "provider", "message": "connection refused", "channel": ""}]


@pytest.mark.parametrize(
    "usage", [(50 * MiB, 100 * GiB), (5 * GiB, 1000 * GiB)], ids=["under-100MiB", "under-1pct"]
)
def test_low_disk_raises_an_alert(tmp_path: Any, usage: tuple[int, int]) -> None:
    cg, hb = heartbeat(str(tmp_path), disk=lambda path: usage)
    done(hb.beat())
    [alert] = alerts(cg)
    assert alert["check"] == "disk" and "free in the state directory" in alert["message"]


def test_real_disk_usage_of_the_state_dir_passes(tmp_path: Any) -> None:
    from gatewayd.heartbeat import disk_usage

    free, total = disk_usage(str(tmp_path))
    assert 0 < free <= total


def test_a_prompt_answered_otherwise_than_heartbeat_ok_alerts(tmp_path: Any) -> None:
    # the echo provider answers with the prompt itself
    cg, hb = heartbeat(str(tmp_path), prompt="Check the queues.", channel="slack:#ops")
    results = done(hb.beat())
    assert results["prompt"] == "Check the queues."
    assert alerts(cg) == [
        {"check": "prompt", "message": "Check the queues.", "channel": "slack:#ops"}
    ]
    [(source, channel, session)] = cg.sql("SELECT source, channel, session_id FROM runs")
    assert (source, channel, session) == ("heartbeat", "", HEARTBEAT_SESSION)
    done(hb.beat())
    # the heartbeat session keeps only the latest check-in
    [(count,)] = cg.sql("SELECT message_count FROM sessions WHERE id = ?", HEARTBEAT_SESSION)
    assert count == 2


def test_heartbeat_ok_means_all_is_well(tmp_path: Any) -> None:
    cg, hb = heartbeat(str(tmp_path), prompt="HEARTBEAT_OK")
    assert done(hb.beat())["prompt"] is None
    assert alerts(cg) == []


def test_it_beats_every_interval_and_a_hung_check_times_out(tmp_path: Any) -> None:
    provider = GateProvider()
    cg, hb = heartbeat(str(tmp_path), provider=provider, check_timeout_s=5)
    hung: list[Deferred[None]] = []
    provider.check = lambda: hung.append(Deferred()) or hung[-1]  # type: ignore[method-assign]
    hb.startService()
    assert hb.ticks == 0  # the first beat is one interval after start
    cg.clock.advance(60)
    assert hb.ticks == 1 and alerts(cg) == []
    cg.clock.advance(5)
    assert alerts(cg) == [{"check": "provider", "message": "timed out", "channel": ""}]
    cg.clock.advance(55)
    assert hb.ticks == 2
    done_stop = hb.stopService()
    cg.clock.advance(5)
    assert done_stop.called


def test_the_timer_survives_a_beat_that_raises(tmp_path: Any) -> None:
    cg, hb = heartbeat(str(tmp_path), disk=lambda path: (0, 0))
    calls: list[str] = []

    def flaky_alert(check: str, message: str) -> None:
        calls.append(check)
        if len(calls) == 1:
            raise RuntimeError("bus on fire")

    hb.alert = flaky_alert  # type: ignore[method-assign]
    hb.startService()
    cg.clock.advance(60)
    cg.clock.advance(60)
    assert hb.ticks == 2 and calls == ["disk", "disk"]
    hb.stopService()
