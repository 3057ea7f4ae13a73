"""RSS per idle authenticated WebSocket: gatewayd's /ws against a bare Autobahn server.

    .venv/bin/python bench/ws_memory.py [--connections 5000]

For each server in turn (its own process, see ws_common.py): measure its RSS, open N
WebSockets from this process (gatewayd: bearer header + ``gatewayd.v1``, so each is
authenticated and registered as a stream; bare: a plain Autobahn factory on TCP), let them sit,
measure again; (after - before) / N is the cost of one idle connection.  For gatewayd it then
sends one ``ping`` frame per connection (which allocates the rate window) and measures a third
time.  Raises ``ulimit -n`` itself; bounded well under two minutes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from common import free_port
from ws_common import Server, client_frame, open_many, raise_nofile


def measure(kind: str, n: int) -> dict[str, float]:
    state = tempfile.mkdtemp(prefix="ws-mem-")
    server = Server(kind, free_port(), state)
    try:
        # warm up: a few connections opened and closed, so one-off imports and caches are in
        warm = open_many(
            server.port, 50, path="/ws", token=ws_token(kind), protocol=ws_protocol(kind)
        )
        for s in warm:
            s.close()
        time.sleep(0.5)
        before = server.ask("rss")["rss_kib"]
        t0 = time.monotonic()
        socks = open_many(
            server.port, n, path="/ws", token=ws_token(kind), protocol=ws_protocol(kind)
        )
        opened_s = time.monotonic() - t0
        time.sleep(1.0)
        idle = server.ask("rss")["rss_kib"]
        out = {
            "open_s": opened_s,
            "idle_kib_per_conn": (idle - before) / n,
            "rss_before_mib": before / 1024,
            "rss_idle_mib": idle / 1024,
        }
        if kind == "gatewayd":
            ping = client_frame(b'{"type":"ping"}')
            for s in socks:
                s.sendall(ping)
            for s in socks:
                s.settimeout(10)
                s.recv(4096)
            used = server.ask("rss")["rss_kib"]
            out["after_ping_kib_per_conn"] = (used - before) / n
        for s in socks:
            s.close()
        return out
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


def ws_token(kind: str) -> str | None:
    from ws_common import TOKEN

    return TOKEN if kind == "gatewayd" else None


def ws_protocol(kind: str) -> str | None:
    return "gatewayd.v1" if kind == "gatewayd" else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=5000)
    args = parser.parse_args()
    raise_nofile(args.connections * 2 + 200)
    results = {kind: measure(kind, args.connections) for kind in ("bare", "gatewayd")}
    n = args.connections
    print(f"idle WebSocket connections: {n}")
    for kind, r in results.items():
        extra = ""
        if "after_ping_kib_per_conn" in r:
            extra = f", after one ping each {r['after_ping_kib_per_conn']:.1f} KiB"
        print(
            f"  {kind:9s} {r['idle_kib_per_conn']:.1f} KiB/connection idle{extra} "
            f"(RSS {r['rss_before_mib']:.0f} -> {r['rss_idle_mib']:.0f} MiB; "
            f"opened in {r['open_s']:.1f} s)"
        )
    ratio = results["gatewayd"]["idle_kib_per_conn"] / results["bare"]["idle_kib_per_conn"]
    print(f"  gatewayd/bare: {ratio:.2f}x")


if __name__ == "__main__":
    main()
