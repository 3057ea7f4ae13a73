"""WAL checkpoints on a thread of their own, so the writer rarely stalls on one.

SQLite copies its write-ahead log back into the database in a *checkpoint*.  By default the
commit that takes the log past 1,000 pages runs one, fsyncs included, on the writer's own
connection: under a steady load of chats, one commit in a hundred took 8 ms or more (up to
0.7 s), and every chat waiting on the writer waited with it.  Instead:

- this thread runs a PASSIVE checkpoint every ``interval`` seconds on its own connection; it
  copies what the log holds and syncs the database without ever blocking the writer (nothing
  is less durable: the same pages are written and synced, by another thread);
- SQLite starts the log over only once a checkpoint has copied all of it with no commit in
  between, which a writer that never pauses does not allow, so the writer keeps its own
  automatic checkpoint, at ``MAX_FRAMES`` pages instead of 1,000.  By then this thread has
  copied nearly everything: the writer's checkpoint copies the rest, and the log restarts.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

_log = Logger()
#: the writer checkpoints itself past this many pages (64 MiB of 4 KiB pages), under a load
#: that never lets this thread copy the whole log
MAX_FRAMES = 16_384


class Checkpointer:
    def __init__(self, reactor: Any, path: str, *, interval: float = 1.0) -> None:
        self._reactor = reactor
        self._path = path
        self.interval = interval
        self._conn: sqlite3.Connection | None = None
        self._stopping = threading.Event()
        self._stopped: Deferred[None] | None = None
        #: the last round's (pages in the log, pages copied), once there was one
        self.last: tuple[int, int] | None = None

    def open(self) -> None:
        """Connect (in the caller's thread: it is quick, and a failure is the caller's)."""
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        self._conn = conn

    def start(self) -> None:
        """Checkpoint every ``interval`` seconds until :meth:`stop`."""
        if self._conn is None:
            self.open()
        self._stopped = Deferred()
        threading.Thread(target=self._main, name="gatewayd-checkpoint", daemon=True).start()

    def checkpoint(self) -> tuple[int, int]:
        """One round: (pages in the log, pages copied).  Runs on any one thread at a time."""
        assert self._conn is not None
        _, log, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.last = (int(log), int(copied))
        return self.last

    def stop(self) -> Deferred[None]:
        """Fires once the thread is done (a checkpoint under way finishes first)."""
        self._stopping.set()
        done: Deferred[None] = Deferred()
        if self._stopped is None:  # never started
            self._close()
            done.callback(None)
        else:  # each caller gets a Deferred of its own
            self._stopped.addBoth(_fire, done)
        return done

    def _main(self) -> None:
        failing = False
        try:
            while not self._stopping.wait(self.interval):
                try:
                    self.checkpoint()
                except sqlite3.Error:
                    # a full or failing disk: the next round tries again, and the log waits;
                    # said once, not every second
                    if not failing:
                        _log.failure("WAL checkpoints are failing; retrying every round")
                    failing = True
                else:
                    if failing:
                        _log.info("WAL checkpoints work again")
                    failing = False
        finally:
            self._close()
            if self._stopped is not None:
                self._reactor.callFromThread(self._stopped.callback, None)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _fire(result: None, done: Deferred[None]) -> None:
    done.callback(None)
    return result
