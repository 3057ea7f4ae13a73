"""The SQLite store: WAL mode, one batching writer thread, versioned migrations."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gatewayd.store import StoreError
from gatewayd.store.checkpoint import MAX_FRAMES, Checkpointer
from gatewayd.store.engine import WriterThread
from gatewayd.store.records import FINAL_RUN_STATES, Interrupted, Message, Run, Session
from gatewayd.store.schema import MIGRATIONS

_RUN_COLUMNS = (
    "id, session_id, owner, status, created_at, source, response, error, error_code, "
    "tokens_in, tokens_out, cost_cents, tools_used, started_at, finished_at, channel"
)
_SESSION_COLUMNS = "id, owner, title, created_at, last_activity, message_count, agent_id, channel"
_MESSAGE_COLUMNS = "id, session_id, role, content, created_at, run_id, tool, is_error"
_TOKEN_FIELDS = ("id", "hash", "role", "name", "kind", "created_at", "expires_at", "created_by")
_TOKEN_COLUMNS = ", ".join(_TOKEN_FIELDS)
_DEVICE_FIELDS = ("id", "name", "role", "token_id", "created_at", "paired_from")
_DEVICE_COLUMNS = ", ".join(_DEVICE_FIELDS)


def migrate(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the store is at schema version {version}, newer than this gatewayd "
            f"({len(MIGRATIONS)}); refusing to start"
        )
    for number in range(version + 1, len(MIGRATIONS) + 1):
        conn.executescript(
            "BEGIN;" + MIGRATIONS[number - 1] + f";PRAGMA user_version={number};COMMIT;"
        )


_log = Logger()


def _checkpoint_rarely(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA wal_autocheckpoint={MAX_FRAMES}")


def _session(row: tuple[Any, ...]) -> Session:
    return Session(*row)


def _message(row: tuple[Any, ...]) -> Message:
    mid, sid, role, content, created, run_id, tool, is_error = row
    return Message(mid, sid, role, content, created, run_id, tool, bool(is_error))


def _run(row: tuple[Any, ...]) -> Run:
    values = list(row)
    values[12] = tuple(json.loads(values[12] or "[]"))
    (
        rid,
        sid,
        owner,
        status,
        created,
        source,
        response,
        error,
        code,
        tin,
        tout,
        cost,
        used,
        started,
        finished,
        channel,
    ) = values
    return Run(
        id=rid,
        session_id=sid,
        owner=owner,
        status=status,
        created_at=created,
        source=source,
        response=response,
        error=error,
        error_code=code,
        tokens_in=tin,
        tokens_out=tout,
        cost_cents=cost,
        tools_used=used,
        started_at=started,
        finished_at=finished,
        channel=channel,
    )


def _insert_session(conn: sqlite3.Connection, s: Session) -> None:
    conn.execute(
        f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
        (
            s.id,
            s.owner,
            s.title,
            s.created_at,
            s.last_activity,
            s.message_count,
            s.agent_id,
            s.channel,
        ),
    )


_INSERT_MESSAGE = (
    "INSERT INTO messages (session_id, role, content, created_at, run_id, tool, is_error) "
    "VALUES (?,?,?,?,?,?,?)"
)
#: the same, but nothing when the session is gone (deleted while its run went on)
_INSERT_MESSAGE_IF_SESSION = (
    "INSERT INTO messages (session_id, role, content, created_at, run_id, tool, is_error) "
    "SELECT ?,?,?,?,?,?,? WHERE EXISTS (SELECT 1 FROM sessions WHERE id = ?1)"
)


def _insert_message(
    conn: sqlite3.Connection,
    session_id: str,
    role: str,
    content: str,
    now: float,
    run_id: str | None,
    tool: str | None,
    is_error: bool,
) -> Message:
    """One message; the ``messages_count`` trigger counts it in its session."""
    cur = conn.execute(
        _INSERT_MESSAGE, (session_id, role, content, now, run_id, tool, int(is_error))
    )
    mid = cur.lastrowid
    assert mid is not None
    return Message(mid, session_id, role, content, now, run_id, tool, is_error)


def _insert_run(conn: sqlite3.Connection, r: Run) -> None:
    conn.execute(
        f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            r.id,
            r.session_id,
            r.owner,
            r.status,
            r.created_at,
            r.source,
            r.response,
            r.error,
            r.error_code,
            r.tokens_in,
            r.tokens_out,
            r.cost_cents,
            json.dumps(list(r.tools_used)),
            r.started_at,
            r.finished_at,
            r.channel,
        ),
    )


class SQLiteStore:
    """The default store; see :mod:`gatewayd.store.engine` for the threading model."""

    def __init__(self, reactor: Any, path: str) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._writer = WriterThread(reactor, path, migrate)
        self.checkpointer = Checkpointer(reactor, path)

    def start(self) -> Deferred[None]:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        d = self._writer.start()
        d.addCallback(self._start_checkpoints)
        return d

    def _start_checkpoints(self, _: None) -> Deferred[None] | None:
        """Hand checkpoints to their own thread (:mod:`gatewayd.store.checkpoint`)."""
        try:
            self.checkpointer.open()
        except sqlite3.Error:
            _log.failure("no checkpoint thread: the writer goes on checkpointing itself")
            return None
        self.checkpointer.start()
        return self._writer.submit(_checkpoint_rarely)

    def stop(self) -> Deferred[None]:
        d = self.checkpointer.stop()
        d.addCallback(lambda _: self._writer.stop())
        return d

    def run(self, fn: Any, *args: Any) -> Deferred[Any]:
        """Run ``fn(conn, *args)`` on the writer thread, in order with every other call."""
        return self._writer.submit(fn, *args)

    # -- sessions --------------------------------------------------------------------------

    def create_session(
        self, id: str, owner: str, title: str, now: float, agent_id: str = "", channel: str = ""
    ) -> Deferred[Session]:
        s = Session(id, owner, title, now, now, 0, agent_id, channel)

        def q(conn: sqlite3.Connection) -> Session:
            _insert_session(conn, s)
            return s

        return self._writer.submit(q)

    def get_session(self, id: str) -> Deferred[Session | None]:
        def q(conn: sqlite3.Connection) -> Session | None:
            row = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?", (id,)
            ).fetchone()
            return _session(row) if row else None

        return self._writer.submit(q)

    def list_sessions(self, owner: str | None, limit: int, offset: int) -> Deferred[list[Session]]:
        def q(conn: sqlite3.Connection) -> list[Session]:
            if owner is None:
                rows = conn.execute(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions "
                    "ORDER BY last_activity DESC, rowid DESC LIMIT ? OFFSET ?",
                    (limit, offset),
                )
            else:
                rows = conn.execute(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE owner = ? "
                    "ORDER BY last_activity DESC, rowid DESC LIMIT ? OFFSET ?",
                    (owner, limit, offset),
                )
            return [_session(r) for r in rows]

        return self._writer.submit(q)

    def count_sessions(self) -> Deferred[int]:
        def q(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])

        return self._writer.submit(q)

    def update_session(self, id: str, title: str, now: float) -> Deferred[Session | None]:
        def q(conn: sqlite3.Connection) -> Session | None:
            conn.execute(
                "UPDATE sessions SET title = ?, last_activity = ? WHERE id = ?", (title, now, id)
            )
            row = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?", (id,)
            ).fetchone()
            return _session(row) if row else None

        return self._writer.submit(q)

    def delete_session(self, id: str) -> Deferred[bool]:
        def q(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM sessions WHERE id = ?", (id,)).rowcount > 0

        return self._writer.submit(q)

    def reset_session(self, id: str, now: float) -> Deferred[bool]:
        def q(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM messages WHERE session_id = ?", (id,))
            return (
                conn.execute(
                    "UPDATE sessions SET message_count = 0, last_activity = ? WHERE id = ?",
                    (now, id),
                ).rowcount
                > 0
            )

        return self._writer.submit(q)

    def prune_sessions(self, idle_before: float) -> Deferred[list[str]]:
        """Delete sessions idle since ``idle_before`` that have no unfinished run."""

        def q(conn: sqlite3.Connection) -> list[str]:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM sessions WHERE last_activity < ? AND id NOT IN "
                    "(SELECT session_id FROM runs WHERE status NOT IN (?,?,?))",
                    (idle_before, *FINAL_RUN_STATES),
                )
            ]
            conn.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in ids])
            return ids

        return self._writer.submit(q)

    # -- messages --------------------------------------------------------------------------

    def begin_run(
        self,
        run: Run,
        message: str,
        now: float,
        *,
        create_session: Session | None,
        context: Sequence[tuple[str, str]] = (),
    ) -> Deferred[Message]:
        """Store (the session, the earlier ``(role, content)`` context,) the user message and
        the queued run in one transaction."""

        def q(conn: sqlite3.Connection) -> Message:
            if create_session is not None:
                _insert_session(conn, create_session)
            _insert_run(conn, run)
            for role, content in context:
                _insert_message(conn, run.session_id, role, content, now, None, None, False)
            return _insert_message(conn, run.session_id, "user", message, now, run.id, None, False)

        return self._writer.submit(q)

    def add_message(
        self,
        session_id: str,
        role: str,
        content: str,
        now: float,
        run_id: str | None = None,
        tool: str | None = None,
        is_error: bool = False,
    ) -> Deferred[Message]:
        return self._writer.submit(
            _insert_message, session_id, role, content, now, run_id, tool, is_error
        )

    def history(self, session_id: str, limit: int | None = None) -> Deferred[list[Message]]:
        def q(conn: sqlite3.Connection) -> list[Message]:
            if limit is None:
                rows = conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY id",
                    (session_id,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? "
                    "ORDER BY id DESC LIMIT ?",
                    (session_id, limit),
                ).fetchall()[::-1]
            return [_message(r) for r in rows]

        return self._writer.submit(q)

    def search_messages(self, query: str, owner: str | None, limit: int) -> Deferred[list[Message]]:
        # each word is quoted, so FTS5 syntax in user input is never interpreted; FTS5 ends a
        # string at NUL ("unterminated string"), so NUL splits words like a space
        terms = " ".join(
            '"' + w.replace('"', '""') + '"' for w in query.replace("\x00", " ").split()
        )

        def q(conn: sqlite3.Connection) -> list[Message]:
            if not terms:
                return []
            cols = ", ".join("m." + c.strip() for c in _MESSAGE_COLUMNS.split(","))
            sql = (
                f"SELECT {cols} FROM messages_fts f JOIN messages m ON m.id = f.rowid "
                "JOIN sessions s ON s.id = m.session_id WHERE messages_fts MATCH ?"
            )
            params: list[Any] = [terms]
            if owner is not None:
                sql += " AND s.owner = ?"
                params.append(owner)
            sql += " ORDER BY rank LIMIT ?"
            params.append(limit)
            return [_message(r) for r in conn.execute(sql, params)]

        return self._writer.submit(q)

    # -- runs ------------------------------------------------------------------------------

    def get_run(self, id: str) -> Deferred[Run | None]:
        def q(conn: sqlite3.Connection) -> Run | None:
            row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (id,)).fetchone()
            return _run(row) if row else None

        return self._writer.submit(q)

    def update_run(self, id: str, **fields: Any) -> Deferred[None]:
        if "tools_used" in fields:
            fields["tools_used"] = json.dumps(list(fields["tools_used"]))
        assignments = ", ".join(f"{k} = ?" for k in fields)

        def q(conn: sqlite3.Connection) -> None:
            conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*fields.values(), id))

        return self._writer.submit(q)

    def finish_run(self, run: Run, reply: str | None, now: float) -> Deferred[None]:
        """Store the assistant reply (if any) and the run's final row in one transaction."""

        def q(conn: sqlite3.Connection) -> None:
            if reply is not None:
                conn.execute(
                    _INSERT_MESSAGE_IF_SESSION,
                    (run.session_id, "assistant", reply, now, run.id, None, 0),
                )
            conn.execute(
                "UPDATE runs SET status=?, response=?, error=?, error_code=?, tokens_in=?, "
                "tokens_out=?, cost_cents=?, tools_used=?, started_at=?, finished_at=? "
                "WHERE id = ?",
                (
                    run.status,
                    run.response,
                    run.error,
                    run.error_code,
                    run.tokens_in,
                    run.tokens_out,
                    run.cost_cents,
                    json.dumps(list(run.tools_used)),
                    run.started_at,
                    run.finished_at,
                    run.id,
                ),
            )

        return self._writer.submit(q)

    def fail_unfinished_runs(
        self, status: str, error: str, code: str, now: float
    ) -> Deferred[Interrupted]:
        def q(conn: sqlite3.Connection) -> Interrupted:
            runs = conn.execute(
                "SELECT id, session_id, owner FROM runs WHERE status NOT IN (?,?,?) ORDER BY rowid",
                FINAL_RUN_STATES,
            ).fetchall()
            approvals = conn.execute(
                "SELECT id, run_id, session_id, owner FROM approvals WHERE status = 'pending' "
                "ORDER BY rowid"
            ).fetchall()
            conn.execute(
                "UPDATE runs SET status = ?, error = ?, error_code = ?, finished_at = ? "
                "WHERE status NOT IN (?,?,?)",
                (status, error, code, now, *FINAL_RUN_STATES),
            )
            conn.execute(
                "UPDATE approvals SET status = 'expired', resolved_at = ?, reason = ? "
                "WHERE status = 'pending'",
                (now, "the gateway stopped before a decision"),
            )
            return Interrupted(
                tuple((str(r), str(s), str(o)) for r, s, o in runs),
                tuple((str(a), str(r), str(s), str(o)) for a, r, s, o in approvals),
            )

        return self._writer.submit(q)

    # -- meta ------------------------------------------------------------------------------

    def get_meta(self, key: str) -> Deferred[str | None]:
        def q(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return str(row[0]) if row else None

        return self._writer.submit(q)

    def set_meta(self, key: str, value: str) -> Deferred[None]:
        def q(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        return self._writer.submit(q)

    # -- approvals -------------------------------------------------------------------------

    def create_approval(self, approval: dict[str, Any]) -> Deferred[None]:
        def q(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO approvals (id, run_id, session_id, owner, tool, input, status, "
                "created_at) VALUES (?,?,?,?,?,?,?,?)",
                (
                    approval["id"],
                    approval["run_id"],
                    approval["session_id"],
                    approval["owner"],
                    approval["tool"],
                    json.dumps(approval["input"]),
                    approval["status"],
                    approval["created_at"],
                ),
            )

        return self._writer.submit(q)

    def resolve_approval(
        self, id: str, status: str, reason: str | None, by: str | None, now: float
    ) -> Deferred[bool]:
        """Move a pending approval to ``status``; False when it was not pending."""

        def q(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "UPDATE approvals SET status = ?, reason = ?, resolved_by = ?, "
                    "resolved_at = ? WHERE id = ? AND status = 'pending'",
                    (status, reason, by, now, id),
                ).rowcount
                > 0
            )

        return self._writer.submit(q)

    def get_approval(self, id: str) -> Deferred[dict[str, Any] | None]:
        def q(conn: sqlite3.Connection) -> dict[str, Any] | None:
            rows = _approval_rows(conn, "WHERE id = ?", (id,))
            return rows[0] if rows else None

        return self._writer.submit(q)

    def list_approvals(
        self, status: str | None, owner: str | None, limit: int = 200
    ) -> Deferred[list[dict[str, Any]]]:
        where, params = [], []
        if status:
            where.append("status = ?")
            params.append(status)
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        clause = ("WHERE " + " AND ".join(where)) if where else ""

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return _approval_rows(
                conn, clause + " ORDER BY created_at DESC LIMIT ?", (*params, limit)
            )

        return self._writer.submit(q)

    # -- spend -----------------------------------------------------------------------------

    def add_spend(self, day: str, cents: float) -> Deferred[float]:
        def q(conn: sqlite3.Connection) -> float:
            conn.execute(
                "INSERT INTO spend (day, cents) VALUES (?, ?) "
                "ON CONFLICT(day) DO UPDATE SET cents = cents + excluded.cents",
                (day, cents),
            )
            return float(
                conn.execute("SELECT cents FROM spend WHERE day = ?", (day,)).fetchone()[0]
            )

        return self._writer.submit(q)

    def get_spend(self, day: str) -> Deferred[float]:
        def q(conn: sqlite3.Connection) -> float:
            row = conn.execute("SELECT cents FROM spend WHERE day = ?", (day,)).fetchone()
            return float(row[0]) if row else 0.0

        return self._writer.submit(q)

    # -- tokens and devices (gatewayd.ops.tokens, gatewayd.ops.devices) -----------------------

    def insert_token(
        self, token: dict[str, Any], device: dict[str, Any] | None = None
    ) -> Deferred[None]:
        """Store a token row (its SHA-256 only) and, in the same transaction, its device."""

        def q(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                tuple(token[c] for c in _TOKEN_FIELDS),
            )
            if device is not None:
                conn.execute(
                    "INSERT INTO devices (id, name, role, token_id, created_at, paired_from) "
                    "VALUES (?,?,?,?,?,?)",
                    tuple(device[c] for c in _DEVICE_FIELDS),
                )

        return self._writer.submit(q)

    def list_tokens(self) -> Deferred[list[dict[str, Any]]]:
        """Tokens not revoked, newest first (expired ones too: they say when they expired)."""

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE revoked_at IS NULL "
                "ORDER BY created_at DESC, rowid DESC"
            )
            return [dict(zip(_TOKEN_FIELDS, r, strict=True)) for r in rows]

        return self._writer.submit(q)

    def live_tokens(self, now: float) -> Deferred[list[dict[str, Any]]]:
        """Tokens neither revoked nor expired, with their hashes (for the registry)."""

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (now,),
            )
            return [dict(zip(_TOKEN_FIELDS, r, strict=True)) for r in rows]

        return self._writer.submit(q)

    def revoke_token(self, token_id: str, now: float) -> Deferred[dict[str, Any] | None]:
        """Mark a live token (and a device paired with it) revoked; None when not live."""

        def q(conn: sqlite3.Connection) -> dict[str, Any] | None:
            n = conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, token_id),
            ).rowcount
            if not n:
                return None
            row = conn.execute(
                "SELECT id FROM devices WHERE token_id = ? AND revoked_at IS NULL", (token_id,)
            ).fetchone()
            if row is not None:
                conn.execute("UPDATE devices SET revoked_at = ? WHERE id = ?", (now, row[0]))
            return {"token_id": token_id, "device_id": row[0] if row else None}

        return self._writer.submit(q)

    def list_devices(self) -> Deferred[list[dict[str, Any]]]:
        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE revoked_at IS NULL "
                "ORDER BY created_at DESC, rowid DESC"
            )
            return [dict(zip(_DEVICE_FIELDS, r, strict=True)) for r in rows]

        return self._writer.submit(q)

    def revoke_device(self, device_id: str, now: float) -> Deferred[dict[str, Any] | None]:
        """Mark a live device and its token revoked; its row, or None when not live."""

        def q(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id = ? AND revoked_at IS NULL",
                (device_id,),
            ).fetchone()
            if row is None:
                return None
            device = dict(zip(_DEVICE_FIELDS, row, strict=True))
            conn.execute("UPDATE devices SET revoked_at = ? WHERE id = ?", (now, device_id))
            conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, device["token_id"]),
            )
            return device

        return self._writer.submit(q)

    # -- activity (gatewayd.ops.activity) ---------------------------------------------------

    def recent_events(self, before_id: int, limit: int) -> Deferred[list[str]]:
        """Stored event envelopes (JSON text) with ids below ``before_id``, newest first."""

        def q(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT body FROM events WHERE id < ? ORDER BY id DESC LIMIT ?",
                (before_id, limit),
            )
            return [str(r[0]) for r in rows]

        return self._writer.submit(q)

    def kept_events(self, limit: int) -> Deferred[list[tuple[Any, ...]]]:
        """(id, ts, type, session_id, run_id, owner, body) of the newest ``limit`` stored
        events, oldest first: the replay buffer a new process starts with."""

        def q(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            rows = conn.execute(
                "SELECT id, ts, type, session_id, run_id, owner, body FROM events "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
            rows.reverse()
            return rows

        return self._writer.submit(q)

    def recent_audit(self, limit: int) -> Deferred[list[tuple[Any, ...]]]:
        """(id, ts, actor, action, target, detail) of the newest audit entries."""

        def q(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return list(
                conn.execute(
                    "SELECT id, ts, actor, action, target, detail FROM audit "
                    "ORDER BY id DESC LIMIT ?",
                    (limit,),
                )
            )

        return self._writer.submit(q)


def _approval_rows(
    conn: sqlite3.Connection, clause: str, params: tuple[Any, ...]
) -> list[dict[str, Any]]:
    out = []
    for row in conn.execute(
        "SELECT id, run_id, session_id, owner, tool, input, status, created_at, resolved_at, "
        f"reason FROM approvals {clause}",
        params,
    ):
        aid, run_id, sid, owner, tool, inp, status, created, resolved, reason = row
        out.append(
            {
                "id": aid,
                "run_id": run_id,
                "session_id": sid,
                "owner": owner,
                "tool": tool,
                "input": json.loads(inp),
                "status": status,
                "created_at": created,
                "resolved_at": resolved,
                "reason": reason,
            }
        )
    return out
