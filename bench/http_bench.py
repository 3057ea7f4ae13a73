"""GET /health and POST /api/chat (echo) on gatewayd vs a bare twisted.web server.

    python bench/http_bench.py [--duration 5] [--connections 32]

Starts both servers as separate processes on this machine, drives each in turn with `wrk`
(apt-get install wrk), and prints requests/s and p99 latency, each as a ratio against the
bare twisted.web baseline measured in the same invocation. For POST /api/chat it also checks
that every acknowledged chat was persisted (2 messages per chat in the SQLite store).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile

from common import free_port, wait_up

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "bench-admin-token-0123456789abcdef"
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
wrk.body = '{"message": "hello benchmark world"}'
"""


def wrk(url: str, duration: int, connections: int, script: str | None = None) -> tuple[float, float, int]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if script:
        argv[1:1] = ["-s", script]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out)
    assert p99, out
    value = float(p99.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        print(f"  warning: {non2xx.group(1)} non-2xx answers", file=sys.stderr)
    return rps, value, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gatewayd-bench-")
    lua = os.path.join(tmp, "chat.lua")
    with open(lua, "w") as f:
        f.write(LUA % TOKEN)
    base_port, gw_port = free_port(), free_port()
    base = subprocess.Popen([sys.executable, os.path.join(HERE, "baseline_server.py"),
                             str(base_port)])
    config = os.path.join(tmp, "gatewayd.toml")
    with open(config, "w") as f:
        f.write(f'[[gateway.api_keys]]\nkey = "{TOKEN}"\nrole = "admin"\n'
                "[gateway.rate_limit]\nrate_per_s = 1000000\nburst = 1000000\n"
                "[agent]\nmax_queue_per_session = 100000\n")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    gw = subprocess.Popen([twistd, "--pidfile=", "-n", "gateway", "--state-dir", tmp,
                           "--config", config, "--listen", f"tcp:{gw_port}:interface=127.0.0.1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(f"http://127.0.0.1:{base_port}/health", base)
        wait_up(f"http://127.0.0.1:{gw_port}/health", gw)
        results = {}
        for name, path, script in (("GET /health", "/health", None),
                                   ("POST /api/chat", "/api/chat", lua)):
            wrk(f"http://127.0.0.1:{base_port}{path}", 1, args.connections, script)  # warm-up
            b = wrk(f"http://127.0.0.1:{base_port}{path}", args.duration, args.connections, script)
            wrk(f"http://127.0.0.1:{gw_port}{path}", 1, args.connections, script)
            g = wrk(f"http://127.0.0.1:{gw_port}{path}", args.duration, args.connections, script)
            results[name] = (b, g)
        print(f"{'route':<16}{'baseline rps':>14}{'gatewayd rps':>14}{'ratio':>8}"
              f"{'base p99 ms':>13}{'gw p99 ms':>11}{'p99 ratio':>11}")
        for name, ((brps, bp99, _), (grps, gp99, _)) in results.items():
            print(f"{name:<16}{brps:>14.0f}{grps:>14.0f}{grps / brps:>8.2f}"
                  f"{bp99:>13.2f}{gp99:>11.2f}{gp99 / bp99:>11.2f}")
    finally:
        for proc in (base, gw):
            proc.send_signal(signal.SIGTERM)
        for proc in (base, gw):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    db = sqlite3.connect(os.path.join(tmp, "gatewayd.sqlite3"))
    messages = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    runs = db.execute("SELECT count(*) FROM runs WHERE status = 'completed'").fetchone()[0]
    print(f"persisted: {runs} completed runs, {messages} messages "
          f"({'every run has both messages' if messages == 2 * runs else 'MISMATCH'})")


if __name__ == "__main__":
    main()
