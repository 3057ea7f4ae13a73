"""The agent's tools: a registry, the file tools, and the workspace they are confined to.

Every tool answers with a :class:`ToolResult`; bad input, a path outside the workspace or a
failed system call is an error *result* the provider can read and react to, never an exception
out of ``run()`` — a model that guesses a wrong path should get a message, not kill its run.

The file tools do their I/O inline on the reactor thread: reads are capped at 64 KiB, listings
at 64 KiB of names, and writes carry content that is already in memory, so a call costs about as
much as parsing the provider's JSON did.  Doing it inline also keeps the tools usable with a
``Clock`` in tests (no thread pool needed).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Collection, Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.agent.base import Tool, ToolContext, ToolResult, ToolSpec

_log = Logger()

#: The cap on what any tool hands back to the provider (CONTRACT §14).
OUTPUT_CAP = 64 * 1024
POLICIES = ("allow", "ask", "deny")


class ToolInputError(ValueError):
    """The provider sent arguments the tool cannot use; becomes an error result."""


class PathEscape(ValueError):
    """A path that leaves the workspace; becomes an error result."""


# -- the workspace ------------------------------------------------------------------------------


def resolve_workspace(configured: str, state_dir: str) -> str:
    """Pick the directory the tools may touch, refusing ones that would expose the whole machine.

    Empty means ``<state_dir>/workspace``; a relative path is taken relative to ``state_dir`` (a
    daemon's working directory says nothing useful).  The result is absolute, symlink-free and
    exists (created mode 0700 when missing).  ``/`` and the user's home directory are refused:
    the tools would then read SSH keys and the gateway's own secrets.
    """
    raw = configured.strip() if configured else ""
    if raw:
        candidate = os.path.expanduser(raw)
        if not os.path.isabs(candidate):
            candidate = os.path.join(state_dir, candidate)
    else:
        candidate = os.path.join(state_dir, "workspace")
    real = os.path.realpath(candidate)
    if real == os.path.realpath(os.sep):
        raise ValueError("agent.workspace must not be the root directory '/'")
    home = os.path.expanduser("~")
    if home and home != "~" and real == os.path.realpath(home):
        raise ValueError("agent.workspace must not be the home directory; use a subdirectory")
    if os.path.lexists(real) and not os.path.isdir(real):
        raise ValueError(f"agent.workspace {real} exists and is not a directory")
    os.makedirs(real, mode=0o700, exist_ok=True)
    return real


def _within(root: str, path: str) -> bool:
    return path == root or os.path.commonpath([root, path]) == root


def confine(workspace: str, path: str) -> str:
    """Map a tool's ``path`` to a real path inside ``workspace``, or raise :class:`PathEscape`.

    Relative paths are relative to the workspace; absolute ones must already lie inside it.
    The answer is ``realpath``-ed, so ``..`` and symlinks (of the target or of any parent) that
    lead outside are refused, and the caller acts on the resolved path, not on the link.
    """
    if not isinstance(path, str) or not path:
        raise ToolInputError("path must be a non-empty string")
    if "\x00" in path:
        raise ToolInputError("path must not contain NUL bytes")
    root = os.path.realpath(workspace)
    candidate = path if os.path.isabs(path) else os.path.join(root, path)
    real = os.path.realpath(candidate)
    if not _within(root, real):
        raise PathEscape(f"path escapes the workspace: {path}")
    return real


# -- input helpers ------------------------------------------------------------------------------


def require_str(input: Mapping[str, Any], key: str, *, allow_empty: bool = False) -> str:
    """The string argument ``key``, or :class:`ToolInputError` naming what was wrong."""
    if not isinstance(input, Mapping):
        raise ToolInputError("tool input must be a JSON object")
    if key not in input or input[key] is None:
        raise ToolInputError(f"missing required argument {key!r}")
    value = input[key]
    if not isinstance(value, str):
        raise ToolInputError(f"argument {key!r} must be a string")
    if not value and not allow_empty:
        raise ToolInputError(f"argument {key!r} must not be empty")
    return value


def error_result(message: str) -> ToolResult:
    return ToolResult(content=message, is_error=True)


def _os_error(what: str, path: str, exc: OSError) -> ToolResult:
    # strerror only: str(exc) would carry the absolute path, i.e. where the workspace lives
    reason = exc.strerror or type(exc).__name__
    return error_result(f"{what} {path}: {reason}")


def _guarded(
    name: str, body: Callable[[], ToolResult], path_for_errors: Callable[[], str]
) -> Deferred[ToolResult]:
    """Run a synchronous tool body, turning every expected failure into an error result."""
    try:
        return succeed(body())
    except (ToolInputError, PathEscape) as exc:
        return succeed(error_result(str(exc)))
    except OSError as exc:
        return succeed(_os_error(f"{name} failed for", path_for_errors(), exc))
    except Exception:
        _log.failure("tool {tool} failed unexpectedly", tool=name)
        return succeed(error_result(f"{name} failed unexpectedly"))


# -- file tools ---------------------------------------------------------------------------------


class ReadFileTool:
    """Read a text file from the workspace (UTF-8, undecodable bytes replaced, 64 KiB cap)."""

    name = "read_file"
    description = (
        "Read a text file from the workspace. Paths are relative to the workspace root. "
        "Files larger than 64 KiB are truncated."
    )
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {"path": {"type": "string", "description": "File path in the workspace"}},
        "required": ["path"],
        "additionalProperties": False,
    }
    default_policy = "allow"

    def __init__(self, cap: int = OUTPUT_CAP) -> None:
        self.cap = cap

    def run(self, input: dict[str, Any], ctx: ToolContext) -> Deferred[ToolResult]:
        def body() -> ToolResult:
            path = require_str(input, "path")
            real = confine(ctx.workspace, path)
            # O_NOFOLLOW: a symlink swapped in after confine() is refused, not followed;
            # O_NONBLOCK: a FIFO planted in the workspace cannot hang the reactor on open.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(real, flags)
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    return error_result(f"{path} is a directory; use list_dir")
                if not stat.S_ISREG(st.st_mode):
                    return error_result(f"{path} is not a regular file")
                chunks: list[bytes] = []
                remaining = self.cap + 1
                while remaining > 0:
                    chunk = os.read(fd, min(remaining, 65536))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    remaining -= len(chunk)
            finally:
                os.close(fd)
            data = b"".join(chunks)
            text = data[: self.cap].decode("utf-8", errors="replace")
            if len(data) > self.cap:
                size = max(st.st_size, len(data))
                text += f"\n[truncated: showing the first {self.cap} of {size} bytes]"
            return ToolResult(content=text)

        return _guarded(self.name, body, lambda: str(input.get("path", "")))


class WriteFileTool:
    """Write a text file in the workspace, atomically, creating parent directories."""

    name = "write_file"
    description = (
        "Create or replace a text file in the workspace with the given content. "
        "Parent directories are created as needed. Paths are relative to the workspace root."
    )
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "File path in the workspace"},
            "content": {"type": "string", "description": "The complete new file content"},
        },
        "required": ["path", "content"],
        "additionalProperties": False,
    }
    default_policy = "ask"

    def run(self, input: dict[str, Any], ctx: ToolContext) -> Deferred[ToolResult]:
        def body() -> ToolResult:
            path = require_str(input, "path")
            content = require_str(input, "content", allow_empty=True)
            real = confine(ctx.workspace, path)
            root = os.path.realpath(ctx.workspace)
            if real == root or os.path.isdir(real):
                return error_result(f"{path} is a directory")
            parent = os.path.dirname(real)
            os.makedirs(parent, mode=0o700, exist_ok=True)
            # the parent may have been raced into a symlink between confine() and makedirs()
            if not _within(root, os.path.realpath(parent)):
                raise PathEscape(f"path escapes the workspace: {path}")
            data = content.encode("utf-8", errors="replace")
            try:
                mode = stat.S_IMODE(os.stat(real, follow_symlinks=False).st_mode)
            except FileNotFoundError:
                mode = 0o600
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fchmod(f.fileno(), mode)
                    os.fsync(f.fileno())
                # rename never follows a symlink at the destination: it replaces the name
                os.replace(tmp, real)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            return ToolResult(content=f"wrote {len(data)} bytes to {path}")

        return _guarded(self.name, body, lambda: str(input.get("path", "")))


class ListDirTool:
    """List a workspace directory: sorted names, a trailing ``/`` on directories."""

    name = "list_dir"
    description = (
        "List the entries of a directory in the workspace (default: the workspace root). "
        "Directories end with '/'."
    )
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Directory path; default '.'"},
        },
        "additionalProperties": False,
    }
    default_policy = "allow"

    def __init__(self, cap: int = OUTPUT_CAP) -> None:
        self.cap = cap

    def run(self, input: dict[str, Any], ctx: ToolContext) -> Deferred[ToolResult]:
        def body() -> ToolResult:
            if not isinstance(input, Mapping):
                raise ToolInputError("tool input must be a JSON object")
            path = input.get("path")
            if path is None or path == "":
                path = "."
            if not isinstance(path, str):
                raise ToolInputError("argument 'path' must be a string")
            real = confine(ctx.workspace, path)
            if not os.path.isdir(real):
                return error_result(f"{path} is not a directory")
            names: list[str] = []
            with os.scandir(real) as it:
                for entry in it:
                    # not following links: a link to a directory outside shows as a plain name
                    is_dir = entry.is_dir(follow_symlinks=False)
                    names.append(entry.name + "/" if is_dir else entry.name)
            names.sort()
            if not names:
                return ToolResult(content="(empty directory)")
            text = "\n".join(names)
            if len(text.encode("utf-8", errors="replace")) > self.cap:
                cut = text.encode("utf-8", errors="replace")[: self.cap]
                shown = cut.decode("utf-8", errors="ignore").rsplit("\n", 1)[0]
                note = f"truncated: {len(names)} entries, listing capped at {self.cap} bytes"
                text = f"{shown}\n[{note}]"
            return ToolResult(content=text)

        return _guarded(self.name, body, lambda: str(input.get("path", ".")))


# -- registry -----------------------------------------------------------------------------------


class ToolRegistry:
    """The tools on offer, in registration order; the run loop only ever looks them up here."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._all_specs: tuple[ToolSpec, ...] | None = None

    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        if tool.default_policy not in POLICIES:
            raise ValueError(f"tool {tool.name!r} has an invalid default policy")
        self._tools[tool.name] = tool
        self._all_specs = None

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def specs(self, allowed: Collection[str] | None = None) -> tuple[ToolSpec, ...]:
        """What to tell the provider; ``allowed`` (e.g. an agent's tool list) narrows it."""
        if allowed is None:  # every run asks: built once
            if self._all_specs is None:
                self._all_specs = self._specs(None)
            return self._all_specs
        return self._specs(allowed)

    def _specs(self, allowed: Collection[str] | None) -> tuple[ToolSpec, ...]:
        return tuple(
            ToolSpec(name=t.name, description=t.description, input_schema=t.input_schema)
            for t in self._tools.values()
            if allowed is None or t.name in allowed
        )

    def policy_for(self, name: str, overrides: Mapping[str, str] | None = None) -> str:
        """``allow`` | ``ask`` | ``deny``: config (``{tool name: policy}``) beats the default.

        An unknown tool is ``deny`` — a provider naming a tool we do not have gets refused.
        """
        tool = self._tools.get(name)
        if tool is None:
            return "deny"
        if overrides and name in overrides:
            policy = overrides[name].strip().lower()
            if policy not in POLICIES:
                raise ValueError(f"invalid policy for tool {name!r}; use allow, ask or deny")
            return policy
        return tool.default_policy


def run_tool(tool: Tool, input: dict[str, Any], ctx: ToolContext) -> Deferred[ToolResult]:
    """Run any tool so that a bug in it is an error result too; cancellation still propagates."""

    def failed(failure: Failure) -> ToolResult | Failure:
        if isinstance(failure.value, CancelledError):
            return failure
        _log.failure("tool {tool} raised", failure, tool=tool.name)
        return error_result(f"{tool.name} failed unexpectedly")

    d: Deferred[ToolResult] = maybeDeferred(tool.run, input, ctx)
    d.addErrback(failed)
    return d


def default_registry() -> ToolRegistry:
    """The four built-in tools (CONTRACT §14)."""
    # imported here: bash.py builds on this module's helpers
    from gatewayd.agent.bash import BashTool

    registry = ToolRegistry()
    registry.register(BashTool())
    registry.register(ReadFileTool())
    registry.register(WriteFileTool())
    registry.register(ListDirTool())
    return registry
