"""A single SQLite writer thread that batches work into one transaction per wake-up.

Every call is a function of a ``sqlite3.Connection`` with no other effect (it may run twice,
see :meth:`WriterThread._run_batch`); calls queue in arrival order, so a read that follows a
write sees it.  The thread drains whatever is queued and runs it in one transaction, where
one call's failure never undoes the others, and commits once, which is what lets many
concurrent chats persist every message without a commit apiece.  Results go
back to the reactor thread with ``callFromThread``; the reactor never waits on SQLite.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")
_log = Logger()
_STOP = object()
_MAX_BATCH = 256


def _fire_all(results: list[tuple[Deferred[Any], Any]]) -> None:
    for d, result in results:
        d.callback(result)


class WriterThread:
    def __init__(
        self, reactor: Any, path: str, setup: Callable[[sqlite3.Connection], None]
    ) -> None:
        self._reactor = reactor
        self._path = path
        self._setup = setup
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> Deferred[None]:
        ready: Deferred[None] = Deferred()
        self._thread = threading.Thread(
            target=self._main, args=(ready,), name="gatewayd-sqlite", daemon=True
        )
        self._thread.start()
        return ready

    def submit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self._queue.put((fn, args, d))
        return d

    def stop(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._thread is None:
            d.callback(None)
            return d
        self._queue.put((_STOP, (), d))
        self._thread = None
        return d

    def _deliver(self, d: Deferred[Any], result: Any) -> None:
        self._reactor.callFromThread(d.callback, result)

    def _main(self, ready: Deferred[None]) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            self._setup(conn)
        except Exception:
            self._deliver(ready, Failure())
            return
        self._deliver(ready, None)
        while True:
            batch = [self._queue.get()]
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = [item for item in batch if item[0] is _STOP]
            work = [item for item in batch if item[0] is not _STOP]
            if work:
                self._run_batch(conn, work)
            if stop:
                # anything queued after the stop still gets an answer
                leftovers = []
                while True:
                    try:
                        leftovers.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                rest = [item for item in leftovers if item[0] is not _STOP]
                if rest:
                    self._run_batch(conn, rest)
                conn.close()
                for _, _, d in stop:
                    self._deliver(d, None)
                return

    def _run_batch(self, conn: sqlite3.Connection, work: list[Any]) -> None:
        """Run ``work`` in one transaction and hand every result back in one wake-up.

        The calls first run back to back.  Only when one of them raises is the transaction
        rolled back and the batch run again with a SAVEPOINT around each call, so that the
        failure is that call's alone.  Savepoints on every call would cost more than the
        calls: each one makes the full-text index flush its pending terms.  A call may
        therefore run twice, and must have no effect outside the connection.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [(d, fn(conn, *args)) for fn, args, d in work]
            conn.execute("COMMIT")
        except BaseException:
            failure = Failure()
            _rollback(conn)
            if len(work) == 1:
                results = [(work[0][2], failure)]
            else:
                results = self._run_isolated(conn, work)
        # one wake-up of the reactor for the whole batch, not one per call
        self._reactor.callFromThread(_fire_all, results)

    def _run_isolated(
        self, conn: sqlite3.Connection, work: list[Any]
    ) -> list[tuple[Deferred[Any], Any]]:
        """The batch again, each call in its own SAVEPOINT: one failure never undoes the others."""
        results: list[tuple[Deferred[Any], Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, args, d in work:
                conn.execute("SAVEPOINT call")
                try:
                    result = fn(conn, *args)
                except BaseException:
                    conn.execute("ROLLBACK TO call")
                    conn.execute("RELEASE call")
                    results.append((d, Failure()))
                else:
                    conn.execute("RELEASE call")
                    results.append((d, result))
            conn.execute("COMMIT")
        except Exception:
            failure = Failure()
            _rollback(conn)
            _log.failure("store transaction failed", failure)
            results = [(d, failure) for _, _, d in work]
        return results


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
