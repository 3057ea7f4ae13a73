"""Logs: JSON lines in ``<state-dir>/gatewayd.log``, and ``GET /api/daemon/logs`` (SSE).

``twistd -n`` already prints readable text on standard output; this module adds the
machine-readable file (one JSON object per line, rotated by size: ``gateway.log_max_bytes``,
five kept).  Secrets must never reach it: known secret values (API keys, webhook and bridge
secrets from the config) are replaced by ``***`` in every string field before an event is
written — a safety net behind the rule that no code logs a token in the first place (the
access log already redacts ``?token=``).

Following the log needs no polling: the file observer writes through a tee that hands each
new line to the open ``/api/daemon/logs`` streams as it is written.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import IPushProducer
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.python.threadable import isInIOThread
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from gatewayd.errors import GatewayError, invalid
from gatewayd.events import make_filter
from gatewayd.web.common import authenticate, dumps, query_args, render_error

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()

LOG_NAME = "gatewayd.log"
KEPT_FILES = 5
DEFAULT_LINES = 100
MAX_LINES = 10000
#: a follower whose unsent output passes this is disconnected (it cannot keep up)
MAX_BACKLOG_BYTES = 1024 * 1024
#: secrets shorter than this are not scrubbed (they would mangle ordinary words)
MIN_SECRET_LEN = 8
_TAIL_BLOCK = 64 * 1024
#: how the JSON observer writes ``LogLevel.info`` (it reads back as the constant)
_INFO = json.loads(eventAsJSON({"log_level": LogLevel.info}))["log_level"]
_TAIL_MAX_BYTES = 16 * 1024 * 1024


# -- the file -------------------------------------------------------------------------------


class _Tee:
    """The file-like object the JSON observer writes to: the log file, then the followers.

    Events may be logged from other threads (the store's writer thread); followers write to
    sockets, so their lines are handed to the reactor thread first.
    """

    def __init__(self, logfile: LogFile, reactor: Any) -> None:
        self.logfile = logfile
        self.followers: list[Callable[[str], None]] = []
        self._reactor = reactor
        self._busy = False

    def write(self, text: str) -> None:
        self.logfile.write(text)
        if not self.followers:
            return
        if not isInIOThread() and self._reactor is not None:
            self._reactor.callFromThread(self._notify, text)
        else:
            self._notify(text)

    def _notify(self, text: str) -> None:
        if self._busy:
            return  # a follower that logs while it writes must not loop
        self._busy = True
        try:
            line = text.rstrip("\n")
            for follower in list(self.followers):
                try:
                    follower(line)
                except Exception:  # an observer that raises gets disabled by Twisted
                    pass
        finally:
            self._busy = False

    def flush(self) -> None:
        self.logfile.flush()


@implementer(ILogObserver)
class _Redacting:
    """Replaces known secret values in an event's string fields before passing it on."""

    def __init__(self, observer: ILogObserver) -> None:
        self._observer = observer
        self.pattern: re.Pattern[str] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        pattern = self.pattern
        if pattern is not None:
            changed: dict[str, Any] | None = None
            for key, value in event.items():
                if isinstance(value, str) and pattern.search(value):
                    if changed is None:
                        changed = dict(event)
                    changed[key] = pattern.sub("***", value)
            if changed is not None:
                event = changed
        self._observer(event)


def secrets_pattern(values: Iterable[str]) -> re.Pattern[str] | None:
    """One alternation of every secret (longest first), or None when there is none."""
    found = sorted({v for v in values if len(v) >= MIN_SECRET_LEN}, key=len, reverse=True)
    if not found:
        return None
    return re.compile("|".join(re.escape(v) for v in found))


class FileLog:
    """``<directory>/gatewayd.log``: JSON lines from the global log publisher, size-rotated."""

    def __init__(
        self,
        directory: str,
        max_bytes: int,
        *,
        reactor: Any = None,
        level: LogLevel = LogLevel.info,
    ) -> None:
        self.directory = directory
        self._reactor = reactor
        self.path = os.path.join(directory, LOG_NAME)
        self._max_bytes = max_bytes
        self._level = level
        self._logfile: LogFile | None = None
        self._tee: _Tee | None = None
        self._redacting: _Redacting | None = None
        self._observer: ILogObserver | None = None
        self._pattern: re.Pattern[str] | None = None

    def start(self) -> None:
        if self._observer is not None:
            return
        self._logfile = LogFile(
            LOG_NAME,
            self.directory,
            rotateLength=self._max_bytes,
            maxRotatedFiles=KEPT_FILES,
            defaultMode=0o600,
        )
        self._tee = _Tee(self._logfile, self._reactor)
        self._redacting = _Redacting(
            jsonFileLogObserver(cast(IO[Any], self._tee), recordSeparator="")
        )
        self._redacting.pattern = self._pattern
        self._observer = FilteringLogObserver(
            self._redacting, [LogLevelFilterPredicate(defaultLogLevel=self._level)]
        )
        globalLogPublisher.addObserver(self._observer)

    def write_event(self, namespace: str, format: str, fields: dict[str, Any]) -> bool:
        """Write one info event straight to the file and its followers, as the observer would.

        For events at request rate (the access log): the log publisher would format each
        one for every observer.  ``fields`` hold JSON values; the string ones are scrubbed of
        secrets like every other line.  False when the file is closed or info is filtered.
        """
        tee = self._tee
        if tee is None or self._level > LogLevel.info:
            return False
        event = dict(fields)
        pattern = self._pattern
        if pattern is not None:
            for key, value in fields.items():
                if isinstance(value, str):
                    event[key] = pattern.sub("***", value)
        event["log_namespace"] = namespace
        event["log_level"] = _INFO
        event["log_format"] = format
        event["log_time"] = time.time()
        tee.write(json.dumps(event) + "\n")
        return True

    def stop(self) -> None:
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._observer = None
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None
        self._tee = None

    @property
    def running(self) -> bool:
        return self._observer is not None

    def set_secrets(self, values: Iterable[str]) -> None:
        """The values to scrub from now on (config load and every config change)."""
        self._pattern = secrets_pattern(values)
        if self._redacting is not None:
            self._redacting.pattern = self._pattern

    def set_max_bytes(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        if self._logfile is not None:
            self._logfile.rotateLength = max_bytes

    def follow(self, follower: Callable[[str], None]) -> Callable[[], None]:
        """Call ``follower(line)`` for each new line; returns the function that stops it."""
        tee = self._tee
        if tee is None:
            return lambda: None
        tee.followers.append(follower)

        def stop() -> None:
            if follower in tee.followers:
                tee.followers.remove(follower)

        return stop

    def tail(self, lines: int) -> list[str]:
        """The last ``lines`` lines (the newest rotated file makes up a short current one)."""
        out = tail_lines(self.path, lines)
        if len(out) < lines:
            out = tail_lines(self.path + ".1", lines - len(out)) + out
        return out


def tail_lines(path: str, count: int) -> list[str]:
    """The last ``count`` complete lines of a file, read backwards in blocks."""
    if count <= 0:
        return []
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError:
        return []
    with f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        pos, data = end, b""
        while pos > 0 and data.count(b"\n") <= count and end - pos < _TAIL_MAX_BYTES:
            step = min(_TAIL_BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.split(b"\n")
    if pos > 0:
        lines = lines[1:]  # the first piece is the end of an earlier line
    text = [ln.decode("utf-8", "replace").lstrip("\x1e") for ln in lines if ln.strip()]
    return text[-count:]


# -- GET /api/daemon/logs ---------------------------------------------------------------------


@implementer(IPushProducer)
class _LogStream:
    """One following client: the tail, ``tail_end``, then each new line; keep-alives."""

    def __init__(self, gw: Gateway, request: IRequest, file_log: FileLog) -> None:
        self._gw = gw
        self._request = request
        self._file_log = file_log
        self.closed = False
        self._paused = False
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        self._unfollow: Callable[[], None] = lambda: None
        self._keepalive: Any = None
        self._subscription: Any = None
        self.handle: Any = None
        request.notifyFinish().addBoth(self._gone)  # type: ignore[attr-defined]

    def start(self, lines: int, follow: bool) -> None:
        request = self._request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        tail = self._file_log.tail(lines)
        frames = [b"retry: 3000\n\n"]
        frames.extend(_frame("log", line) for line in tail)
        frames.append(_frame("tail_end", dumps({"lines": len(tail)}).decode()))
        self._write(b"".join(frames))
        if not follow:
            self.close("done")
            return
        request.registerProducer(self, True)  # type: ignore[attr-defined]
        self._unfollow = self._file_log.follow(self._line)
        self._subscription = self._gw.bus.subscribe(
            lambda event: self.close("the gateway is shutting down"), make_filter(["shutdown"])
        )
        self._schedule_keepalive()

    def _line(self, line: str) -> None:
        self._write(_frame("log", line))

    def _schedule_keepalive(self) -> None:
        self._keepalive = self._gw.clock.callLater(
            self._gw.config.gateway.sse_keepalive_s, self._keep_alive
        )

    def _keep_alive(self) -> None:
        self._keepalive = None
        if not self.closed:
            self._write(b": keep-alive\n\n")
            self._schedule_keepalive()

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        if self._paused:
            self._backlog.append(data)
            self._backlog_bytes += len(data)
            if self._backlog_bytes > MAX_BACKLOG_BYTES:
                self._drop()
            return
        self._request.write(data)

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        backlog, self._backlog, self._backlog_bytes = self._backlog, [], 0
        if backlog:
            self._write(b"".join(backlog))

    def stopProducing(self) -> None:
        self._end()

    def close(self, reason: str = "closed") -> None:
        """End the stream cleanly (shutdown, a revoked token, or the tail alone was asked)."""
        if self.closed:
            return
        self._end()
        request = self._request
        if not getattr(request, "_disconnected", False) and not getattr(request, "finished", 0):
            request.finish()

    def _drop(self) -> None:
        self._end()
        channel = getattr(self._request, "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _gone(self, result: Failure | None) -> None:
        self._end()

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._unfollow()
        self._backlog, self._backlog_bytes = [], 0
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None
        if getattr(self._request, "producer", None) is self:
            self._request.unregisterProducer()
        if self.handle is not None:
            self.handle.release()


def _frame(event: str, data: str) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), data.encode("utf-8", "replace"))


def parse_lines(value: str | None) -> int:
    if value is None or value == "":
        return DEFAULT_LINES
    if not re.fullmatch(r"\d{1,6}", value):
        raise invalid("lines: expected an integer")
    lines = int(value)
    if not 0 <= lines <= MAX_LINES:
        raise invalid(f"lines: must be between 0 and {MAX_LINES}")
    return lines


class DaemonLogsResource(Resource):
    """``GET /api/daemon/logs?lines=N[&follow=0]`` (admin): SSE ``log`` events, each one
    JSON line of ``gatewayd.log``; the last N lines, ``tail_end {lines}``, then new lines
    as they are written (``follow=0`` ends the stream after the tail)."""

    isLeaf = True

    def __init__(self, gw: Gateway) -> None:
        super().__init__()
        self._gw = gw

    def render(self, request: IRequest) -> bytes | int:
        if request.method != b"GET":
            return render_error(
                request,
                GatewayError(
                    "method_not_allowed", "this path serves GET only", data={"allow": "GET"}
                ),
            )
        gw = self._gw
        try:
            principal = authenticate(gw, request, streaming=True)
            if principal is None:
                raise GatewayError("unauthorized", "a valid bearer token is required")
            if not principal.can("admin"):
                raise GatewayError("forbidden", "the daemon log needs the admin scope")
            args = query_args(request)
            lines = parse_lines(args.get("lines"))
            follow = args.get("follow", "1").lower() not in ("0", "false", "no")
            file_log = gw.file_log
            if file_log is None or not file_log.running:
                raise GatewayError("unavailable", "this gateway writes no log file")
            stream = _LogStream(gw, request, file_log)
            if follow:
                stream.handle = gw.streams.open(principal, "sse", stream.close)
        except GatewayError as e:
            return render_error(request, e)
        stream.start(lines, follow)
        return NOT_DONE_YET


def read_json_lines(path: str) -> list[dict[str, Any]]:
    """Every event of a JSON-lines log file (tests and tools)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip().lstrip("\x1e")
            if line:
                out.append(json.loads(line))
    return out
