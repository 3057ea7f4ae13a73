"""Running real gateways for tests: in-process on port 0, or as a real ``twistd`` process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred

ADMIN = "test-admin-token-0123456789abcdef"
OPERATOR = "test-operator-token-0123456789abc"
CHAT = "test-chat-token-0123456789abcdefgh"
CHAT2 = "test-chat2-token-0123456789abcdefg"
VIEWER = "test-viewer-token-0123456789abcdef"

TOKENS_TOML = f"""
[[gateway.api_keys]]
key = "{ADMIN}"
role = "admin"
name = "admin"
[[gateway.api_keys]]
key = "{OPERATOR}"
role = "operator"
name = "operator"
[[gateway.api_keys]]
key = "{CHAT}"
role = "chat"
name = "chat"
[[gateway.api_keys]]
key = "{CHAT2}"
role = "chat"
name = "chat2"
[[gateway.api_keys]]
key = "{VIEWER}"
role = "viewer"
name = "viewer"
"""

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def auth(token: str) -> dict[bytes, list[bytes]]:
    return {b"Authorization": [f"Bearer {token}".encode()]}


@attrs.define
class Running:
    gateway: Any
    service: Any
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> Deferred[Any]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self.service.stopService()
        # the clients' keep-alive connections (treq's shared pool) go with the server
        from treq.api import get_global_pool

        pool = get_global_pool()
        if pool is not None:
            await pool.closeCachedConnections()


async def start_gateway(
    state_dir: str, config_text: str = TOKENS_TOML, *, env: Mapping[str, str] | None = None
) -> Running:
    """The real service tree from ``gatewayd.tap.compose``, listening on 127.0.0.1:0."""
    from twisted.internet import reactor

    from gatewayd.config import parse_config
    from gatewayd.tap import compose

    text = config_text
    if "listen" not in text:
        text = '[gateway]\nlisten = ["tcp:0:interface=127.0.0.1"]\n' + text
    config = parse_config(text, dict(env or os.environ))
    service = compose(config, reactor=reactor, state_dir=state_dir)
    service.startService()
    await service.ready
    listener = next(iter(service))
    port = await listener._waitingForPort
    return Running(service.gateway, service, port.getHost().port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class Process:
    """A real ``twistd -n gateway`` child; synchronous helpers for process-level tests."""

    proc: subprocess.Popen[bytes]
    port: int
    state_dir: str
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = ADMIN,
        timeout: float = 10,
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None

    def events(
        self,
        query: str,
        until: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 10,
        token: str = ADMIN,
    ) -> list[dict[str, Any]]:
        """Follow ``GET /api/events?<query>`` until ``until(envelopes so far)`` holds."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        try:
            conn.request(
                "GET", "/api/events?" + query, headers={"Authorization": f"Bearer {token}"}
            )
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            while not until(seen):
                assert time.monotonic() < deadline, f"gave up waiting; saw {seen}"
                line = resp.readline()
                assert line, f"the stream ended; saw {seen}"
                if line.startswith(b"data: "):
                    seen.append(json.loads(line[6:]))
            return seen
        finally:
            conn.close()

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait; 0 for a clean exit (twistd re-raises the signal: -15 is clean too)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return 0 if code == -signal.SIGTERM else code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def spawn(
    state_dir: str,
    *args: str,
    config_text: str | None = TOKENS_TOML,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    wait: bool = True,
) -> Process:
    """Start ``twistd -n gateway`` on a free loopback port and wait until /health answers."""
    os.makedirs(state_dir, exist_ok=True)
    port = free_port()
    argv = [
        TWISTD,
        "--pidfile=",
        "-n",
        "gateway",
        "--state-dir",
        state_dir,
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        *args,
    ]
    if config_text is not None:
        path = os.path.join(state_dir, "gatewayd.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config_text)
        argv += ["--config", path]
    log_path = os.path.join(state_dir, f"twistd-{port}.out")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAYD_")}
    child_env.update(env or {})
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=child_env, cwd=cwd or state_dir
        )
    p = Process(proc, port, state_dir, log_path)
    if wait:
        wait_healthy(p)
    return p


def wait_healthy(p: Process, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise RuntimeError(f"gateway exited {p.proc.returncode}:\n{p.output()}")
        try:
            with urllib.request.urlopen(p.url + "/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise RuntimeError(f"gateway did not become healthy:\n{p.output()}")


def run(coro: Any) -> Deferred[Any]:
    return ensureDeferred(coro)
