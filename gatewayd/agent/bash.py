"""The ``bash`` tool: one shell command in its own process group, bounded in time and output.

``spawnProcess`` cannot ``setsid`` (DESIGN trap 13), so the command starts through
``setsid`` (or, where that is missing, a two-line Python wrapper): the shell becomes a session
and process-group leader whose pgid is its pid, and every kill is ``os.killpg`` on that group.
Without this, ``bash -c 'sleep 100 &'`` leaves a grandchild holding the pipes open, the
timeout kills only the shell, and ``processEnded`` never fires.

The child gets a minimal environment (PATH, HOME = the workspace, LANG): the gateway's own
environment holds API keys, and a command the model wrote must not be able to print them.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.agent.base import ToolContext, ToolResult
from gatewayd.agent.tools import OUTPUT_CAP, ToolInputError, error_result, require_str

_log = Logger()

DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 3600.0
#: between SIGTERM and SIGKILL on timeout; also how long to wait for pipes after a SIGKILL
KILL_GRACE_S = 2.0
SHELL = "/bin/bash"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_PY_SETSID = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"


def session_argv(argv: list[str]) -> tuple[str, list[str]]:
    """(executable, args) that run ``argv`` as the leader of a new session and process group.

    util-linux ``setsid`` only forks when it already leads a group, which a freshly spawned
    child never does, so the pid Twisted reports is the group's id either way.
    """
    setsid = shutil.which("setsid", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if setsid:
        return setsid, [setsid, *argv]
    return sys.executable, [sys.executable, "-c", _PY_SETSID, *argv]


def _with_note(text: str, note: str) -> str:
    if text and not text.endswith("\n"):
        text += "\n"
    return f"{text}[{note}]"


class BashProcess(ProcessProtocol):
    """One running command: collects output, enforces the cap and the deadline, kills its group.

    ``result`` fires with the :class:`ToolResult` (or CancelledError when the caller cancelled);
    ``ended`` fires (with None) once the process is reaped and its pipes are closed, whatever
    happened — tests wait on it, and it is when every timer has been cancelled.
    """

    def __init__(self, reactor: Any, cap: int, timeout_s: float, grace_s: float) -> None:
        self.reactor = reactor
        self.cap = cap
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.pid: int | None = None
        self.result: Deferred[ToolResult] = Deferred(lambda _d: self.cancel())
        self.ended: Deferred[None] = Deferred()
        self._chunks: list[bytes] = []
        self._size = 0
        self._exited = False
        self._done = False
        self._truncated = False
        self._timed_out = False
        self._cancelled = False
        self._timers: list[IDelayedCall] = []

    # -- process protocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]
        self._later(self.timeout_s, self._on_timeout)

    def outReceived(self, data: bytes) -> None:
        self._received(data)

    def errReceived(self, data: bytes) -> None:
        self._received(data)

    def processExited(self, reason: Failure) -> None:
        # The shell is gone; anything it left in its group (``cmd &``) would hold our pipes
        # open until the deadline.  The group id stays reserved while members remain.
        self._exited = True
        self._killpg(signal.SIGKILL)
        # What escaped the group (its own setsid) is beyond killpg; do not let it hold the
        # result hostage until the deadline — stop reading after the grace.
        self._later(self.grace_s, self._force_close)

    def processEnded(self, reason: Failure) -> None:
        self._done = True
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if not self.result.called:
            self.result.callback(self._build_result(reason))
        self.ended.callback(None)

    # -- control ------------------------------------------------------------------------------

    def cancel(self) -> None:
        """The run was aborted: SIGKILL the group; ``result`` errbacks with CancelledError."""
        if self._done:
            return
        self._cancelled = True
        self._kill_hard()

    def _received(self, data: bytes) -> None:
        if self._truncated or self._cancelled:
            return
        room = self.cap - self._size
        if len(data) > room:
            self._chunks.append(data[:room])
            self._size = self.cap
            self._truncated = True
            self._kill_hard()
            return
        self._chunks.append(data)
        self._size += len(data)

    def _on_timeout(self) -> None:
        self._timed_out = True
        self._killpg(signal.SIGTERM)
        self._later(self.grace_s, self._kill_hard)

    def _kill_hard(self) -> None:
        self._killpg(signal.SIGKILL)
        # Something that left the group (its own setsid) may still hold the pipes: after the
        # grace, close our ends so processEnded fires regardless.
        self._later(self.grace_s, self._force_close)

    def _force_close(self) -> None:
        if not self._done and self.transport is not None:
            self.transport.loseConnection()

    def _killpg(self, sig: int) -> None:
        if self.pid is None or self._done:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            # No such group: either it is empty (nothing to do) or the child has not reached
            # setsid yet — then it is still unreaped and its pid is safe to signal directly.
            if not self._exited:
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass
        except PermissionError:
            _log.warn("cannot signal process group {pgid}", pgid=self.pid)

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        if self._done:
            return
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self.reactor.callLater(delay, fn))

    def _build_result(self, reason: Failure) -> ToolResult:
        text = b"".join(self._chunks).decode("utf-8", errors="replace")
        if self._truncated:
            return error_result(
                _with_note(text, f"output truncated at {self.cap} bytes; process group killed")
            )
        if self._timed_out:
            return error_result(
                _with_note(text, f"timed out after {self.timeout_s:g} s; process group killed")
            )
        value = reason.value
        if isinstance(value, ProcessDone):
            return ToolResult(content=text)
        if isinstance(value, ProcessTerminated):
            if value.signal is not None:
                return error_result(_with_note(text, f"killed by signal {value.signal}"))
            return error_result(_with_note(text, f"exit code {value.exitCode}"))
        return error_result(_with_note(text, "process ended abnormally"))


class BashTool:
    """``bash {command, timeout_s?}``: run a shell command in the workspace."""

    name = "bash"
    description = (
        "Run a bash command in the workspace directory and return its combined stdout and "
        "stderr (capped at 64 KiB). Default timeout 60 s, at most 3600 s. The environment is "
        "minimal (PATH, HOME, LANG) and background processes are killed when the command ends."
    )
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "command": {"type": "string", "description": "The command, run with bash -c"},
            "timeout_s": {
                "type": "number",
                "description": "Seconds before the command is killed (default 60, max 3600)",
                "exclusiveMinimum": 0,
                "maximum": MAX_TIMEOUT_S,
            },
        },
        "required": ["command"],
        "additionalProperties": False,
    }
    default_policy = "ask"

    def __init__(
        self,
        *,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
        max_timeout_s: float = MAX_TIMEOUT_S,
        cap: int = OUTPUT_CAP,
        grace_s: float = KILL_GRACE_S,
        path_env: str | None = None,
        on_spawn: Callable[[BashProcess], None] | None = None,
    ) -> None:
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        self.cap = cap
        self.grace_s = grace_s
        self.path_env = path_env
        #: called with each started process (tests use its ``pid`` and ``ended``)
        self.on_spawn = on_spawn

    def environment(self, workspace: str) -> dict[str, str]:
        """Only what a shell needs; nothing from the gateway's environment but PATH."""
        return {
            "PATH": self.path_env or os.environ.get("PATH") or DEFAULT_PATH,
            "HOME": workspace,
            "LANG": "C.UTF-8",
        }

    def _timeout(self, input: dict[str, Any]) -> float:
        raw = input.get("timeout_s")
        if raw is None:
            return self.default_timeout_s
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ToolInputError("argument 'timeout_s' must be a number of seconds")
        if not 0 < raw <= self.max_timeout_s:  # also refuses NaN
            raise ToolInputError(f"argument 'timeout_s' must be > 0 and <= {self.max_timeout_s:g}")
        return float(raw)

    def run(self, input: dict[str, Any], ctx: ToolContext) -> Deferred[ToolResult]:
        try:
            command = require_str(input, "command")
            if "\x00" in command:
                raise ToolInputError("argument 'command' must not contain NUL bytes")
            timeout_s = self._timeout(input)
        except ToolInputError as exc:
            return succeed(error_result(str(exc)))
        if not os.path.isdir(ctx.workspace):
            return succeed(error_result("the workspace directory does not exist"))
        proto = BashProcess(ctx.reactor, self.cap, timeout_s, self.grace_s)
        executable, args = session_argv([SHELL, "-c", command])
        try:
            ctx.reactor.spawnProcess(
                proto,
                executable,
                args,
                env=self.environment(ctx.workspace),
                path=ctx.workspace,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except (OSError, ValueError) as exc:
            # e.g. a NUL byte in the command; say what, not where
            return succeed(error_result(f"could not start bash: {type(exc).__name__}"))
        if self.on_spawn is not None:
            self.on_spawn(proto)
        return proto.result
