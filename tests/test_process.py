"""The real ``twistd gateway`` process: packaging, start-up, config errors, crash and drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from tests.harness import TOKENS_TOML, TWISTD, free_port, spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plugin_is_found() -> None:
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    names = [p.tapname for p in getPlugins(IServiceMaker)]
    assert "gateway" in names


def test_twistd_lists_the_plugin_from_outside_the_repo(tmp_path: Any) -> None:
    out = subprocess.run(
        [TWISTD, "--help"], cwd=str(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert " gateway " in out.stdout
    out = subprocess.run(
        [TWISTD, "gateway", "--help"], cwd=str(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert "--listen" in out.stdout and "--state-dir" in out.stdout


def test_plugin_file_imports_nothing_heavy() -> None:
    code = (
        "import sys, importlib.util;"
        f"spec = importlib.util.spec_from_file_location('p', {ROOT!r} + "
        "'/twisted/plugins/gatewayd_plugins.py');"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        "bad = [n for n in ('klein', 'twisted.internet.reactor', 'OpenSSL', 'autobahn')"
        " if n in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def _config_error(
    tmp_path: Any, text: str | None, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    argv = [
        TWISTD,
        "--pidfile=",
        "-n",
        "gateway",
        "--state-dir",
        str(tmp_path / "state"),
        "--listen",
        f"tcp:{free_port()}:interface=127.0.0.1",
        *args,
    ]
    if text is not None:
        path = tmp_path / "bad.toml"
        path.write_text(text)
        argv += ["--config", str(path)]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAYD_")}
    child_env.update(env or {})
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=child_env, cwd=str(tmp_path)
    )
    return out.returncode, out.stderr.strip()


@pytest.mark.parametrize(
    "text, key",
    [
        ('[gateway]\nbody_limit_bytes = "lots"\n', "gateway.body_limit_bytes"),
        ("[gateway]\nbodylimit = 1\n", "gateway.bodylimit"),
        ('[agent]\napi_key = "${GATEWAYD_TEST_UNSET_VAR}"\n', "GATEWAYD_TEST_UNSET_VAR"),
        ("[gateway\n", "invalid TOML"),
        ('[agent]\nprovider = "gpt"\n', "agent.provider"),
        ('[webhooks.gh]\nscheme = "github"\n', "webhooks.gh.secret"),
        ('[gateway]\nlisten = ["nonsense:1"]\n', "gateway.listen"),
        ('[[gateway.api_keys]]\nkey = "short"\n', "gateway.api_keys[0].key"),
    ],
)
def test_config_errors_stop_startup_with_one_line(tmp_path: Any, text: str, key: str) -> None:
    args: tuple[str, ...] = ()
    if "listen" in text:
        # command-line listeners replace gateway.listen: let the config's one be used
        code, err = _config_error_no_listen(tmp_path, text)
    else:
        code, err = _config_error(tmp_path, text, *args)
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gatewayd: config error: ")
    assert key in lines[0]


def _config_error_no_listen(tmp_path: Any, text: str) -> tuple[int, str]:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    argv = [
        TWISTD,
        "--pidfile=",
        "-n",
        "gateway",
        "--state-dir",
        str(tmp_path / "s"),
        "--config",
        str(path),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    return out.returncode, out.stderr.strip()


def test_missing_config_file_is_one_line(tmp_path: Any) -> None:
    code, err = _config_error(tmp_path, None, "--config", str(tmp_path / "missing.toml"))
    assert code != 0 and len(err.splitlines()) == 1 and "missing.toml" in err


def test_generated_admin_token_printed_once_and_reused(tmp_path: Any) -> None:
    state = str(tmp_path / "state")
    p = spawn(state, config_text=None)
    try:
        token_path = os.path.join(state, "admin-token")
        assert oct(os.stat(token_path).st_mode & 0o777) == "0o600"
        token = open(token_path).read().strip()
        assert len(token) >= 43
        status, body = p.request("POST", "/api/token/validate", {}, token=token)
        assert status == 200 and body["role"] == "admin"
        status, body = p.request("POST", "/api/chat", {"message": "hi"}, token=token)
        assert status == 200 and body["response"] == "hi"
    finally:
        assert p.terminate() == 0
    first_out = p.output()
    assert first_out.count(token) == 1
    log = open(os.path.join(state, "gatewayd.log")).read()
    assert token not in log
    p2 = spawn(state, config_text=None)
    try:
        status, _ = p2.request("GET", "/api/status", token=token)
        assert status == 200
    finally:
        p2.terminate()
    assert token not in p2.output()


def test_cli_token_writes_no_admin_token_file(tmp_path: Any) -> None:
    state = str(tmp_path / "state")
    secret = "cli-token-abcdefghijklmnop"
    token_file = tmp_path / "tok"
    token_file.write_text(secret + "\n")
    p = spawn(state, "--token-file", str(token_file), config_text=None)
    try:
        status, body = p.request("POST", "/api/token/validate", {}, token=secret)
        assert status == 200 and body["role"] == "admin"
        assert not os.path.exists(os.path.join(state, "admin-token"))
    finally:
        p.terminate()


def test_chat_and_sessions_over_the_real_process(tmp_path: Any) -> None:
    p = spawn(str(tmp_path / "state"))
    try:
        status, body = p.request("POST", "/api/chat", {"message": "one two", "session_id": "s1"})
        assert status == 200 and body["response"] == "one two"
        status, body = p.request("GET", "/api/sessions")
        assert [s["id"] for s in body["sessions"]] == ["s1"]
        status, body = p.request("GET", "/api/sessions/s1/history")
        assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
        curl = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", p.url + "/api/sessions"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert curl.stdout == "401"
    finally:
        assert p.terminate() == 0


def test_kill_9_loses_no_acknowledged_message(tmp_path: Any) -> None:
    state = str(tmp_path / "state")
    p = spawn(state)
    acked: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                status, body = p.request(
                    "POST",
                    "/api/chat",
                    {"message": f"c{n} m{i}", "session_id": f"crash{n}"},
                    timeout=5,
                )
            except OSError:
                return
            if status == 200:
                with lock:
                    acked.append(body)
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = 200
        while True:
            with lock:
                if len(acked) >= deadline:
                    break
            if p.proc.poll() is not None:
                break
            threading.Event().wait(0.01)
        os.kill(p.proc.pid, signal.SIGKILL)
        p.proc.wait(10)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert len(acked) >= 200
    p2 = spawn(state)
    try:
        for n in range(4):
            status, body = p2.request("GET", f"/api/sessions/crash{n}/history")
            assert status == 200
            stored = {(m["role"], m["run_id"]) for m in body["messages"]}
            for ack in acked:
                if ack["session_id"] == f"crash{n}":
                    assert ("user", ack["run_id"]) in stored
                    assert ("assistant", ack["run_id"]) in stored
    finally:
        p2.terminate()


def test_sigterm_drains_and_marks_unfinished_runs_aborted(tmp_path: Any) -> None:
    state = str(tmp_path / "state")
    config = TOKENS_TOML + "[gateway]\nshutdown_grace_s = 0.5\n"
    p = spawn(state, config_text=config)
    # a run waiting for approval cannot finish by itself
    status, started = p.request(
        "POST", "/api/agent", {"message": '/tool bash {"command": "echo hi"}'}
    )
    assert status == 202
    for _ in range(100):
        status, run = p.request("GET", f"/api/runs/{started['run_id']}")
        if run["status"] == "awaiting_approval":
            break
        threading.Event().wait(0.02)
    assert run["status"] == "awaiting_approval"
    assert p.terminate() == 0
    p2 = spawn(state, config_text=config)
    try:
        status, run = p2.request("GET", f"/api/runs/{started['run_id']}")
        assert run["status"] == "aborted"
    finally:
        p2.terminate()


def test_runs_cut_by_a_crash_are_failed_at_next_start(tmp_path: Any) -> None:
    state = str(tmp_path / "state")
    p = spawn(state)
    status, started = p.request(
        "POST", "/api/agent", {"message": '/tool bash {"command": "echo hi"}'}
    )
    assert status == 202
    for _ in range(100):
        status, run = p.request("GET", f"/api/runs/{started['run_id']}")
        if run["status"] == "awaiting_approval":
            break
        threading.Event().wait(0.02)
    p.kill()
    p2 = spawn(state)
    try:
        status, run = p2.request("GET", f"/api/runs/{started['run_id']}")
        assert run["status"] == "failed"
    finally:
        p2.terminate()


def test_default_listen_is_loopback_18789() -> None:
    from gatewayd.config import Config

    assert Config().gateway.listen == ("tcp:18789:interface=127.0.0.1",)


def test_the_tac_runs_the_same_daemon(tmp_path: Any) -> None:
    """``twistd -ny tap/gateway.tac`` serves, reloads on SIGHUP and stops cleanly on SIGTERM,
    like ``twistd gateway``."""
    from tests.harness import Process, wait_healthy

    state = str(tmp_path / "state")
    os.makedirs(state)
    config = str(tmp_path / "gatewayd.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(TOKENS_TOML)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAYD_")}
    env.update(
        GATEWAYD_CONFIG=config,
        GATEWAYD_STATE_DIR=state,
        GATEWAYD_LISTEN=f"tcp:{port}:interface=127.0.0.1",
    )
    log_path = str(tmp_path / "twistd.out")
    tac = os.path.join(ROOT, "tap", "gateway.tac")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [TWISTD, "--pidfile=", "-ny", tac], stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=str(tmp_path),
        )
    p = Process(proc, port, state, log_path)
    try:
        wait_healthy(p)
        code, body = p.request("POST", "/api/chat", {"message": "from the tac"})
        assert code == 200 and body["response"] == "from the tac"
        proc.send_signal(signal.SIGHUP)  # the same reload as the plugin's
        deadline = time.monotonic() + 20
        while "SIGHUP: config reloaded" not in p.output():
            assert time.monotonic() < deadline and proc.poll() is None, p.output()
            time.sleep(0.05)
        assert p.request("GET", "/api/status")[0] == 200
        assert p.terminate() == 0
    finally:
        p.kill()


def test_the_daemon_settles_the_collector(tmp_path: Any) -> None:
    """Once ``makeService``'s tree is ready, the process freezes what it holds and raises the
    collector's thresholds (an embedded gateway leaves its host's collector alone)."""
    script = (
        "import gc, sys\n"
        "from twisted.internet import reactor\n"
        "from gatewayd.process import GC_THRESHOLDS\n"
        "from gatewayd.tap import Options, makeService, compose\n"
        "before = gc.get_threshold()\n"
        "o = Options()\n"
        "o.parseOptions(['--state-dir', sys.argv[1], '--listen', 'tcp:0:interface=127.0.0.1',\n"
        "                '--token', 'x' * 32])\n"
        "s = makeService(o, reactor)\n"
        "def ready(_):\n"
        "    settled = gc.get_threshold() == GC_THRESHOLDS and gc.get_freeze_count() > 1000\n"
        "    print('settled' if settled else f'not settled: {gc.get_threshold()}', before)\n"
        "    s.stopService().addBoth(lambda _: reactor.stop())\n"
        "s.ready.addCallback(ready)\n"
        "reactor.callWhenRunning(s.startService)\n"
        "reactor.run()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert out.stdout.strip().splitlines()[-1] == "settled (700, 10, 10)", out
