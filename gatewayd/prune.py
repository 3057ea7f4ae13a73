"""Pruning every five minutes: idle sessions past ``sessions.ttl_days``, and ``[retention]``.

Old rows go in small batches, each its own store call, so the writer thread keeps serving
chats in between however much has piled up.  The append-only tables (events, audit,
deliveries) are deleted from their oldest rows forward, which needs no index on time.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gatewayd.store.records import FINAL_RUN_STATES
from gatewayd.timers import GuardedTimerService

if TYPE_CHECKING:
    from gatewayd.core import Gateway

__all__ = ["PRUNE_INTERVAL_S", "PruneService"]

PRUNE_INTERVAL_S = 300.0
DAY = 86400.0
BATCH = 1000

_FINAL = ", ".join(f"'{s}'" for s in FINAL_RUN_STATES)
#: table -> one batch delete; ``?`` is the cutoff then the batch size
_DELETES: dict[str, str] = {
    # runs has an index on created_at; an unfinished run is never deleted
    "runs": (
        "DELETE FROM runs WHERE rowid IN (SELECT rowid FROM runs WHERE created_at < ? "
        f"AND status IN ({_FINAL}) LIMIT ?)"
    ),
    "approvals": (
        "DELETE FROM approvals WHERE rowid IN (SELECT rowid FROM approvals "
        "WHERE created_at < ? AND status != 'pending' LIMIT ?)"
    ),
    # appended in time order: look only at the oldest rows
    "audit": (
        "DELETE FROM audit WHERE ts < ?1 AND rowid IN "
        "(SELECT rowid FROM audit ORDER BY rowid LIMIT ?2)"
    ),
    "events": (
        "DELETE FROM events WHERE ts < ?1 AND rowid IN "
        "(SELECT rowid FROM events ORDER BY rowid LIMIT ?2)"
    ),
    "deliveries": (
        "DELETE FROM deliveries WHERE received_at < ?1 AND rowid IN "
        "(SELECT rowid FROM deliveries ORDER BY rowid LIMIT ?2)"
    ),
}


def _delete_batch(conn: sqlite3.Connection, sql: str, cutoff: float, batch: int) -> int:
    return conn.execute(sql, (cutoff, batch)).rowcount


def _idle_owners(conn: sqlite3.Connection, idle_before: float) -> dict[str, str]:
    rows = conn.execute("SELECT id, owner FROM sessions WHERE last_activity < ?", (idle_before,))
    return {sid: owner for sid, owner in rows}


class PruneService(GuardedTimerService):
    """Prunes at start and then every ``interval_s`` (five minutes)."""

    _log = Logger()

    def __init__(
        self,
        gw: Gateway,
        *,
        clock: IReactorTime | None = None,
        interval_s: float = PRUNE_INTERVAL_S,
        batch: int = BATCH,
    ) -> None:
        super().__init__(
            interval_s,
            self.prune,
            clock=clock if clock is not None else gw.clock,
            name="prune",
            now=True,
            timeout=interval_s,
        )
        self.gw = gw
        self._batch = batch

    async def prune(self) -> dict[str, int]:
        """One pass; returns how many rows went, by table (``sessions`` for expired ones)."""
        now = self.clock.seconds()
        counts = {"sessions": len(await self.expire_sessions(now))}
        counts.update(await self.enforce_retention(now))
        removed = {k: v for k, v in counts.items() if v}
        if removed:
            self._log.info("pruned {removed}", removed=removed)
        return counts

    async def expire_sessions(self, now: float) -> list[str]:
        """Delete sessions idle past ``ttl_days`` (none with an unfinished run)."""
        gw = self.gw
        idle_before = now - gw.config.sessions.ttl_days * DAY
        owners: dict[str, str] = await gw.store.run(_idle_owners, idle_before)
        if not owners:
            return []
        expired: list[str] = await gw.store.prune_sessions(idle_before)
        for sid in expired:
            gw.bus.publish("session_expired", session_id=sid, owner=owners.get(sid))
        return expired

    async def enforce_retention(self, now: float) -> dict[str, int]:
        retention = self.gw.config.retention
        runs_cutoff = now - retention.runs_days * DAY
        cutoffs = {
            "runs": runs_cutoff,
            "approvals": runs_cutoff,
            "audit": runs_cutoff,
            "events": runs_cutoff,
            "deliveries": now - retention.delivery_ids_days * DAY,
        }
        return {table: await self._delete_older(table, cutoff) for table, cutoff in cutoffs.items()}

    async def _delete_older(self, table: str, cutoff: float) -> int:
        total = 0
        while True:
            n: Any = await self.gw.store.run(_delete_batch, _DELETES[table], cutoff, self._batch)
            total += int(n)
            if n < self._batch:
                return total
