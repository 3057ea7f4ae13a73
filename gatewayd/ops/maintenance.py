"""Keeping a gateway: online backups of the store, readiness, and a graceful stop."""

from __future__ import annotations

import datetime
import os
import sqlite3
import threading
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.errors import GatewayError
from gatewayd.ops import Call, operation

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()
BACKUP_DIR = "backups"
READY_TIMEOUT_S = 2.0


# -- backups ------------------------------------------------------------------------------------


def _snapshot(source: str, dest: str) -> int:
    """Copy ``source`` into ``dest`` in one read transaction (a consistent WAL snapshot)."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst, pages=-1)
        finally:
            dst.close()
    finally:
        src.close()
    return os.path.getsize(dest)


def _in_thread(reactor: Any, fn: Any, *args: Any) -> Deferred[Any]:
    """Run ``fn`` in a short-lived thread of its own; the result comes back on the reactor.

    Not on the store's writer thread: that thread holds a write transaction open while it
    runs a call, and SQLite's backup from inside it never gets its read lock (it retries
    forever).  A separate read connection sees a consistent snapshot and blocks no writer.
    """
    d: Deferred[Any] = Deferred()

    def work() -> None:
        try:
            result: Any = fn(*args)
        except BaseException:
            result = Failure()
        reactor.callFromThread(d.errback if isinstance(result, Failure) else d.callback, result)

    threading.Thread(target=work, name="gatewayd-backup", daemon=True).start()
    return d


def backup_path(state_dir: str, now: float) -> str:
    directory = os.path.join(state_dir, BACKUP_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(directory, f"gatewayd-{stamp}.sqlite3")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(directory, f"gatewayd-{stamp}-{n}.sqlite3")
    return path


@operation(
    "backup",
    "admin",
    status=201,
    summary="An online, consistent snapshot of the store into the state dir",
)
async def backup(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    source = getattr(gw.store, "path", None)
    if not source:
        raise GatewayError("conflict", "backups are taken of the SQLite store only")
    # every write queued before this request is committed before the snapshot
    await gw.store.run(lambda conn: None)
    dest = backup_path(gw.state_dir, gw.clock.seconds())
    try:
        size = await _in_thread(gw.reactor, _snapshot, source, dest)
    except (OSError, sqlite3.Error) as e:
        _log.error("backup failed: {error}", error=str(e))
        try:
            os.unlink(dest)
        except OSError:
            pass
        raise GatewayError("unavailable", "the backup could not be written") from None
    gw.audit(call.principal, "backup", dest, bytes=size)
    _log.info("backup written to {path} ({size} bytes)", path=dest, size=size)
    return {"path": dest, "bytes": size}


# -- readiness ----------------------------------------------------------------------------------


async def readiness(gw: Gateway) -> dict[str, str]:
    """Each check's state: ``ok``, or what is wrong (store, event bus, provider)."""
    checks: dict[str, str] = {}
    try:
        d = gw.store.run(lambda conn: conn.execute("SELECT 1").fetchone())
        d.addTimeout(READY_TIMEOUT_S, gw.clock)
        await d
        checks["store"] = "ok"
    except Exception as e:
        checks["store"] = "timed out" if type(e).__name__ == "TimeoutError" else "failing"
    bus_ok = getattr(gw.bus, "healthy", True)
    checks["events"] = "ok" if (bus_ok() if callable(bus_ok) else bus_ok) else "disconnected"
    checks["provider"] = await _provider_check(gw)
    if gw.shutting_down:
        checks["gateway"] = "shutting down"
    return checks


async def _provider_check(gw: Gateway) -> str:
    """The provider's own ``check()`` (echo: at once; HTTP providers: one cheap GET)."""
    check = getattr(gw.provider, "check", None)
    if check is None:
        return "ok"
    try:
        d = check()
        if isinstance(d, Deferred):
            d.addTimeout(READY_TIMEOUT_S, gw.clock)
            await d
    except Exception:
        return "unreachable"
    return "ok"


# -- stopping -----------------------------------------------------------------------------------


def request_shutdown(gw: Gateway, principal: Any = None, reason: str = "requested") -> None:
    """Stop the process gracefully, as SIGTERM does (``/admin/shutdown``).

    The ``shutdown`` event goes out at once; the stop itself starts on the next reactor turn,
    so the caller's answer is written first.  Raises 503 when this gateway cannot stop its
    process (an in-process gateway in tests has no ``stop_process``).
    """
    stop = gw.stop_process
    if stop is None:
        raise GatewayError("unavailable", "this gateway cannot stop its own process")
    gw.audit(principal, "shutdown", reason)
    _log.info("shutdown requested: {reason}", reason=reason)
    gw.announce_shutdown()
    gw.reactor.callLater(0, stop)
