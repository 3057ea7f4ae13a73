"""A real Gateway on a fake ``Clock`` with a synchronous SQLite store, for timer unit tests.

The store is the real :class:`SQLiteStore` (same queries, same schema) whose writer thread is
swapped for :class:`SyncWriter`, which runs each call at once on the test's thread.  With the
echo provider a whole run then completes inside ``submit``; :class:`GateProvider` holds a
turn open until the test releases it.  Nothing touches the real reactor, so a test advances
time with ``clock.advance`` and never waits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from gatewayd.agent.base import ProviderRequest, ProviderTurn, Usage
from gatewayd.agent.providers.echo import EchoProvider
from gatewayd.agent.tools import default_registry
from gatewayd.auth import Principal, TokenRegistry
from gatewayd.config import Config
from gatewayd.core import Gateway
from gatewayd.events import Event
from gatewayd.store.sqlite import SQLiteStore, migrate

OPERATOR = Principal(token_id="config:operator", role="operator", name="operator")
T0 = 1_773_585_120.0  # 2026-03-15T14:32:00Z


class SyncWriter:
    """The writer thread's interface, run inline; each call in a savepoint, like the real one."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.conn.execute("SAVEPOINT call")
        try:
            result = fn(self.conn, *args)
        except Exception:
            self.conn.execute("ROLLBACK TO call")
            self.conn.execute("RELEASE call")
            return fail()
        self.conn.execute("RELEASE call")
        return succeed(result)


def sync_store(path: str = ":memory:") -> SQLiteStore:
    store = SQLiteStore(None, path)
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn)
    store._writer = SyncWriter(conn)  # type: ignore[assignment]
    return store


class GateProvider(EchoProvider):
    """Echo, but each turn waits until the test calls :meth:`release` (or :meth:`fail_all`)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[Deferred[ProviderTurn], str]] = []
        self.healthy = True

    def turn(
        self, request: ProviderRequest, on_text: Callable[[str], None]
    ) -> Deferred[ProviderTurn]:
        d: Deferred[ProviderTurn] = Deferred()
        self.waiting.append((d, request.messages[-1].content))
        return d

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, text in waiting:
            d.callback(ProviderTurn(text=text, usage=Usage(1, 1)))

    def check(self) -> Deferred[None]:
        if self.healthy:
            return succeed(None)
        from gatewayd.agent.base import ProviderError

        return fail(ProviderError("connection refused", code="provider_unavailable"))


@attrs.define
class ClockGateway:
    gw: Gateway
    clock: Clock
    store: SQLiteStore
    events: list[Event]

    def of_type(self, type: str) -> list[Event]:
        return [e for e in self.events if e.type == type]

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        writer = self.store._writer
        assert isinstance(writer, SyncWriter)
        return writer.conn.execute(query, args).fetchall()


def clock_gateway(
    tmp: str, config: Config | None = None, *, provider: Any = None, now: float = T0
) -> ClockGateway:
    clock = Clock()
    clock.advance(now)
    store = sync_store()
    gw = Gateway(
        config or Config(),
        reactor=clock,
        clock=clock,
        store=store,
        provider=provider or EchoProvider(),
        tools=default_registry(),
        tokens=TokenRegistry(clock),
        state_dir=tmp,
        workspace=tmp,
    )
    events: list[Event] = []
    gw.bus.subscribe(events.append)
    return ClockGateway(gw, clock, store, events)


def evolve_config(config: Config, **sections: dict[str, Any]) -> Config:
    """``config`` with some fields of some sections changed: evolve_config(c, cron={...})."""
    changes = {
        name: attrs.evolve(getattr(config, name), **fields) for name, fields in sections.items()
    }
    return attrs.evolve(config, **changes)
