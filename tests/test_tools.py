"""The agent's tools: real processes for bash, a real temp workspace for the file tools."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import deferLater

from gatewayd.agent.base import Tool, ToolContext, ToolResult
from gatewayd.agent.bash import BashProcess, BashTool, session_argv
from gatewayd.agent.tools import (
    OUTPUT_CAP,
    ListDirTool,
    PathEscape,
    ReadFileTool,
    ToolRegistry,
    WriteFileTool,
    confine,
    default_registry,
    resolve_workspace,
    run_tool,
)

# -- helpers ------------------------------------------------------------------------------------


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture(autouse=True)
def no_leftover_timers() -> Generator[None, None, None]:
    yield
    leftovers = [c for c in _reactor().getDelayedCalls() if c.active()]
    assert not leftovers, f"leftover DelayedCalls: {leftovers}"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return Path(os.path.realpath(ws))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_text("TOP SECRET\n")
    return out


def ctx_for(ws: Path) -> ToolContext:
    return ToolContext(workspace=str(ws), reactor=_reactor())


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name is parenthesised and may hold spaces: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    """Running (a zombie awaiting a reaper that is not ours counts as gone)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                members.append(int(name))
    return members


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Bounded poll on the reactor (no sleeping)."""
    reactor = _reactor()
    waited = 0.0
    while not pred():
        if waited >= timeout:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


class Spawned:
    """Collects what BashTool started so tests can look at pids and wait for the end."""

    def __init__(self) -> None:
        self.procs: list[BashProcess] = []

    def __call__(self, proc: BashProcess) -> None:
        self.procs.append(proc)

    @property
    def last(self) -> BashProcess:
        return self.procs[-1]


def bash_tool(spawned: Spawned | None = None, **kw: Any) -> BashTool:
    return BashTool(on_spawn=spawned, grace_s=kw.pop("grace_s", 0.3), **kw)


async def run_bash(ws: Path, command: str, **kw: Any) -> tuple[ToolResult, BashProcess]:
    spawned = Spawned()
    tool = bash_tool(spawned)
    result = await tool.run({"command": command, **kw}, ctx_for(ws))
    await spawned.last.ended
    return result, spawned.last


async def call(tool: Tool, ws: Path, **input: Any) -> ToolResult:
    return await tool.run(dict(input), ctx_for(ws))


# -- bash ---------------------------------------------------------------------------------------


def test_setsid_available() -> None:
    executable, args = session_argv(["/bin/bash", "-c", "true"])
    assert os.access(executable, os.X_OK)
    assert args[-3:] == ["/bin/bash", "-c", "true"]


@pytest_twisted.ensureDeferred
async def test_bash_echo(workspace: Path) -> None:
    result, proc = await run_bash(workspace, "echo hi")
    assert result == ToolResult(content="hi\n", is_error=False)
    assert proc.pid is not None and not alive(proc.pid)


@pytest_twisted.ensureDeferred
async def test_bash_nonzero_exit_and_stderr(workspace: Path) -> None:
    result, _ = await run_bash(workspace, "echo out; echo err >&2; exit 3")
    assert result.is_error
    assert "out\n" in result.content and "err\n" in result.content
    assert result.content.endswith("[exit code 3]")


@pytest_twisted.ensureDeferred
async def test_bash_runs_in_workspace_with_minimal_env(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAYD_TEST_SECRET", "hunter2-do-not-leak")
    result, _ = await run_bash(workspace, "pwd; env")
    assert not result.is_error
    assert "hunter2-do-not-leak" not in result.content
    assert "GATEWAYD_TEST_SECRET" not in result.content
    lines = result.content.splitlines()
    assert lines[0] == str(workspace)
    assert f"HOME={workspace}" in lines
    names = {line.split("=", 1)[0] for line in lines[1:] if "=" in line}
    # bash adds a few of its own (PWD, SHLVL, _); nothing else from our environment
    assert names <= {"PATH", "HOME", "LANG", "PWD", "SHLVL", "_", "OLDPWD"}


@pytest_twisted.ensureDeferred
async def test_bash_own_process_group_and_stdin_closed(workspace: Path) -> None:
    # `cat` would hang forever if stdin were left open; ps shows our pgid = our pid
    result, proc = await run_bash(workspace, "cat; ps -o pgid= -p $$ | tr -d ' '")
    assert not result.is_error, result.content
    assert result.content.strip() == str(proc.pid)


@pytest_twisted.ensureDeferred
async def test_bash_output_cap_kills_group(workspace: Path) -> None:
    spawned = Spawned()
    tool = bash_tool(spawned)
    result = await tool.run({"command": "yes | cat"}, ctx_for(workspace))
    proc = spawned.last
    await proc.ended
    assert result.is_error
    body, note = result.content.rsplit("\n[", 1)
    assert len(body.encode()) in (OUTPUT_CAP, OUTPUT_CAP - 1)  # a trailing "\n" may be shared
    assert set(body.split("\n")) == {"y"}
    assert "output truncated at 65536 bytes" in note
    assert proc.pid is not None and not alive(proc.pid)
    await wait_until(lambda: not group_members(proc.pid or 0))


@pytest_twisted.ensureDeferred
async def test_bash_timeout_kills_group(workspace: Path) -> None:
    spawned = Spawned()
    tool = bash_tool(spawned)
    result = await tool.run(
        {"command": "echo before; sleep 30", "timeout_s": 0.5}, ctx_for(workspace)
    )
    proc = spawned.last
    await proc.ended
    assert result.is_error
    assert result.content.startswith("before\n")
    assert "timed out after 0.5 s" in result.content
    assert proc.pid is not None and not alive(proc.pid)
    await wait_until(lambda: not group_members(proc.pid or 0))


@pytest_twisted.ensureDeferred
async def test_bash_timeout_escalates_to_sigkill(workspace: Path) -> None:
    # SIGTERM ignored by the shell and its child: the SIGKILL after the grace must follow
    spawned = Spawned()
    tool = bash_tool(spawned, grace_s=0.3)
    d = tool.run({"command": "trap '' TERM; sleep 30; true", "timeout_s": 0.3}, ctx_for(workspace))
    result = await d
    await spawned.last.ended
    assert result.is_error and "timed out" in result.content
    await wait_until(lambda: not group_members(spawned.last.pid or 0))


@pytest_twisted.ensureDeferred
async def test_bash_cancel_kills_child_and_grandchildren(workspace: Path) -> None:
    spawned = Spawned()
    tool = bash_tool(spawned)
    d = tool.run({"command": "sleep 100 & sleep 100 & wait"}, ctx_for(workspace))
    proc = spawned.last
    pgid = proc.pid
    assert pgid is not None
    # the shell and both sleeps, all in the shell's own group
    await wait_until(lambda: len(group_members(pgid)) == 3)
    members = group_members(pgid)
    assert pgid in members
    assert os.getpgid(pgid) == pgid != os.getpgrp()

    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await proc.ended
    await wait_until(lambda: not any(alive(pid) for pid in members))
    assert not group_members(pgid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0) if group_members(pgid) else os.kill(pgid, 0)


@pytest_twisted.ensureDeferred
async def test_bash_background_leftovers_killed_at_exit(workspace: Path) -> None:
    # the shell exits at once; its background sleep would otherwise hold the pipe for 100 s
    result, proc = await run_bash(workspace, "sleep 100 & echo started")
    assert result == ToolResult(content="started\n")
    await wait_until(lambda: not group_members(proc.pid or 0))


@pytest_twisted.ensureDeferred
async def test_bash_escaped_process_does_not_hold_result(workspace: Path) -> None:
    # a process in its own session is out of our group's reach; we stop waiting for its pipes
    result, _ = await run_bash(workspace, "setsid sleep 5 & echo $!")
    escaped = int(result.content.split()[0])
    try:
        assert not result.is_error
    finally:
        os.kill(escaped, 9)


@pytest_twisted.ensureDeferred
async def test_bash_killed_by_signal(workspace: Path) -> None:
    result, _ = await run_bash(workspace, "echo bye; kill -9 $$")
    assert result.is_error
    assert result.content == "bye\n[killed by signal 9]"


@pytest.mark.parametrize(
    "input",
    [
        {},
        {"command": 42},
        {"command": ""},
        {"command": "true", "timeout_s": "5"},
        {"command": "true", "timeout_s": True},
        {"command": "true", "timeout_s": 0},
        {"command": "true", "timeout_s": -1},
        {"command": "true", "timeout_s": 3601},
        {"command": "true", "timeout_s": float("nan")},
        {"command": "echo \x00"},
    ],
)
@pytest_twisted.ensureDeferred
async def test_bash_bad_input_is_error_result(workspace: Path, input: dict[str, Any]) -> None:
    spawned = Spawned()
    result = await bash_tool(spawned).run(input, ctx_for(workspace))
    assert result.is_error
    assert not spawned.procs


@pytest_twisted.ensureDeferred
async def test_bash_timeout_accepted_at_max(workspace: Path) -> None:
    result, _ = await run_bash(workspace, "echo ok", timeout_s=3600)
    assert result.content == "ok\n"


# -- file tools ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_write_read_list_round_trip(workspace: Path) -> None:
    w = await call(WriteFileTool(), workspace, path="a/b/c.txt", content="héllo\nwörld\n")
    assert not w.is_error, w.content
    assert (workspace / "a/b/c.txt").read_text() == "héllo\nwörld\n"
    r = await call(ReadFileTool(), workspace, path="a/b/c.txt")
    assert r == ToolResult(content="héllo\nwörld\n")
    r_abs = await call(ReadFileTool(), workspace, path=str(workspace / "a/b/c.txt"))
    assert r_abs.content == "héllo\nwörld\n"
    (workspace / "z.txt").write_text("")
    (workspace / "B.md").write_text("")
    assert (await call(ListDirTool(), workspace)).content == "B.md\na/\nz.txt"
    assert (await call(ListDirTool(), workspace, path="a/b")).content == "c.txt"
    (workspace / "empty").mkdir()
    assert (await call(ListDirTool(), workspace, path="empty")).content == "(empty directory)"
    # no temp files left behind by the atomic write
    assert os.listdir(workspace / "a/b") == ["c.txt"]


@pytest_twisted.ensureDeferred
async def test_write_replaces_atomically_and_keeps_mode(workspace: Path) -> None:
    target = workspace / "run.sh"
    target.write_text("old")
    target.chmod(0o750)
    res = await call(WriteFileTool(), workspace, path="run.sh", content="new")
    assert not res.is_error
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert (await call(WriteFileTool(), workspace, path="e.txt", content="")).is_error is False
    assert (workspace / "e.txt").read_bytes() == b""


@pytest_twisted.ensureDeferred
async def test_read_truncates_and_replaces_bad_utf8(workspace: Path) -> None:
    (workspace / "big.txt").write_bytes(b"x" * (OUTPUT_CAP + 100))
    r = await call(ReadFileTool(), workspace, path="big.txt")
    assert not r.is_error
    assert r.content.startswith("x" * OUTPUT_CAP + "\n[truncated")
    assert f"{OUTPUT_CAP + 100} bytes" in r.content
    (workspace / "bad.bin").write_bytes(b"ok\xff\xfe!")
    r = await call(ReadFileTool(), workspace, path="bad.bin")
    assert r.content == "ok\ufffd\ufffd!"


@pytest_twisted.ensureDeferred
async def test_list_dir_is_capped(workspace: Path) -> None:
    for i in range(300):
        (workspace / f"f{i:03d}").touch()
    r = await ListDirTool(cap=100).run({"path": "."}, ctx_for(workspace))
    lines = r.content.splitlines()
    assert lines[0] == "f000" and lines[-1].startswith("[truncated: 300 entries")
    assert len(r.content) < 200


@pytest_twisted.ensureDeferred
async def test_read_errors(workspace: Path) -> None:
    (workspace / "d").mkdir()
    os.mkfifo(workspace / "fifo")
    for path in ("missing.txt", "d", "fifo"):
        r = await call(ReadFileTool(), workspace, path=path)
        assert r.is_error, path
        assert str(workspace) not in r.content
    assert (await call(WriteFileTool(), workspace, path="d", content="x")).is_error
    assert (await call(WriteFileTool(), workspace, path=".", content="x")).is_error
    assert (await call(ListDirTool(), workspace, path="missing")).is_error


@pytest_twisted.ensureDeferred
async def test_dotdot_and_absolute_escapes(workspace: Path, outside: Path) -> None:
    rel = os.path.relpath(outside / "secret.txt", workspace)
    assert rel.startswith("..")
    for path in (
        rel,
        "../outside/secret.txt",
        "a/../../outside/secret.txt",
        str(outside / "secret.txt"),
    ):
        r = await call(ReadFileTool(), workspace, path=path)
        assert r.is_error and "escapes the workspace" in r.content, path
        assert "TOP SECRET" not in r.content
    w = await call(WriteFileTool(), workspace, path="../outside/new.txt", content="x")
    assert w.is_error and "escapes the workspace" in w.content
    assert not (outside / "new.txt").exists()
    w = await call(WriteFileTool(), workspace, path=str(outside / "secret.txt"), content="pwned")
    assert w.is_error
    assert (outside / "secret.txt").read_text() == "TOP SECRET\n"
    for path in ("..", "/", str(outside)):
        assert (await call(ListDirTool(), workspace, path=path)).is_error
    # `..` that stays inside is fine
    (workspace / "sub").mkdir()
    (workspace / "f.txt").write_text("in")
    assert (await call(ReadFileTool(), workspace, path="sub/../f.txt")).content == "in"


@pytest_twisted.ensureDeferred
async def test_symlinks_out_of_workspace(workspace: Path, outside: Path) -> None:
    (workspace / "link.txt").symlink_to(outside / "secret.txt")
    (workspace / "dangling.txt").symlink_to(outside / "not-yet.txt")
    (workspace / "dirlink").symlink_to(outside, target_is_directory=True)

    r = await call(ReadFileTool(), workspace, path="link.txt")
    assert r.is_error and "TOP SECRET" not in r.content
    r = await call(ReadFileTool(), workspace, path="dirlink/secret.txt")
    assert r.is_error and "TOP SECRET" not in r.content

    for path in (
        "link.txt",
        "dangling.txt",
        "dirlink/secret.txt",
        "dirlink/new.txt",
        "dirlink/x/y",
    ):
        w = await call(WriteFileTool(), workspace, path=path, content="pwned")
        assert w.is_error and "escapes the workspace" in w.content, path
    assert (outside / "secret.txt").read_text() == "TOP SECRET\n"
    assert sorted(os.listdir(outside)) == ["secret.txt"]

    assert (await call(ListDirTool(), workspace, path="dirlink")).is_error
    # the link itself is listed, but not as a directory
    listing = (await call(ListDirTool(), workspace)).content.splitlines()
    assert "dirlink" in listing and "dirlink/" not in listing


@pytest_twisted.ensureDeferred
async def test_symlink_inside_workspace_is_followed(workspace: Path) -> None:
    (workspace / "real.txt").write_text("one")
    (workspace / "alias.txt").symlink_to("real.txt")
    assert (await call(ReadFileTool(), workspace, path="alias.txt")).content == "one"
    assert not (await call(WriteFileTool(), workspace, path="alias.txt", content="two")).is_error
    assert (workspace / "real.txt").read_text() == "two"
    assert (workspace / "alias.txt").is_symlink()


@pytest.mark.parametrize(
    ("tool", "input"),
    [
        (ReadFileTool(), {}),
        (ReadFileTool(), {"path": 3}),
        (ReadFileTool(), {"path": ""}),
        (ReadFileTool(), {"path": "a\x00b"}),
        (WriteFileTool(), {"path": "x.txt"}),
        (WriteFileTool(), {"path": "x.txt", "content": 5}),
        (WriteFileTool(), {"content": "x"}),
        (ListDirTool(), {"path": ["."]}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_file_tools_bad_input(workspace: Path, tool: Tool, input: dict[str, Any]) -> None:
    r = await tool.run(input, ctx_for(workspace))
    assert r.is_error
    assert not (workspace / "x.txt").exists()


def test_confine(workspace: Path, outside: Path) -> None:
    assert confine(str(workspace), ".") == str(workspace)
    assert confine(str(workspace), "a/b") == str(workspace / "a/b")
    assert confine(str(workspace), str(workspace / "c")) == str(workspace / "c")
    for bad in ("..", "../ws2", "/", str(outside), str(workspace) + "2/x"):
        with pytest.raises(PathEscape):
            confine(str(workspace), bad)


# -- workspace resolution -----------------------------------------------------------------------


def test_resolve_workspace_default(tmp_path: Path) -> None:
    ws = resolve_workspace("", str(tmp_path / "state"))
    assert ws == os.path.realpath(tmp_path / "state" / "workspace")
    assert os.path.isdir(ws)
    assert stat.S_IMODE(os.stat(ws).st_mode) == 0o700


def test_resolve_workspace_configured(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real")
    assert resolve_workspace(str(tmp_path / "via"), "/nonexistent") == os.path.realpath(
        tmp_path / "real"
    )
    made = resolve_workspace(str(tmp_path / "new" / "ws"), "/nonexistent")
    assert os.path.isdir(made) and os.path.isabs(made)
    rel = resolve_workspace("rel", str(tmp_path))
    assert rel == os.path.realpath(tmp_path / "rel")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError):
        resolve_workspace(str(tmp_path / "file"), str(tmp_path))


def test_resolve_workspace_refuses_root_and_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="root"):
        resolve_workspace("/", str(tmp_path))
    with pytest.raises(ValueError, match="root"):
        resolve_workspace("/tmp/..", str(tmp_path))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for configured in (str(home), "~", "~/", str(home) + "/."):
        with pytest.raises(ValueError, match="home"):
            resolve_workspace(configured, str(tmp_path))
    assert resolve_workspace("~/agent", str(tmp_path)) == os.path.realpath(home / "agent")


# -- registry and policy ------------------------------------------------------------------------


class _Boom:
    name = "boom"
    description = "raises"
    input_schema: dict[str, Any] = {"type": "object"}
    default_policy = "allow"

    def run(self, input: dict[str, Any], ctx: ToolContext) -> Deferred[ToolResult]:
        raise RuntimeError("bug")


class _Fixed:
    name = "fixed"
    description = "answers"
    input_schema: dict[str, Any] = {"type": "object"}
    default_policy = "deny"

    def run(self, input: dict[str, Any], ctx: ToolContext) -> Deferred[ToolResult]:
        return succeed(ToolResult(content="ok"))


def test_default_registry() -> None:
    reg = default_registry()
    assert reg.names() == ("bash", "read_file", "write_file", "list_dir")
    assert [s.name for s in reg.specs()] == list(reg.names())
    assert [s.name for s in reg.specs({"read_file", "list_dir", "nope"})] == [
        "read_file",
        "list_dir",
    ]
    assert reg.specs(()) == ()
    for spec in reg.specs():
        assert spec.input_schema["type"] == "object" and spec.description
    bash = reg.get("bash")
    assert isinstance(bash, BashTool)
    assert reg.get("nope") is None
    assert {n: reg.policy_for(n, {}) for n in reg.names()} == {
        "bash": "ask",
        "read_file": "allow",
        "write_file": "ask",
        "list_dir": "allow",
    }


def test_policy_overrides() -> None:
    reg = default_registry()
    assert reg.policy_for("bash", {"bash": "allow"}) == "allow"
    assert reg.policy_for("read_file", {"bash": "deny"}) == "allow"
    assert reg.policy_for("read_file", {"read_file": "Deny"}) == "deny"
    assert reg.policy_for("unknown", {"unknown": "allow"}) == "deny"
    with pytest.raises(ValueError):
        reg.policy_for("bash", {"bash": "sometimes"})


@pytest_twisted.ensureDeferred
async def test_registry_custom_tools_and_run_tool(workspace: Path) -> None:
    reg = ToolRegistry()
    reg.register(_Fixed())
    reg.register(_Boom())
    with pytest.raises(ValueError):
        reg.register(_Fixed())
    assert reg.names() == ("fixed", "boom")
    assert reg.policy_for("fixed") == "deny"
    tool = reg.get("boom")
    assert tool is not None
    r = await run_tool(tool, {}, ctx_for(workspace))
    assert r.is_error and "unexpectedly" in r.content
    fixed = reg.get("fixed")
    assert fixed is not None
    assert (await run_tool(fixed, {}, ctx_for(workspace))).content == "ok"


@pytest_twisted.ensureDeferred
async def test_run_tool_propagates_cancel(workspace: Path) -> None:
    spawned = Spawned()
    d = run_tool(bash_tool(spawned), {"command": "sleep 100"}, ctx_for(workspace))
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await spawned.last.ended
    assert not alive(spawned.last.pid or 0)
