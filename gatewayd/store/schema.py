"""Versioned schema migrations; ``PRAGMA user_version`` records how far a database has come."""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: the whole first schema
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL, last_activity REAL NOT NULL,
        message_count INTEGER NOT NULL DEFAULT 0,
        agent_id TEXT NOT NULL DEFAULT '', channel TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX sessions_activity ON sessions(last_activity);
    CREATE INDEX sessions_owner ON sessions(owner, last_activity);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        role TEXT NOT NULL, content TEXT NOT NULL, created_at REAL NOT NULL,
        run_id TEXT, tool TEXT, is_error INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX messages_session ON messages(session_id, id);
    CREATE VIRTUAL TABLE messages_fts USING fts5(
        content, content='messages', content_rowid='id'
    );
    CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content)
            VALUES ('delete', old.id, old.content);
    END;
    CREATE TABLE runs (
        id TEXT PRIMARY KEY, session_id TEXT NOT NULL, owner TEXT NOT NULL,
        status TEXT NOT NULL, created_at REAL NOT NULL, source TEXT NOT NULL DEFAULT 'api',
        response TEXT, error TEXT, error_code TEXT,
        tokens_in INTEGER NOT NULL DEFAULT 0, tokens_out INTEGER NOT NULL DEFAULT 0,
        cost_cents REAL NOT NULL DEFAULT 0, tools_used TEXT NOT NULL DEFAULT '[]',
        started_at REAL, finished_at REAL, channel TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX runs_status ON runs(status);
    CREATE INDEX runs_created ON runs(created_at);
    CREATE INDEX runs_session ON runs(session_id);
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, role TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL DEFAULT 'api',
        created_at REAL NOT NULL, expires_at REAL, revoked_at REAL, created_by TEXT
    );
    CREATE TABLE devices (
        id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', role TEXT NOT NULL,
        token_id TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL, paired_from TEXT
    );
    CREATE TABLE approvals (
        id TEXT PRIMARY KEY, run_id TEXT NOT NULL, session_id TEXT NOT NULL,
        owner TEXT NOT NULL DEFAULT '', tool TEXT NOT NULL, input TEXT NOT NULL,
        status TEXT NOT NULL, created_at REAL NOT NULL, resolved_at REAL, reason TEXT,
        resolved_by TEXT
    );
    CREATE INDEX approvals_status ON approvals(status);
    CREATE TABLE cron_jobs (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, schedule TEXT NOT NULL, payload TEXT NOT NULL,
        channel TEXT NOT NULL DEFAULT '', enabled INTEGER NOT NULL DEFAULT 1,
        catch_up TEXT NOT NULL DEFAULT 'once', created_at REAL NOT NULL,
        next_run_at REAL, last_run_at REAL, last_status TEXT, origin TEXT NOT NULL DEFAULT 'api',
        owner TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE cron_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, run_id TEXT,
        started_at REAL NOT NULL, finished_at REAL, status TEXT NOT NULL, excerpt TEXT
    );
    CREATE INDEX cron_runs_job ON cron_runs(job_id, id);
    CREATE TABLE deliveries (
        hook TEXT NOT NULL, delivery_id TEXT NOT NULL, received_at REAL NOT NULL,
        run_id TEXT, PRIMARY KEY (hook, delivery_id)
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL,
        action TEXT NOT NULL, target TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY, ts REAL NOT NULL, type TEXT NOT NULL,
        session_id TEXT, run_id TEXT, owner TEXT, body TEXT NOT NULL
    );
    CREATE TABLE dead_letters (
        id TEXT PRIMARY KEY, target TEXT NOT NULL, body TEXT NOT NULL, attempts INTEGER NOT NULL,
        last_error TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL
    );
    CREATE TABLE spend (day TEXT PRIMARY KEY, cents REAL NOT NULL DEFAULT 0);
    """,
    # 2: a message keeps its session's count and activity in the same step (one statement
    # per message for the writer, not two: each costs it a wait for the GIL)
    """
    CREATE TRIGGER messages_count AFTER INSERT ON messages BEGIN
        UPDATE sessions SET message_count = message_count + 1,
            last_activity = max(last_activity, new.created_at)
        WHERE id = new.session_id;
    END;
    """,
)
