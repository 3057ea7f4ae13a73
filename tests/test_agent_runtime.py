"""The agent runtime end to end, over the running server on loopback.

Model providers are pointed at the local stand-ins (tests/standins.py), which speak the real
OpenAI and Anthropic streaming formats; the echo provider's ``/tool NAME {json}`` drives the
tools, approvals and aborts.  Waiting is done with bounded polls (a deadline, short steps).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest_twisted
import treq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater

from gatewayd.agent.base import Usage
from tests.harness import (
    ADMIN,
    CHAT,
    CHAT2,
    OPERATOR,
    TOKENS_TOML,
    VIEWER,
    Running,
    auth,
    spawn,
    start_gateway,
)
from tests.standins import (
    AnthropicStandIn,
    Hang,
    OpenAIStandIn,
    Stream,
    anthropic_error,
    anthropic_text_events,
    anthropic_tool_use_events,
    listen_standin,
    openai_error,
    openai_text_chunks,
    openai_tool_call_chunks,
    stop_standin,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-standin-secret-0123456789abcdefXYZ"


# -- helpers ------------------------------------------------------------------------------


def config(agent: str = "", extra: str = "") -> str:
    """TOML: an ``[agent]`` table (its body), more tables, then the test tokens.

    The rate limit is raised: the tests poll, and a 429 there would only hide the answer.
    """
    limits = "[gateway.rate_limit]\nrate_per_s = 1000\nburst = 1000\n"
    return f"[agent]\n{agent}\n{extra}\n{limits}{TOKENS_TOML}"


async def request(
    g: Running, method: str, path: str, body: Any = None, token: str = ADMIN
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    # no keep-alive: a pooled client connection would outlive the test with a 240 s timer
    resp = await treq.request(
        method, g.url + path, data=data, headers=auth(token), persistent=False
    )
    raw = await resp.content()
    return resp.code, json.loads(raw) if raw else None


async def post(g: Running, path: str, body: Any = None, token: str = ADMIN) -> tuple[int, Any]:
    return await request(g, "POST", path, body if body is not None else {}, token)


async def get(g: Running, path: str, token: str = ADMIN) -> tuple[int, Any]:
    return await request(g, "GET", path, None, token)


async def rpc(g: Running, method: str, params: dict[str, Any], token: str = ADMIN) -> Any:
    code, body = await post(
        g, "/rpc", {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, token
    )
    assert code == 200, body
    return body


async def sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await deferLater(reactor, seconds)


async def until(
    probe: Callable[[], Awaitable[Any]], what: str, timeout: float = 10.0, step: float = 0.02
) -> Any:
    """Poll ``probe`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(step)


async def run_status(g: Running, run_id: str, *statuses: str, timeout: float = 10.0) -> Any:
    async def probe() -> Any:
        code, run = await get(g, f"/api/runs/{run_id}")
        assert code == 200, run
        return run if run["status"] in statuses else None

    return await until(probe, f"run {run_id} to be {'/'.join(statuses)}", timeout)


async def pending_approval(g: Running, run_id: str, token: str = ADMIN) -> dict[str, Any]:
    async def probe() -> Any:
        code, body = await get(g, "/api/approvals?status=pending", token)
        assert code == 200, body
        return next((a for a in body["approvals"] if a["run_id"] == run_id), None)

    result: dict[str, Any] = await until(probe, f"an approval for {run_id}")
    return result


def start(d: Awaitable[Any]) -> Deferred[Any]:
    """Run a request in the background (its own Deferred, awaited later)."""
    return ensureDeferred(d)  # type: ignore[arg-type]


def events(g: Running, type: str) -> list[dict[str, Any]]:
    return [e.envelope() for e in g.gateway.bus.recent(1000) if e.type == type]


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie left for a reaper that may never come (pid 1)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def tool_cmd(name: str, **tool_input: Any) -> str:
    return f"/tool {name} {json.dumps(tool_input)}"


# -- OpenAI-compatible upstream ---------------------------------------------------------------


def openai_agent(base_url: str, more: str = "") -> str:
    return (
        f'provider = "openai"\nmodel = "gpt-standin"\nbase_url = "{base_url}"\n'
        f'api_key = "{KEY}"\nmax_retries = 2\nconnect_timeout_s = 2\n{more}'
    )


@pytest_twisted.ensureDeferred
async def test_openai_tool_call_history_usage_and_cost(tmp_path: Any) -> None:
    standin = OpenAIStandIn(api_key=KEY)
    port, base_url = listen_standin(standin)
    pricing = "[agent.pricing]\ninput_cents_per_mtok = 1000\noutput_cents_per_mtok = 2000\n"
    g = await start_gateway(str(tmp_path), config(openai_agent(base_url), pricing))
    stopped = False
    try:
        with open(os.path.join(g.gateway.workspace, "notes.txt"), "w") as f:
            f.write("hello from the workspace\n")
        args = '{"path": "notes.txt"}'
        standin.script += [
            Stream(
                openai_tool_call_chunks(
                    [("call_abc", "read_file", args)],
                    text="Let me look.",
                    usage=Usage(100, 20),
                    arg_pieces=5,
                )
            ),
            Stream(openai_text_chunks("It says hello.", usage=Usage(150, 30))),
            Stream(openai_text_chunks("You are welcome.", usage=Usage(10, 5))),
        ]
        code, body = await post(g, "/api/chat", {"message": "read my notes"})
        assert code == 200, body
        assert body["response"] == "It says hello."
        assert body["tools_used"] == ["read_file"]
        assert body["tokens"] == {"input": 250, "output": 50}
        # (250 * 1000 + 50 * 2000) / 1e6 cents
        assert body["cost_cents"] == 0.35
        first, second = standin.requests
        assert first.headers["authorization"] == f"Bearer {KEY}"
        assert first.json["stream"] is True
        assert "read_file" in [t["function"]["name"] for t in first.json["tools"]]
        assert first.json["messages"] == [{"role": "user", "content": "read my notes"}]
        # the second request carries the assistant's tool call and the tool's result
        sent = second.json["messages"]
        assert sent[0] == {"role": "user", "content": "read my notes"}
        assert sent[1]["role"] == "assistant"
        assert sent[1]["content"] == "Let me look."
        assert sent[1]["tool_calls"][0]["id"] == "call_abc"
        assert sent[1]["tool_calls"][0]["function"]["name"] == "read_file"
        assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {
            "path": "notes.txt"
        }
        assert sent[2] == {
            "role": "tool",
            "tool_call_id": "call_abc",
            "content": "hello from the workspace\n",
        }
        code, run = await get(g, f"/api/runs/{body['run_id']}")
        assert run["status"] == "completed"
        assert run["tokens"] == {"input": 250, "output": 50} and run["cost_cents"] == 0.35
        # the next run of the session sends the conversation so far
        code, body2 = await post(
            g, "/api/chat", {"message": "thanks", "session_id": body["session_id"]}
        )
        assert code == 200 and body2["response"] == "You are welcome."
        history = standin.requests[2].json["messages"]
        assert [(m["role"], m["content"]) for m in history] == [
            ("user", "read my notes"),
            ("assistant", "It says hello."),
            ("user", "thanks"),
        ]
        code, status = await get(g, "/api/status")
        assert code == 200 and status["provider"] == "openai"
        assert KEY not in json.dumps(status)
        # stopping the gateway closes the provider's pooled connections
        site = port.factory
        assert site.channels
        stopped = True
        await g.stop()

        async def hung_up() -> bool:
            return not site.channels

        await until(hung_up, "the provider's pool to close", timeout=5)
    finally:
        if not stopped:
            await g.stop()
        await stop_standin(port)


@pytest_twisted.ensureDeferred
async def test_openai_429_then_success_and_retries_exhausted(tmp_path: Any) -> None:
    standin = OpenAIStandIn()
    port, base_url = listen_standin(standin)
    g = await start_gateway(str(tmp_path), config(openai_agent(base_url)))
    try:
        standin.script += [
            openai_error(429, "slow down", kind="rate_limit_error", retry_after="0"),
            Stream(openai_text_chunks("Made it.")),
        ]
        code, body = await post(g, "/api/chat", {"message": "hi"})
        assert code == 200 and body["response"] == "Made it."
        assert len(standin.requests) == 2
        # three 429s with max_retries = 2: the run fails with a clear run_error
        standin.script += [
            openai_error(429, "slow down", kind="rate_limit_error", retry_after="0")
            for _ in range(3)
        ]
        code, body = await post(g, "/api/agent", {"message": "hi again"})
        assert code == 202
        run = await run_status(g, body["run_id"], "failed")
        assert run["error_code"] == "upstream_rate_limited"
        assert "429" in run["error"] and "3 attempts" in run["error"]
        assert len(standin.requests) == 5
        errors = [e for e in events(g, "run_error") if e["run_id"] == body["run_id"]]
        assert errors and errors[0]["code"] == "upstream_rate_limited"
    finally:
        await g.stop()
        await stop_standin(port)


@pytest_twisted.ensureDeferred
async def test_openai_hanging_upstream_hits_the_read_timeout(tmp_path: Any) -> None:
    standin = OpenAIStandIn()
    port, base_url = listen_standin(standin)
    agent = openai_agent(base_url, "read_timeout_s = 0.3\n").replace(
        "max_retries = 2", "max_retries = 0"
    )
    g = await start_gateway(str(tmp_path), config(agent))
    try:
        standin.script.append(Hang())
        code, body = await post(g, "/api/chat", {"message": "are you there?"})
        assert code == 503, body
        assert "no data from the upstream for 0.3s" in body["error"]["message"]
        [errored] = events(g, "run_error")
        assert errored["code"] == "upstream_timeout"
        code, run = await get(g, f"/api/runs/{errored['run_id']}")
        assert run["status"] == "failed" and run["error_code"] == "upstream_timeout"
        # the gateway hung up on the stand-in
        assert await standin.requests[0].outcome == "lost"
    finally:
        await g.stop()
        await stop_standin(port)


@pytest_twisted.ensureDeferred
async def test_api_key_never_shows_in_errors_status_or_log(tmp_path: Any) -> None:
    standin = OpenAIStandIn(api_key="sk-the-right-one")  # its 401 quotes the key it got
    port, base_url = listen_standin(standin)
    g = await start_gateway(str(tmp_path), config(openai_agent(base_url)))
    try:
        code, body = await post(g, "/api/chat", {"message": "hi"})
        assert code == 503
        assert "401" in body["error"]["message"]
        assert KEY not in json.dumps(body)
        [errored] = events(g, "run_error")
        assert KEY not in json.dumps(errored) and "[redacted]" in errored["error"]
        code, run = await get(g, f"/api/runs/{errored['run_id']}")
        assert KEY not in json.dumps(run)
        for path in ("/api/status", "/api/models", "/api/agents"):
            code, body = await get(g, path)
            assert code == 200 and KEY not in json.dumps(body), path
    finally:
        await g.stop()
        await stop_standin(port)
    logs = [n for n in os.listdir(tmp_path) if n.endswith(".log") or ".log." in n]
    assert logs
    for name in logs:
        with open(os.path.join(tmp_path, name), encoding="utf-8", errors="replace") as f:
            assert KEY not in f.read(), name


@pytest_twisted.ensureDeferred
async def test_abort_mid_stream_keeps_the_partial_text(tmp_path: Any) -> None:
    standin = OpenAIStandIn()
    port, base_url = listen_standin(standin)
    g = await start_gateway(str(tmp_path), config(openai_agent(base_url)))
    try:
        chunks = openai_text_chunks("Once upon a time, and then")[:5]  # role + 4 words
        standin.script.append(Stream(chunks, hold_open=True))
        code, body = await post(g, "/api/agent", {"message": "tell me a story"}, CHAT)
        assert code == 202
        run_id = body["run_id"]

        async def streaming() -> bool:
            live = g.gateway.runs.live(run_id)
            return live is not None and "".join(live.partial) == "Once upon a time, "

        await until(streaming, "the first words")
        code, body = await post(g, f"/api/runs/{run_id}/abort", {}, CHAT2)
        assert code == 404  # not CHAT2's run
        code, body = await post(g, f"/api/runs/{run_id}/abort", {}, CHAT)
        assert code == 202 and body == {"run_id": run_id, "status": "aborted"}
        run = await run_status(g, run_id, "aborted")
        assert run["response"] == "Once upon a time, "
        assert await standin.requests[0].outcome == "lost"
        code, hist = await get(g, f"/api/sessions/{run['session_id']}/history", CHAT)
        assert hist["messages"][-1]["content"] == "Once upon a time, "
        assert [e["run_id"] for e in events(g, "run_aborted")] == [run_id]
    finally:
        await g.stop()
        await stop_standin(port)


# -- Anthropic upstream -------------------------------------------------------------------------


def anthropic_agent(base_url: str, more: str = "") -> str:
    return (
        f'provider = "anthropic"\nmodel = "claude-standin"\nbase_url = "{base_url}"\n'
        f'api_key = "{KEY}"\nmax_retries = 2\nconnect_timeout_s = 2\n{more}'
    )


@pytest_twisted.ensureDeferred
async def test_anthropic_tool_use_retry_usage_and_timeout(tmp_path: Any) -> None:
    standin = AnthropicStandIn(api_key=KEY)
    port, base_url = listen_standin(standin)
    more = "read_timeout_s = 0.5\n"
    pricing = "[agent.pricing]\ninput_cents_per_mtok = 300\noutput_cents_per_mtok = 1500\n"
    g = await start_gateway(str(tmp_path), config(anthropic_agent(base_url, more), pricing))
    try:
        os.mkdir(os.path.join(g.gateway.workspace, "docs"))
        with open(os.path.join(g.gateway.workspace, "readme.md"), "w") as f:
            f.write("# hi\n")
        standin.script += [
            anthropic_error(529, "Overloaded", kind="overloaded_error", retry_after="0"),
            Stream(
                anthropic_tool_use_events(
                    [("toolu_01", "list_dir", '{"path": "."}')],
                    text="Looking.",
                    usage=Usage(1000, 40),
                    json_pieces=3,
                )
            ),
            Stream(anthropic_text_events("Two entries.", usage=Usage(1200, 60))),
        ]
        code, body = await post(g, "/api/chat", {"message": "what is here?"})
        assert code == 200, body
        assert body["response"] == "Two entries."
        assert body["tools_used"] == ["list_dir"]
        assert body["tokens"] == {"input": 2200, "output": 100}
        assert body["cost_cents"] == round((2200 * 300 + 100 * 1500) / 1e6, 6)
        assert len(standin.requests) == 3  # the 529, then the two turns
        first, second = standin.requests[1:]
        assert first.headers["x-api-key"] == KEY and "anthropic-version" in first.headers
        assert first.json["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "what is here?"}]}
        ]
        assert "list_dir" in [t["name"] for t in first.json["tools"]]
        sent = second.json["messages"]
        assert sent[1] == {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "toolu_01", "name": "list_dir", "input": {"path": "."}},
            ],
        }
        assert sent[2] == {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "docs/\nreadme.md"}
            ],
        }
        # a hanging upstream: the read timeout ends the run (a timeout is not retried)
        standin.script.append(Hang())
        code, body = await post(g, "/api/agent", {"message": "hello?"})
        run = await run_status(g, body["run_id"], "failed")
        assert run["error_code"] == "upstream_timeout"
        assert "anthropic: no data from the upstream for 0.5s" in run["error"]
        assert len(standin.requests) == 4
        assert KEY not in json.dumps(run)
    finally:
        await g.stop()
        await stop_standin(port)


# -- approvals ------------------------------------------------------------------------------


BASH_HI = tool_cmd("bash", command="echo hi")


@pytest_twisted.ensureDeferred
async def test_approval_approve_deny_conflict_and_visibility(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), config())
    try:
        # approve: the chat waits, an operator approves, the answer is the command's output
        chat = start(post(g, "/api/chat", {"message": BASH_HI}, CHAT))
        approval = await until(lambda: _first_pending(g, CHAT), "an approval")
        run_id = approval["run_id"]
        assert approval["tool"] == "bash" and approval["input"] == {"command": "echo hi"}
        assert approval["status"] == "pending" and approval["created_at"].endswith("Z")
        code, run = await get(g, f"/api/runs/{run_id}", CHAT)
        assert run["status"] == "awaiting_approval"
        # only its owner's chat token (and readers) see it; chat tokens cannot resolve
        code, body = await get(g, "/api/approvals", CHAT2)
        assert code == 200 and body == {"approvals": []}
        code, body = await get(g, "/api/approvals", VIEWER)
        assert [a["id"] for a in body["approvals"]] == [approval["id"]]
        code, body = await post(g, f"/api/approvals/{approval['id']}/approve", {}, CHAT)
        assert code == 403 and body["error"]["code"] == "forbidden"
        code, body = await post(g, "/api/approvals/apr_nope/approve", {}, OPERATOR)
        assert code == 404 and body["error"]["code"] == "not_found"
        code, body = await post(
            g, f"/api/approvals/{approval['id']}/approve", {"reason": "fine"}, OPERATOR
        )
        assert code == 200, body
        assert body["status"] == "approved" and body["id"] == approval["id"]
        assert body["reason"] == "fine" and "resolved_at" in body
        code, result = await chat
        assert code == 200, result
        assert result["response"] == "hi\n" and result["tools_used"] == ["bash"]
        # the first resolve won: any second one is 409, through either path
        for path in (
            f"/api/approvals/{approval['id']}/deny",
            f"/api/exec/approval/{approval['id']}/approve",
        ):
            code, body = await post(g, path, {}, ADMIN)
            assert code == 409 and body["error"]["code"] == "conflict", path
        resolved = [e for e in events(g, "approval_resolved") if e["run_id"] == run_id]
        assert [(e["approval_id"], e["decision"]) for e in resolved] == [
            (approval["id"], "approve")
        ]

        # deny (through the /api/exec alias): the denial goes back as a tool error, run goes on
        chat = start(post(g, "/api/chat", {"message": BASH_HI}, CHAT))
        approval = await until(lambda: _first_pending(g, CHAT), "a second approval")
        code, body = await post(
            g, f"/api/exec/approval/{approval['id']}/deny", {"reason": "not today"}, OPERATOR
        )
        assert code == 200 and body["status"] == "denied" and body["reason"] == "not today"
        code, result = await chat
        assert code == 200, result
        assert "denied" in result["response"] and "not today" in result["response"]
        code, run = await get(g, f"/api/runs/{approval['run_id']}")
        assert run["status"] == "completed"
        code, hist = await get(g, f"/api/sessions/{run['session_id']}/history")
        tool_msgs = [m for m in hist["messages"] if m["role"] == "tool"]
        assert tool_msgs[0]["is_error"] is True

        # JSON-RPC: approvals.list and approvals.resolve; a second resolve is -32000/conflict
        chat = start(post(g, "/api/chat", {"message": BASH_HI}, CHAT))
        approval = await until(lambda: _first_pending(g, CHAT), "a third approval")
        listed = await rpc(g, "approvals.list", {"status": "pending"}, OPERATOR)
        assert [a["id"] for a in listed["result"]["approvals"]] == [approval["id"]]
        params = {"approval_id": approval["id"], "decision": "approve"}
        reply = await rpc(g, "approvals.resolve", params, OPERATOR)
        assert reply["result"]["status"] == "approved"
        reply = await rpc(g, "approvals.resolve", params, OPERATOR)
        assert reply["error"]["code"] == -32000
        assert reply["error"]["data"]["code"] == "conflict"
        code, result = await chat
        assert code == 200 and result["response"] == "hi\n"
        code, body = await get(g, "/api/approvals?status=approved", CHAT)
        assert len(body["approvals"]) == 2
        code, body = await get(g, "/api/approvals?status=bogus", CHAT)
        assert code == 400
    finally:
        await g.stop()


async def _first_pending(g: Running, token: str) -> dict[str, Any] | None:
    code, body = await get(g, "/api/approvals?status=pending", token)
    assert code == 200, body
    approvals: list[dict[str, Any]] = body["approvals"]
    return approvals[0] if approvals else None


@pytest_twisted.ensureDeferred
async def test_approval_timeout_expires_and_the_run_completes(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), config("approval_timeout_s = 0.3"))
    try:
        code, result = await post(g, "/api/chat", {"message": BASH_HI}, CHAT)
        assert code == 200, result
        assert "expired" in result["response"]
        code, run = await get(g, f"/api/runs/{result['run_id']}")
        assert run["status"] == "completed"
        code, body = await get(g, "/api/approvals", CHAT)
        [approval] = body["approvals"]
        assert approval["status"] == "expired" and "resolved_at" in approval
        code, body = await post(g, f"/api/approvals/{approval['id']}/approve", {}, OPERATOR)
        assert code == 409
    finally:
        await g.stop()


# -- abort ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_abort_kills_the_tool_process_group(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), config(extra='[agent.tools.bash]\npolicy = "allow"'))
    try:
        ws = g.gateway.workspace
        command = "echo $$ > bash.pid; sleep 30 & echo $! > sleep.pid; wait"
        code, body = await post(
            g, "/api/agent", {"message": tool_cmd("bash", command=command)}, CHAT
        )
        assert code == 202
        run_id = body["run_id"]

        async def pids() -> tuple[int, int] | None:
            try:
                with (
                    open(os.path.join(ws, "bash.pid")) as a,
                    open(os.path.join(ws, "sleep.pid")) as b,
                ):
                    return int(a.read()), int(b.read())
            except (FileNotFoundError, ValueError):
                return None

        bash_pid, sleep_pid = await until(pids, "the command to start")
        assert not process_gone(bash_pid) and not process_gone(sleep_pid)
        code, run = await get(g, f"/api/runs/{run_id}")
        assert run["status"] == "running"
        code, body = await post(g, f"/api/runs/{run_id}/abort", {}, CHAT)
        assert code == 202 and body["status"] == "aborted"
        run = await run_status(g, run_id, "aborted")
        assert run["error"] == "aborted by request"

        async def gone() -> bool:
            return process_gone(bash_pid) and process_gone(sleep_pid)

        await until(gone, "the shell and its background child to die", timeout=5)
        # aborting again, or aborting a finished run, changes nothing
        code, body = await post(g, f"/api/runs/{run_id}/abort", {}, CHAT)
        assert code == 202 and body["status"] == "aborted"
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_abort_queued_and_awaiting_approval_runs(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), config())
    try:
        # an approval-waiting run, with a second run queued behind it on the same session
        code, first = await post(g, "/api/agent", {"message": BASH_HI}, CHAT)
        sid = first["session_id"]
        approval = await pending_approval(g, first["run_id"])
        code, second = await post(g, "/api/agent", {"message": "after", "session_id": sid}, CHAT)
        assert code == 202
        code, run = await get(g, f"/api/runs/{second['run_id']}")
        assert run["status"] == "queued"
        # the queued one, over JSON-RPC
        reply = await rpc(g, "chat.abort", {"run_id": second["run_id"]}, CHAT)
        assert reply["result"]["status"] == "aborted"
        run = await run_status(g, second["run_id"], "aborted")
        assert "started_at" not in run
        # the waiting one, through its session: its approval is cancelled
        code, body = await post(g, f"/api/sessions/{sid}/abort", {}, OPERATOR)
        assert code == 202
        await run_status(g, first["run_id"], "aborted")
        code, body = await get(g, "/api/approvals", ADMIN)
        [cancelled] = [a for a in body["approvals"] if a["id"] == approval["id"]]
        assert cancelled["status"] == "cancelled"
        code, body = await post(g, f"/api/approvals/{approval['id']}/approve", {}, OPERATOR)
        assert code == 409
        # the session still works
        code, body = await post(g, "/api/chat", {"message": "still here", "session_id": sid}, CHAT)
        assert code == 200 and body["response"] == "still here"
        # aborted while the approval row is still being written: it must not stay pending
        principal = g.gateway.tokens.authenticate(CHAT)
        live = await g.gateway.runs.submit(principal, BASH_HI)
        assert g.gateway.runs.abort(live.run.id)  # same reactor turn: the write is in flight
        await run_status(g, live.run.id, "aborted")

        async def closed() -> Any:
            code, body = await get(g, "/api/approvals", ADMIN)
            mine = [a for a in body["approvals"] if a["run_id"] == live.run.id]
            return mine and mine[0]["status"] != "pending" and mine[0]

        late = await until(closed, "the late approval to be closed")
        assert late["status"] == "cancelled"
    finally:
        await g.stop()


# -- restart --------------------------------------------------------------------------------


def test_restart_expires_pending_approvals_and_fails_their_runs(tmp_path: Any) -> None:
    state = str(tmp_path / "state")
    env = {"PYTHONPATH": REPO}
    p = spawn(state, env=env, config_text=config())
    try:
        code, body = p.request("POST", "/api/agent", {"message": BASH_HI})
        assert code == 202, body
        run_id = body["run_id"]
        deadline = time.monotonic() + 10
        while True:
            code, listing = p.request("GET", "/api/approvals?status=pending")
            if listing["approvals"]:
                break
            assert time.monotonic() < deadline, "no approval appeared"
            time.sleep(0.05)
        [approval] = listing["approvals"]
        # events are recorded in batches, a moment after they happen: wait until this one is
        # on disk, so that what the restart replays can be checked
        db = os.path.join(state, "gatewayd.sqlite3")
        while True:
            with sqlite3.connect(db) as conn:
                stored = conn.execute(
                    "SELECT count(*) FROM events WHERE type = 'approval_requested' AND run_id = ?",
                    (run_id,),
                ).fetchone()[0]
            if stored:
                break
            assert time.monotonic() < deadline, "the approval_requested event was not stored"
            time.sleep(0.05)
    finally:
        p.kill()  # SIGKILL: nothing gets to clean up
    p2 = spawn(state, env=env, config_text=config())
    try:
        code, listing = p2.request("GET", "/api/approvals")
        [after] = listing["approvals"]
        assert after["id"] == approval["id"]
        assert after["status"] == "expired" and after["reason"]
        code, run = p2.request("GET", f"/api/runs/{run_id}")
        assert run["status"] == "failed" and run["error"]
        code, body = p2.request("POST", f"/api/approvals/{approval['id']}/approve")
        assert code == 409
        assert run["error_code"] == "unavailable"

        # visibly: a client resuming from before the crash is told both, in order
        def told(seen: list[dict[str, Any]]) -> bool:
            return any(e["type"] == "run_error" for e in seen)

        seen = p2.events("last_event_id=0", told)
        mine = [e for e in seen if e.get("run_id") == run_id]
        assert [e["type"] for e in mine][-2:] == ["approval_resolved", "run_error"]
        resolved, error = mine[-2:]
        assert resolved["approval_id"] == approval["id"] and resolved["status"] == "expired"
        assert error["code"] == "unavailable" and error["error"] == run["error"]
        # what happened before the crash is replayed too: the restart kept the stored events
        assert "approval_requested" in [e["type"] for e in mine]
    finally:
        p2.terminate()


# -- workspace confinement, tools.invoke, listings --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_workspace_escapes_come_back_as_tool_errors(tmp_path: Any) -> None:
    extra = '[agent.tools.write_file]\npolicy = "allow"\n'
    g = await start_gateway(str(tmp_path), config(extra=extra))
    try:
        ws = g.gateway.workspace
        secret = tmp_path / "secret.txt"
        secret.write_text("TOP SECRET\n")
        os.symlink(str(secret), os.path.join(ws, "link.txt"))
        os.symlink(str(tmp_path), os.path.join(ws, "outdir"))
        attempts = [
            tool_cmd("read_file", path="../secret.txt"),
            tool_cmd("read_file", path=str(secret)),
            tool_cmd("read_file", path="link.txt"),
            tool_cmd("read_file", path="outdir/secret.txt"),
            tool_cmd("list_dir", path=".."),
            tool_cmd("list_dir", path="outdir"),
            tool_cmd("write_file", path="../planted.txt", content="x"),
            tool_cmd("write_file", path="outdir/planted.txt", content="x"),
        ]
        for message in attempts:
            code, body = await post(g, "/api/chat", {"message": message}, CHAT)
            assert code == 200, (message, body)
            assert "escapes the workspace" in body["response"], (message, body)
            assert "TOP SECRET" not in body["response"]
            code, hist = await get(g, f"/api/sessions/{body['session_id']}/history", CHAT)
            [tool_msg] = [m for m in hist["messages"] if m["role"] == "tool"]
            assert tool_msg["is_error"] is True
        assert not (tmp_path / "planted.txt").exists()
        # inside the workspace all is well
        code, body = await post(
            g, "/api/chat", {"message": tool_cmd("write_file", path="a/b.txt", content="ok")}, CHAT
        )
        assert body["response"] == "wrote 2 bytes to a/b.txt"
        code, body = await post(
            g, "/tools/invoke", {"tool": "read_file", "input": {"path": "../secret.txt"}}, OPERATOR
        )
        assert code == 200 and body["is_error"] is True
        assert "escapes the workspace" in body["result"]
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_tools_invoke_and_the_listings(tmp_path: Any) -> None:
    extra = '[agent.tools.write_file]\npolicy = "deny"\n'
    g = await start_gateway(str(tmp_path), config('agents = ["helper"]', extra))
    try:
        with open(os.path.join(g.gateway.workspace, "f.txt"), "w") as f:
            f.write("content")
        code, body = await post(
            g, "/tools/invoke", {"tool": "read_file", "input": {"path": "f.txt"}}, OPERATOR
        )
        assert code == 200, body
        assert body["result"] == "content" and body["is_error"] is False
        code, run = await get(g, f"/api/runs/{body['run_id']}")
        assert run["status"] == "completed" and run["tools_used"] == ["read_file"]
        # deny policy: an error result, nothing runs
        code, body = await post(
            g,
            "/tools/invoke",
            {"tool": "write_file", "input": {"path": "g", "content": ""}},
            OPERATOR,
        )
        assert code == 200 and body["is_error"] is True and "denied" in body["result"]
        assert not os.path.exists(os.path.join(g.gateway.workspace, "g"))
        code, body = await post(g, "/tools/invoke", {"tool": "nope"}, OPERATOR)
        assert code == 404
        code, body = await post(g, "/tools/invoke", {"tool": "read_file", "input": "x"}, OPERATOR)
        assert code == 400
        code, body = await post(g, "/tools/invoke", {"tool": "read_file"}, CHAT)
        assert code == 403
        # ask policy: it waits for an approval like a run's tool call would
        invoke = start(
            post(
                g,
                "/tools/invoke",
                {"tool": "bash", "input": {"command": "echo via-invoke"}},
                OPERATOR,
            )
        )
        approval = await until(lambda: _first_pending(g, ADMIN), "the invocation's approval")
        assert approval["tool"] == "bash"
        code, body = await post(g, f"/api/approvals/{approval['id']}/approve", {}, ADMIN)
        assert code == 200
        code, body = await invoke
        assert code == 200 and body == {
            "result": "via-invoke\n",
            "is_error": False,
            "run_id": approval["run_id"],
            "session_id": approval["session_id"],
        }
        # over JSON-RPC too
        reply = await rpc(g, "tools.invoke", {"tool": "list_dir", "input": {}}, OPERATOR)
        assert reply["result"]["result"] == "f.txt"
        # the listings
        code, body = await get(g, "/api/tools", VIEWER)
        policies = {t["name"]: t["policy"] for t in body["tools"]}
        assert policies == {
            "bash": "ask",
            "read_file": "allow",
            "write_file": "deny",
            "list_dir": "allow",
        }
        assert all(t["description"] and t["input_schema"] for t in body["tools"])
        code, body = await get(g, "/api/models", VIEWER)
        assert body == {"models": [{"id": "echo-1", "provider": "echo", "default": True}]}
        code, body = await get(g, "/api/agents", VIEWER)
        assert [a["id"] for a in body["agents"]] == ["default", "helper"]
        reply = await rpc(g, "agent.identity", {}, VIEWER)
        assert reply["result"]["provider"] == "echo" and reply["result"]["model"] == "echo-1"
        reply = await rpc(g, "tools.list", {}, VIEWER)
        assert len(reply["result"]["tools"]) == 4
    finally:
        await g.stop()


# -- budget ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_budget_warns_at_80_percent_then_refuses(tmp_path: Any) -> None:
    # echo counts words: one cent per word in and out
    agent = "budget_cents_per_day = 10"
    pricing = "[agent.pricing]\ninput_cents_per_mtok = 1000000\noutput_cents_per_mtok = 1000000\n"
    g = await start_gateway(str(tmp_path), config(agent, pricing))
    try:
        code, body = await post(g, "/api/chat", {"message": "one two three"})
        assert code == 200 and body["cost_cents"] == 6
        assert events(g, "budget_warning") == []
        code, body = await post(g, "/api/chat", {"message": "four"})
        assert code == 200 and body["cost_cents"] == 2
        [warning] = events(g, "budget_warning")
        assert warning["spent_cents"] == 8 and warning["limit_cents"] == 10
        code, body = await post(g, "/api/chat", {"message": "five six"})
        assert code == 200  # 12 of 10: this one was already under way
        code, body = await post(g, "/api/chat", {"message": "seven"})
        assert code == 429 and body["error"]["code"] == "budget_exceeded"
        [refused] = [e for e in events(g, "run_error") if e.get("code") == "budget_exceeded"]
        code, run = await get(g, f"/api/runs/{refused['run_id']}")
        assert run["status"] == "failed" and run["error_code"] == "budget_exceeded"
        code, body = await post(g, "/api/agent", {"message": "eight"})
        assert code == 429 and body["error"]["code"] == "budget_exceeded"
        reply = await rpc(g, "chat.send", {"message": "nine"})
        assert reply["error"]["data"]["code"] == "budget_exceeded"
        # a direct tool invocation costs nothing: the budget does not refuse it
        code, body = await post(g, "/tools/invoke", {"tool": "list_dir"}, OPERATOR)
        assert code == 200 and body["is_error"] is False
        assert len(events(g, "budget_warning")) == 1
    finally:
        await g.stop()
