"""Unit tests of the core pieces: config, tokens, the event bus and the store's schema guard."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from gatewayd.auth import Principal, TokenRegistry, hash_token
from gatewayd.config import ConfigError, body_limit_for, parse_config
from gatewayd.events import EventBus, make_filter
from gatewayd.store import StoreError
from gatewayd.store.schema import MIGRATIONS
from gatewayd.store.sqlite import SQLiteStore


def test_interpolation_and_defaults() -> None:
    c = parse_config('[agent]\napi_key = "pre-${KEY}-post"\n', {"KEY": "v"})
    assert c.agent.api_key == "pre-v-post"
    assert c.agent.provider == "echo" and c.agent.effective_model == "echo-1"
    assert c.gateway.listen == ("tcp:18789:interface=127.0.0.1",)
    assert c.agent.max_queue_per_session == 16


@pytest.mark.parametrize(
    "text, message",
    [
        ("[gateway]\nbody_limit_bytes = true\n", "gateway.body_limit_bytes: expected an integer"),
        ("[gateway]\nbody_limit_bytes = -1\n", "gateway.body_limit_bytes: must be positive"),
        ('[gateway]\nallowed_origins = "x"\n', "gateway.allowed_origins: expected a list"),
        (
            '[gateway]\ntrusted_proxies = ["nope"]\n',
            "gateway.trusted_proxies: 'nope' is not a CIDR",
        ),
        ('[agent.tools.bash]\npolicy = "maybe"\n', "agent.tools.bash.policy: must be one of"),
        ("[nope]\n", "nope: unknown key"),
        (
            '[[gateway.api_keys]]\nkey = "0123456789abcdef0"\nrole = "root"\n',
            "gateway.api_keys[0].role: must be one of",
        ),
        ('x = "${UNSET_FOR_TEST}"\n', "x: environment variable UNSET_FOR_TEST is not set"),
        ('[events]\nurl = "redis://127.0.0.1:6379"\n', "events.url: only the in-process bus"),
        ('[agent]\nbase_url = "ftp://models.example"\n', "agent.base_url: must be an http://"),
        ('[agent]\nbase_url = "localhost:8000/v1"\n', "agent.base_url: must be an http://"),
        ('[agent]\nbase_url = "http://x:99999/v1"\n', "agent.base_url: has an invalid port"),
        ('[agent]\nbase_url = "http://mödel.example/v1"\n', "agent.base_url: must name its host"),
        (
            '[bridges.slack]\nbot_token = "x"\nsigning_secret = "y"\napi_base = "slack.com"\n',
            "bridges.slack.api_base: must be an http",
        ),
        (
            '[bridges.webhook]\nurl = "hooks.example/in"\nsecret = "whsec_AAAA"\n',
            "bridges.webhook.url: must be an http",
        ),
    ],
)
def test_config_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, {})
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_body_limits_longest_prefix_wins() -> None:
    g = parse_config('[gateway.body_limits]\n"/api/chat" = 10\n', {}).gateway
    assert body_limit_for(g, "/api/chat") == 10
    assert body_limit_for(g, "/api/chats") == 10
    assert body_limit_for(g, "/api/status") == 65536
    assert body_limit_for(g, "/v1/chat/completions") == 4194304
    assert body_limit_for(g, "/hooks/x") == 1048576


def _config_parses_or_says_why(text: str) -> None:
    try:
        parse_config(text, {})
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)


def test_config_parser_never_crashes() -> None:
    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def check(text: str) -> None:
        _config_parses_or_says_why(text)

    check()


def test_tokens_by_hash_with_expiry_and_tickets() -> None:
    clock = Clock()
    reg = TokenRegistry(clock)
    p = reg.add_static("static-token-0123456789", "operator", "ops")
    assert reg.authenticate("static-token-0123456789") == p
    assert reg.authenticate(b"static-token-0123456789") == p
    assert reg.authenticate("static-token-012345678") is None
    assert reg.authenticate(b"\xff\xfe") is None
    assert reg.authenticate("") is None
    stored = Principal("tok_1", "chat", "c", "api", expires_at=10.0)
    reg.add_stored(hash_token("stored-token-abcdefghij"), stored)
    assert reg.authenticate("stored-token-abcdefghij") == stored
    clock.advance(10)
    assert reg.authenticate("stored-token-abcdefghij") is None
    revoked: list[str] = []
    reg.on_revoke(revoked.append)
    ticket, expires = reg.issue_ticket(p)
    assert expires == clock.seconds() + 60
    assert reg.redeem_ticket(ticket) == p
    assert reg.redeem_ticket(ticket) is None  # single use
    ticket, _ = reg.issue_ticket(p)
    clock.advance(61)
    assert reg.redeem_ticket(ticket) is None
    reg.replace_static([])
    assert revoked == [p.token_id]
    assert reg.authenticate("static-token-0123456789") is None


def test_new_ids_are_unique_random_and_fresh_after_fork() -> None:
    import os
    import re

    from gatewayd.auth import new_id

    ids = [new_id("run") for _ in range(3000)]  # several 4 KiB blocks of randomness
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"run_[0-9a-f]{16}", i) for i in ids)
    new_id("x")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, new_id("x").encode())
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    assert child != new_id("x")  # the child did not reuse the parent's next bytes


def test_roles_and_scopes() -> None:
    chat = Principal("c", "chat")
    viewer = Principal("v", "viewer")
    admin = Principal("a", "admin")
    assert chat.can("own") and chat.can("chat") and not chat.can("read")
    assert viewer.can("own") and viewer.can("read") and not viewer.can("chat")
    assert all(admin.can(s) for s in ("read", "chat", "operate", "admin", "own"))
    assert chat.owns("c") and not chat.owns("x") and viewer.owns("x")


def test_bus_replay_filters_and_reset() -> None:
    bus = EventBus(Clock(), None, buffer_size=5)
    for i in range(8):
        bus.publish("session_created", session_id=f"s{i % 2}", owner="o")
    assert bus.last_id == 8
    assert [e.id for e in bus.replay(5) or []] == [6, 7, 8]
    assert bus.replay(3) == [e for e in bus.replay(3) or []]  # 4..8 still kept
    assert bus.replay(2) is None  # 3 fell out of the buffer
    assert bus.replay(9) is None  # newer than any
    assert bus.replay(8) == []
    flt = make_filter("session_created", session_id="s1")
    assert [e.id for e in bus.replay(4, flt) or []] == [6, 8]
    seen: list[int] = []
    sub = bus.subscribe(lambda e: seen.append(e.id), make_filter(["run_started"]))
    bus.publish("session_created")
    bus.publish("run_started", owner="o")
    sub.cancel()
    bus.publish("run_started")
    assert seen == [10]


async def open_bus(path: str, buffer_size: int = 10000) -> tuple[SQLiteStore, EventBus]:
    """A started SQLite store at ``path`` and a started bus on it (a gateway's start, in small)."""
    from twisted.internet import reactor

    store = SQLiteStore(reactor, path)
    await store.start()
    bus = EventBus(reactor, store, buffer_size=buffer_size)
    await bus.start()
    return store, bus


@pytest_twisted.ensureDeferred
async def test_event_ids_never_go_backwards_across_restarts(tmp_path: Any) -> None:
    path = str(tmp_path / "db.sqlite3")
    store, bus = await open_bus(path)
    last = [bus.publish("session_created").id for _ in range(3)][-1]
    await bus.flush()
    await store.stop()
    store, bus2 = await open_bus(path)
    new = bus2.publish("session_created", owner="o", title="t")
    assert new.id > last
    # an id saved before the restart still means something: what came after it is replayed
    assert bus2.replay(last) == [new]
    [second, third] = bus2.replay(last - 2)[:2]  # type: ignore[index]
    assert (second.id, third.id) == (last - 1, last)
    await bus2.flush()
    await store.stop()
    store, bus3 = await open_bus(path, buffer_size=2)
    # a smaller buffer keeps the newest events; an id older than those is unknown: reset
    assert [e.id for e in bus3.replay(last)] == [new.id]  # type: ignore[union-attr]
    assert bus3.replay(last - 2) is None
    [kept] = [e for e in bus3.replay(last) or [] if e.id == new.id]
    assert kept.owner == "o" and kept.envelope() == new.envelope()
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_store_refuses_a_newer_schema(tmp_path: Any) -> None:
    from twisted.internet import reactor

    path = str(tmp_path / "db.sqlite3")
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    store = SQLiteStore(reactor, path)
    with pytest.raises(StoreError, match="newer than this gatewayd"):
        await store.start()


@pytest_twisted.ensureDeferred
async def test_store_is_wal_and_migrated(tmp_path: Any) -> None:
    from twisted.internet import reactor

    path = str(tmp_path / "db.sqlite3")
    store = SQLiteStore(reactor, path)
    await store.start()
    mode = await store.run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    version = await store.run(lambda c: c.execute("PRAGMA user_version").fetchone()[0])
    assert mode == "wal" and version == len(MIGRATIONS)

    # one failing call in a batch does not undo the others
    def boom(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta VALUES ('a', '1')")
        raise RuntimeError("boom")

    d1 = store.set_meta("b", "2")
    d2 = store.run(boom)
    d3 = store.get_meta("b")
    await d1
    with pytest.raises(RuntimeError):
        await d2
    assert await d3 == "2"
    assert await store.get_meta("a") is None
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_first_schema_store_migrates_and_counts_each_message_once(tmp_path: Any) -> None:
    """Schema 2 counts messages in a trigger; a store written by schema 1 keeps its counts."""
    from twisted.internet import reactor

    from gatewayd.store.records import Run, Session

    path = str(tmp_path / "db.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("BEGIN;" + MIGRATIONS[0] + ";PRAGMA user_version=1;COMMIT;")
    conn.execute("INSERT INTO sessions VALUES ('ses_old', 'tok', '', 1.0, 2.0, 2, '', '')")
    for i, role in enumerate(("user", "assistant")):
        conn.execute(
            "INSERT INTO messages (session_id, role, content, created_at) VALUES (?,?,?,?)",
            ("ses_old", role, f"old {i}", 1.0 + i),
        )
    conn.close()
    store = SQLiteStore(reactor, path)
    await store.start()
    try:
        assert await store.run(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == 2
        await store.add_message("ses_old", "user", "new", 5.0)
        old = await store.get_session("ses_old")
        assert old is not None and (old.message_count, old.last_activity) == (3, 5.0)
        assert [m.content for m in await store.history("ses_old")] == ["old 0", "old 1", "new"]
        # a run's user message and its reply: two, and none for a session deleted meanwhile
        for sid in ("ses_new", "ses_gone"):
            run = Run(id=f"run_{sid}", session_id=sid, owner="tok", status="queued", created_at=6.0)
            session = Session(sid, "tok", "", 6.0, 6.0, 0, "", "")
            await store.begin_run(run, "hi", 6.0, create_session=session)
        await store.delete_session("ses_gone")
        for sid in ("ses_new", "ses_gone"):
            run = Run(
                id=f"run_{sid}", session_id=sid, owner="tok", status="completed", created_at=6.0
            )
            await store.finish_run(run, "hi", 7.0)
        new = await store.get_session("ses_new")
        assert new is not None and (new.message_count, new.last_activity) == (2, 7.0)
        assert [m.role for m in await store.history("ses_new")] == ["user", "assistant"]
        assert await store.get_session("ses_gone") is None
        assert await store.history("ses_gone") == []
        assert (await store.get_run("run_ses_gone")).status == "completed"  # type: ignore[union-attr]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_batch_runs_without_savepoints_until_a_call_fails(tmp_path: Any) -> None:
    """The writer runs a batch back to back, and only after a failure again with a
    SAVEPOINT per call: the failing call's writes go, everyone else's stay."""
    import threading

    from twisted.internet import reactor

    store = SQLiteStore(reactor, str(tmp_path / "db.sqlite3"))
    await store.start()
    statements: list[str] = []
    await store.run(lambda c: c.set_trace_callback(statements.append))
    entered, held, calls = threading.Event(), threading.Event(), {"ok": 0, "boom": 0}

    def hold(conn: sqlite3.Connection) -> None:
        entered.set()
        held.wait(10)

    def ok(conn: sqlite3.Connection, key: str) -> str:
        calls["ok"] += 1
        conn.execute("INSERT INTO meta VALUES (?, 'v')", (key,))
        return key

    def boom(conn: sqlite3.Connection) -> None:
        calls["boom"] += 1
        conn.execute("INSERT INTO meta VALUES ('gone', 'v')")
        raise RuntimeError("boom")

    async def batch(*fns: Any) -> list[Any]:
        """Run ``fns`` as one batch: queued while the writer is held by another call."""
        entered.clear()
        held.clear()
        first = store.run(hold)
        assert entered.wait(10)
        ds = [store.run(*fn) for fn in fns]
        held.set()
        await first
        out = []
        for d in ds:
            try:
                out.append(await d)
            except RuntimeError as e:
                out.append(e)
        return out

    # all well: one transaction, no savepoint
    del statements[:]
    assert await batch((ok, "a"), (ok, "b")) == ["a", "b"]
    assert not [s for s in statements if "SAVEPOINT" in s]
    assert calls == {"ok": 2, "boom": 0}

    # one failure: the batch runs again isolated, and only that call's writes are undone
    got = await batch((ok, "c"), (boom,), (ok, "d"))
    assert got[0] == "c" and got[2] == "d" and isinstance(got[1], RuntimeError)
    assert calls == {"ok": 2 + 3, "boom": 2}  # "c" ran twice, "d" only isolated
    assert [await store.get_meta(k) for k in ("a", "b", "c", "d", "gone")] == [
        "v",
        "v",
        "v",
        "v",
        None,
    ]

    # a call alone is not run twice
    calls["boom"] = 0
    assert isinstance((await batch((boom,)))[0], RuntimeError)
    assert calls["boom"] == 1
    await store.run(lambda c: c.set_trace_callback(None))
    await store.stop()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"message": "\\ud800"}',
        b'{"\\udfff": 1}',
        b'["\\uDBFF"]',
        b"\xff",
        b'{"a":',
        b"[" * 100000,
    ],
)
def test_strict_json_refuses_what_cannot_round_trip(raw: bytes) -> None:
    from gatewayd import jsontext

    with pytest.raises(jsontext.InvalidJSON):
        jsontext.loads(raw)


def test_strict_json_keeps_surrogate_pairs() -> None:
    from gatewayd import jsontext

    assert jsontext.loads(b'{"m": "\\ud83d\\ude00"}') == {"m": "\U0001f600"}


def test_a_store_this_build_lacks_is_refused_by_name(tmp_path: Any) -> None:
    from gatewayd.app import store_path

    config = parse_config('[store]\nurl = "postgresql://127.0.0.1/test"\n', {})
    with pytest.raises(ConfigError) as e:
        store_path(config, str(tmp_path))
    assert str(e.value).startswith("store.url: unsupported store 'postgresql'")


@pytest_twisted.ensureDeferred
async def test_a_damaged_stored_event_is_skipped_not_fatal(tmp_path: Any) -> None:
    path = str(tmp_path / "db.sqlite3")
    store, bus = await open_bus(path)
    first, second = bus.publish("session_created"), bus.publish("session_created")
    await bus.flush()
    await store.run(
        lambda c: c.execute("UPDATE events SET body = 'not json' WHERE id = ?", (first.id,))
    )
    await store.stop()
    store, bus2 = await open_bus(path)
    assert [e.id for e in bus2.replay(second.id - 1) or []] == [second.id]
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_stored_events_come_back_byte_for_byte(tmp_path: Any) -> None:
    """Events are stored in one statement (a JSON array): nothing is lost in the packing."""
    path = str(tmp_path / "db.sqlite3")
    store, bus = await open_bus(path)
    tricky = 'h\u00e9llo "q" \\ \u2028 \U0001f600 \x00 </script>'
    published = [
        bus.publish("run_complete", session_id="ses_1", run_id="run_1", owner="t", response=tricky),
        bus.publish("session_created"),
        bus.publish("budget_warning", spent_cents=1.25e-7, limit_cents=10**20),
    ]
    await bus.flush()
    await store.stop()
    store, again = await open_bus(path)
    back = again.replay(published[0].id - 1) or []
    assert [e.encoded() for e in back] == [e.encoded() for e in published]
    assert [(e.type, e.ts, e.payload, e.owner) for e in back] == [
        (e.type, e.ts, e.payload, e.owner) for e in published
    ]
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_checkpoints_run_on_their_own_thread(tmp_path: Any) -> None:
    """The writer leaves the WAL to the checkpoint thread (up to MAX_FRAMES pages), which
    copies it into the database file while the writer goes on; stopping loses nothing."""
    import os

    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from gatewayd.store.checkpoint import MAX_FRAMES

    path = str(tmp_path / "db.sqlite3")
    store = SQLiteStore(reactor, path)
    store.checkpointer.interval = 0.02
    await store.start()
    assert await store.run(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == (
        MAX_FRAMES
    )
    for i in range(50):
        await store.create_session(f"ses_{i}", "tok", "x" * 2000, 1.0)
        await store.add_message(f"ses_{i}", "user", "y" * 4000, 2.0)
    written = await store.run(lambda c: c.execute("SELECT max(id) FROM messages").fetchone()[0])
    assert written == 50
    # the thread copies the whole log while the writer does nothing about it
    for _ in range(500):
        last = store.checkpointer.last
        if last is not None and last[0] > 100 and last[1] == last[0]:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert last is not None and last[0] > 100 and last[1] == last[0]
    first, second = store.stop(), store.stop()  # a second stop waits for the same end
    await first
    await second
    assert not os.path.exists(path + "-wal")  # the last connection folded it in
    await SQLiteStore(reactor, path).stop()  # never started: nothing to wait for
    store = SQLiteStore(reactor, path)
    await store.start()
    assert len(await store.history("ses_49")) == 1
    await store.stop()
