"""Store queries for webhooks and bridges: the replay cache and the dead-letter list.

Plain functions over ``store.run`` (the writer thread), so the hook routes, the bridges and
the operations share one spelling of each query, and every check-and-write is one call on
the writer thread — atomic with respect to every other store call.
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Any

import attrs
from twisted.internet.defer import Deferred

#: delivery ids longer than this are kept as a digest (the sender chooses them)
MAX_DELIVERY_ID = 200


def delivery_key(delivery_id: str) -> str:
    """The form a sender-chosen delivery id is stored under: as is, or a digest when long."""
    if len(delivery_id) <= MAX_DELIVERY_ID:
        return delivery_id
    return "sha256:" + hashlib.sha256(delivery_id.encode("utf-8", "surrogateescape")).hexdigest()


def claim_delivery(store: Any, hook: str, delivery_id: str, now: float) -> Deferred[bool]:
    """Record ``(hook, delivery_id)``; True when it is new, False when it was seen before.

    One ``INSERT OR IGNORE`` on the writer thread, so two concurrent copies of a delivery can
    never both be claimed.
    """

    def q(conn: sqlite3.Connection) -> bool:
        cur = conn.execute(
            "INSERT OR IGNORE INTO deliveries (hook, delivery_id, received_at) VALUES (?,?,?)",
            (hook, delivery_id, now),
        )
        return cur.rowcount == 1

    d: Deferred[bool] = store.run(q)
    return d


def set_delivery_run(store: Any, hook: str, delivery_id: str, run_id: str) -> Deferred[None]:
    def q(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE deliveries SET run_id = ? WHERE hook = ? AND delivery_id = ?",
            (run_id, hook, delivery_id),
        )

    d: Deferred[None] = store.run(q)
    return d


def release_delivery(store: Any, hook: str, delivery_id: str) -> Deferred[None]:
    """Forget a claimed delivery whose run could not start, so the sender's retry may."""

    def q(conn: sqlite3.Connection) -> None:
        conn.execute(
            "DELETE FROM deliveries WHERE hook = ? AND delivery_id = ? AND run_id IS NULL",
            (hook, delivery_id),
        )

    d: Deferred[None] = store.run(q)
    return d


# -- dead letters --------------------------------------------------------------------------------


@attrs.frozen
class DeadLetter:
    id: str
    target: str
    body: str
    attempts: int
    last_error: str
    created_at: float


_DL_COLUMNS = "id, target, body, attempts, last_error, created_at"


def add_dead_letter(store: Any, letter: DeadLetter) -> Deferred[None]:
    def q(conn: sqlite3.Connection) -> None:
        conn.execute(
            f"INSERT INTO dead_letters ({_DL_COLUMNS}) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET attempts = excluded.attempts, "
            "last_error = excluded.last_error",
            attrs.astuple(letter),
        )

    d: Deferred[None] = store.run(q)
    return d


def list_dead_letters(store: Any, limit: int = 200) -> Deferred[list[DeadLetter]]:
    def q(conn: sqlite3.Connection) -> list[DeadLetter]:
        rows = conn.execute(
            f"SELECT {_DL_COLUMNS} FROM dead_letters ORDER BY created_at, id LIMIT ?", (limit,)
        )
        return [DeadLetter(*row) for row in rows]

    d: Deferred[list[DeadLetter]] = store.run(q)
    return d


def get_dead_letter(store: Any, id: str) -> Deferred[DeadLetter | None]:
    def q(conn: sqlite3.Connection) -> DeadLetter | None:
        row = conn.execute(f"SELECT {_DL_COLUMNS} FROM dead_letters WHERE id = ?", (id,)).fetchone()
        return DeadLetter(*row) if row else None

    d: Deferred[DeadLetter | None] = store.run(q)
    return d


def update_dead_letter(store: Any, id: str, attempts: int, last_error: str) -> Deferred[None]:
    def q(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE dead_letters SET attempts = ?, last_error = ? WHERE id = ?",
            (attempts, last_error, id),
        )

    d: Deferred[None] = store.run(q)
    return d


def delete_dead_letter(store: Any, id: str) -> Deferred[bool]:
    def q(conn: sqlite3.Connection) -> bool:
        return conn.execute("DELETE FROM dead_letters WHERE id = ?", (id,)).rowcount > 0

    d: Deferred[bool] = store.run(q)
    return d
