"""``gatewayctl`` as a subprocess against a real ``twistd gateway`` process: every command,
readable and ``--json``, and the exit codes (0 ok, 1 error answer, 2 usage, 3 unreachable)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.harness import ADMIN, TOKENS_TOML, VIEWER, Process, free_port, spawn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = (
    """
[gateway.rate_limit]
rate_per_s = 10000
burst = 10000
[agent.tools.bash]
policy = "ask"
"""
    + TOKENS_TOML
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = spawn(str(tmp_path_factory.mktemp("ctl") / "state"), config_text=CONFIG)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.kill()


def ctl(
    *args: str,
    url: str | None = None,
    token: str | None = ADMIN,
    env: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, str, str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAYD_")}
    if url:
        child_env["GATEWAYD_URL"] = url
    if token:
        child_env["GATEWAYD_TOKEN"] = token
    child_env["GATEWAYD_STATE_DIR"] = os.path.join(REPO, "no-such-state-dir")
    child_env.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "gatewayd.ctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
        cwd=REPO,
    )
    return done.returncode, done.stdout, done.stderr


def ok(gw: Process, *args: str, **kw: Any) -> str:
    code, out, err = ctl(*args, url=gw.url, **kw)
    assert code == 0, (args, out, err)
    return out


def ok_json(gw: Process, *args: str, **kw: Any) -> Any:
    return json.loads(ok(gw, "--json", *args, **kw))


def test_status_health_models_channels(gateway: Process) -> None:
    out = ok(gateway, "status")
    assert "version" in out and "uptime_seconds" in out
    assert ok_json(gateway, "status")["provider"] == "echo"
    assert ok(gateway, "health", token=None).startswith("ok ")
    assert ok_json(gateway, "health", token=None)["status"] == "ok"
    out = ok(gateway, "models")
    assert out.splitlines()[0].split() == ["ID", "PROVIDER", "DEFAULT"]
    assert "echo-1" in out
    assert ok_json(gateway, "models")["models"][0]["id"] == "echo-1"
    assert ok(gateway, "channels").strip() == "(none)"
    assert ok_json(gateway, "channels") == {"channels": []}


def test_chat_streams_and_sessions(gateway: Process) -> None:
    out = ok(gateway, "chat", "hello there  world")
    assert out == "hello there  world\n"
    done = ok_json(gateway, "chat", "again", "--session", "ctl-session")
    assert done["session_id"] == "ctl-session" and done["response"] == "again"
    assert done["tokens"] == {"input": 1, "output": 1}
    out = ok(gateway, "chat", "more", "--session", "ctl-session")
    assert out == "more\n"
    listing = ok(gateway, "sessions", "list")
    assert listing.splitlines()[0].split()[:2] == ["ID", "TITLE"]
    assert "ctl-session" in listing
    assert any(s["id"] == "ctl-session" for s in ok_json(gateway, "sessions", "list")["sessions"])
    shown = ok(gateway, "sessions", "show", "ctl-session")
    assert "user: again" in shown and "assistant: more" in shown
    shown = ok_json(gateway, "sessions", "show", "ctl-session")
    assert [m["content"] for m in shown["messages"]] == ["again", "again", "more", "more"]
    assert ok(gateway, "sessions", "delete", "ctl-session") == "deleted session ctl-session\n"
    code, out, err = ctl("sessions", "show", "ctl-session", url=gateway.url)
    assert code == 1 and "404 not_found" in err
    code, out, err = ctl("--json", "sessions", "delete", "ctl-session", url=gateway.url)
    assert code == 1 and json.loads(out)["error"]["code"] == "not_found"


def test_approvals_through_a_streaming_chat(gateway: Process) -> None:
    """A chat that needs approval streams, waits; approve it from another gatewayctl."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAYD_")}
    child_env.update(GATEWAYD_URL=gateway.url, GATEWAYD_TOKEN=ADMIN)
    chat = subprocess.Popen(
        [sys.executable, "-m", "gatewayd.ctl", "chat", '/tool bash {"command": "echo hi"}'],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env,
        cwd=REPO,
    )
    try:
        pending: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while not pending and time.monotonic() < deadline:
            pending = ok_json(gateway, "approvals", "list", "--status", "pending")["approvals"]
            if not pending:
                time.sleep(0.05)
        assert len(pending) == 1 and pending[0]["tool"] == "bash"
        listing = ok(gateway, "approvals", "list")
        assert pending[0]["id"] in listing and "pending" in listing
        out = ok(gateway, "approvals", "approve", pending[0]["id"])
        assert out == f"{pending[0]['id']}: approved\n"
        stdout, stderr = chat.communicate(timeout=20)
        assert chat.returncode == 0, stderr
        assert stdout == "hi\n"
        assert "[approval needed: " in stderr and "[tool bash" in stderr
        code, out, err = ctl(
            "approvals", "deny", pending[0]["id"], "--reason", "late", url=gateway.url
        )
        assert code == 1 and "409" in err
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.communicate()
    # and a denial, with --json
    code, started = gateway.request(
        "POST", "/api/agent", {"message": '/tool bash {"command": "echo no"}'}
    )
    assert code == 202
    deadline = time.monotonic() + 20
    pending = []
    while not pending and time.monotonic() < deadline:
        pending = [
            a
            for a in ok_json(gateway, "approvals", "list", "--status", "pending")["approvals"]
            if a["run_id"] == started["run_id"]
        ]
        if not pending:
            time.sleep(0.05)
    denied = ok_json(gateway, "approvals", "deny", pending[0]["id"], "--reason", "not now")
    assert denied["status"] == "denied" and denied["reason"] == "not now"


def test_tokens_and_devices(gateway: Process) -> None:
    created = ok_json(gateway, "tokens", "create", "--role", "viewer", "--name", "ctl-viewer")
    assert created["role"] == "viewer" and created["token"]
    assert ok_json(gateway, "status", token=created["token"])["provider"] == "echo"
    code, out, err = ctl("tokens", "create", "--role", "chat", "--name", "t2", url=gateway.url)
    assert code == 0 and "token  " in out and "shown once" in err
    listing = ok(gateway, "tokens", "list")
    assert "ctl-viewer" in listing and listing.splitlines()[0].startswith("ID")
    ids = [t["id"] for t in ok_json(gateway, "tokens", "list")["tokens"]]
    assert created["id"] in ids
    assert ok(gateway, "tokens", "revoke", created["id"]) == f"revoked token {created['id']}\n"
    code, _, err = ctl("status", url=gateway.url, token=created["token"])
    assert code == 1 and "401" in err
    # devices: pair (a code), the device trades it, then revoke
    out = ok(gateway, "devices", "pair", "--name", "laptop")
    assert out.startswith("pairing code ")
    pair = ok_json(gateway, "devices", "pair", "--name", "phone", "--role", "viewer")
    code, device = gateway.request(
        "POST", "/pair", {"code": pair["code"], "name": "phone"}, token=None
    )
    assert code == 201
    listing = ok(gateway, "devices", "list")
    assert "phone" in listing
    assert any(
        d["id"] == device["device_id"] for d in ok_json(gateway, "devices", "list")["devices"]
    )
    assert ok_json(gateway, "devices", "revoke", device["device_id"]) == {
        "revoked": device["device_id"]
    }
    code, _, err = ctl("devices", "revoke", device["device_id"], url=gateway.url)
    assert code == 1


def test_cron(gateway: Process) -> None:
    out = ok(gateway, "cron", "add", "--name", "hourly", "--every", "3600", "--prompt", "ping")
    assert out.startswith("added job ")
    job = ok_json(
        gateway,
        "cron",
        "add",
        '{"name": "j2", "schedule": {"type": "cron", '
        '"expr": "0 3 * * *"}, "payload": {"type": "agentTurn", "prompt": "p"}}',
    )
    listing = ok(gateway, "cron", "list")
    assert "hourly" in listing and "j2" in listing
    jobs = ok_json(gateway, "cron", "list")["jobs"]
    assert {j["name"] for j in jobs} >= {"hourly", "j2"}
    started = ok_json(gateway, "cron", "run", job["id"])
    assert started["run_id"]
    assert "started run " in ok(gateway, "cron", "run", job["id"])
    deadline = time.monotonic() + 10
    runs: list[Any] = []
    while time.monotonic() < deadline:
        runs = ok_json(gateway, "cron", "runs", job["id"])["runs"]
        if len(runs) == 2 and all(r.get("finished_at") for r in runs):
            break
        time.sleep(0.05)
    assert len(runs) == 2
    assert "RUN_ID" in ok(gateway, "cron", "runs", job["id"])
    assert ok(gateway, "cron", "remove", job["id"]) == f"removed job {job['id']}\n"
    assert ok_json(gateway, "cron", "remove", jobs[0]["id"]) == {"removed": jobs[0]["id"]}
    code, _, err = ctl("cron", "add", "--name", "x", "--prompt", "p", url=gateway.url)
    assert code == 2 and "exactly one of" in err
    code, _, err = ctl("cron", "add", "--every", "0", "--prompt", "p", url=gateway.url)
    assert code == 1 and "400" in err


def test_config_logs_backup(gateway: Process) -> None:
    config = ok_json(gateway, "config", "get")
    assert all(k["key"] == "***" for k in config["gateway"]["api_keys"])
    assert json.loads(ok(gateway, "config", "get")) == config
    out = ok(gateway, "config", "patch", '{"agent": {"system_prompt": "from ctl"}}', "--dry-run")
    assert "agent.system_prompt: - -> from ctl" in out or "agent.system_prompt:" in out
    assert "(dry run" in out
    assert ok_json(gateway, "config", "get")["agent"]["system_prompt"] == ""
    result = ok_json(gateway, "config", "patch", '{"agent": {"system_prompt": "from ctl"}}')
    assert result == {"applied": ["agent.system_prompt"], "restart_required": []}
    out = ok(gateway, "config", "patch", '{"agent": {"system_prompt": null}}')
    assert "applied: agent.system_prompt" in out
    code, _, err = ctl("config", "patch", '{"agent": {"nope": 1}}', url=gateway.url)
    assert code == 1 and "agent.nope" in err
    code, _, err = ctl("config", "patch", '{"a": 1}', "--if-match", '"stale"', url=gateway.url)
    assert code == 1 and "412" in err
    code, _, err = ctl("config", "patch", "not json", url=gateway.url)
    assert code == 2
    # logs: the tail, readable and as JSON lines
    out = ok(gateway, "logs", "--lines", "5")
    lines = out.splitlines()
    assert len(lines) == 5 and all(" info " in ln or " warn " in ln for ln in lines)
    raw = ok(gateway, "--json", "logs", "-n", "3").splitlines()
    assert len(raw) == 3 and all("log_time" in json.loads(ln) for ln in raw)
    code, _, err = ctl("logs", url=gateway.url, token=VIEWER)
    assert code == 1 and "403" in err
    # backup: a real SQLite file in the state dir
    backup = ok_json(gateway, "backup")
    assert backup["path"].startswith(gateway.state_dir) and backup["bytes"] > 0
    import sqlite3

    with sqlite3.connect(backup["path"]) as db:
        assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] >= 1
    assert ok(gateway, "backup").startswith("backup written to ")


def test_logs_follow(gateway: Process) -> None:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAYD_")}
    child_env.update(GATEWAYD_URL=gateway.url, GATEWAYD_TOKEN=ADMIN)
    # as from a terminal: a shell's background job inherits SIGINT ignored, and Python then
    # never turns it into KeyboardInterrupt, so the child sets Ctrl-C's usual meaning itself
    ctrl_c = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv = ['gatewayctl'] + sys.argv[1:]; runpy.run_module('gatewayd.ctl', run_name='__main__')"
    )
    follow = subprocess.Popen(
        [sys.executable, "-c", ctrl_c, "logs", "--follow", "--lines", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env,
        cwd=REPO,
    )
    try:
        assert follow.stdout is not None
        first = follow.stdout.readline()
        assert first.strip()
        reader: list[str] = []

        def read() -> None:
            assert follow.stdout is not None
            for line in follow.stdout:
                reader.append(line)
                if "/api/status?from=follow-test" in line:
                    return

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while thread.is_alive() and time.monotonic() < deadline:
            gateway.request("GET", "/api/status?from=follow-test")
            thread.join(0.2)
        assert any("/api/status?from=follow-test" in ln for ln in reader)
        follow.send_signal(signal.SIGINT)
        # keep reading as a terminal would: a child blocked on a full pipe cannot exit
        follow.communicate(timeout=10)
        assert follow.returncode in (0, 130)
    finally:
        if follow.poll() is None:
            follow.kill()
        follow.communicate()


def test_usage_auth_and_unreachable(gateway: Process, tmp_path: Any) -> None:
    code, _, err = ctl("frobnicate", url=gateway.url)
    assert code == 2 and "invalid choice" in err
    code, _, _ = ctl(url=gateway.url)
    assert code == 2
    code, _, _ = ctl("tokens", "create", "--name", "x", url=gateway.url)
    assert code == 2
    code, _, _ = ctl("--url", "ftp://x", "status")
    assert code == 2
    code, _, err = ctl("tokens", "list", url=gateway.url, token=VIEWER)
    assert code == 1 and "403 forbidden" in err
    code, _, err = ctl("status", url=gateway.url, token="wrong-token-0123456789abcdef")
    assert code == 1 and "401 unauthorized" in err
    code, out, err = ctl("--json", "status", url=gateway.url, token=None)
    assert code == 1 and json.loads(out)["error"]["status"] == 401
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (("status",), ("--json", "health"), ("chat", "hi"), ("logs",)):
        code, _, err = ctl(*args, url=dead)
        assert code == 3 and "cannot reach" in err, args
    # the fallback token: $GATEWAYD_STATE_DIR/admin-token on this host
    state = tmp_path / "state"
    state.mkdir()
    (state / "admin-token").write_text(ADMIN + "\n")
    code, out, err = ctl(
        "--json", "status", url=gateway.url, token=None, env={"GATEWAYD_STATE_DIR": str(state)}
    )
    assert code == 0 and json.loads(out)["provider"] == "echo"
    # --url and --token beat the environment
    code, out, _ = ctl(
        "--url",
        gateway.url,
        "--token",
        ADMIN,
        "--json",
        "status",
        url=dead,
        token="bad-token-0123456789abcdefgh",
    )
    assert code == 0


class _Stub(BaseHTTPRequestHandler):
    """A gateway without /api/chat/stream (older), and one that fails with 500."""

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/api/chat/stream":
            self._send(404, {"error": {"code": "not_found", "message": "no such route"}})
        elif self.path == "/api/chat":
            self._send(
                200,
                {
                    "session_id": "s",
                    "run_id": "r",
                    "response": body["message"],
                    "tools_used": [],
                    "tokens": {"input": 1, "output": 1},
                    "cost_cents": 0,
                },
            )
        else:
            self._send(500, {"error": {"code": "internal", "message": "internal error"}})

    def do_GET(self) -> None:  # noqa: N802
        self._send(500, {"error": {"code": "internal", "message": "internal error"}})

    def _send(self, status: int, obj: Any) -> None:
        raw = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: Any) -> None:
        pass


def test_chat_falls_back_without_the_stream_route() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, out, err = ctl("chat", "plain answer", url=url)
        assert code == 0 and out == "plain answer\n", err
        code, out, _ = ctl("--json", "chat", "x", url=url)
        assert code == 0 and json.loads(out)["response"] == "x"
        code, _, err = ctl("status", url=url)
        assert code == 1 and "500 internal" in err
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
