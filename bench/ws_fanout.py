"""Fan-out of one event to 1,000 WebSocket subscribers: time until the last one has it.

    .venv/bin/python bench/ws_fanout.py [--subscribers 1000] [--events 50]

gatewayd: N typed connections on ``/ws`` each ``subscribe`` (all types); the server process
publishes a ``text_delta`` on its bus (driven over stdin, see ws_common.py), which reaches
every subscriber as ``{"type":"event","event":…}``.  Baseline: a bare Autobahn server that
frames the same JSON once (``prepareMessage``) and ``sendPreparedMessage``s it to every client.
Events are published one at a time, 100 ms apart; for each, the time from the publish call to
the moment the last of the N subscribers has read it (CLOCK_MONOTONIC is one clock for every
process on Linux).  p50/p99 per server and the ratio, in one invocation.  Bounded well under
two minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import select
import shutil
import socket
import tempfile
import threading
import time
from typing import Any

from common import free_port
from ws_common import (
    TOKEN,
    Server,
    client_frame,
    open_many,
    raise_nofile,
)

_ID = re.compile(rb'"id":(\d+)')


def collect(socks: list[socket.socket], expected: int, out: dict[int, list[float]]) -> None:
    """Read every socket until ``expected`` events reached all; per id: arrival times."""
    ep = select.epoll()
    by_fd = {}
    for s in socks:
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = s
    n = len(socks)
    complete = 0
    deadline = time.monotonic() + 60
    while complete < expected and time.monotonic() < deadline:
        for fd, _ in ep.poll(0.5, 4096):
            # small frames, 100 ms apart: a read holds whole frames, and the first "id" of
            # each is the event's (cheap parsing keeps this reader from being the bottleneck)
            data = by_fd[fd].recv(1 << 16)
            now = time.monotonic()
            for m in _ID.finditer(data):
                arrivals = out.setdefault(int(m.group(1)), [])
                arrivals.append(now)
                if len(arrivals) == n:
                    complete += 1
    ep.close()


def run(kind: str, subscribers: int, events: int) -> dict[str, float]:
    state = tempfile.mkdtemp(prefix="ws-fanout-")
    server = Server(kind, free_port(), state)
    try:
        gatewayd = kind == "gatewayd"
        socks = open_many(
            server.port,
            subscribers,
            path="/ws",
            token=TOKEN if gatewayd else None,
            protocol="gatewayd.v1" if gatewayd else None,
        )
        if gatewayd:
            sub = client_frame(b'{"type":"subscribe","types":["text_delta"]}')
            for s in socks:
                s.sendall(sub)
            for s in socks:
                s.settimeout(10)
                got = s.recv(4096)
                assert b"subscribed" in got, got
        arrivals: dict[int, list[float]] = {}
        reader = threading.Thread(target=collect, args=(socks, events, arrivals))
        reader.start()
        published: dict[str, float] = server.ask(f"publish {events} 0.1", timeout=90)["published"]
        reader.join(70)
        reach = []
        for event_id, t_pub in published.items():
            got = arrivals.get(int(event_id), [])
            if len(got) == subscribers:
                reach.append(max(got) - t_pub)
        for s in socks:
            s.close()
        reach.sort()
        return {
            "complete": len(reach) / events,
            "p50_ms": reach[len(reach) // 2] * 1000 if reach else float("nan"),
            "p99_ms": reach[min(len(reach) - 1, int(len(reach) * 0.99))] * 1000
            if reach
            else float("nan"),
        }
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=50)
    args = parser.parse_args()
    raise_nofile(args.subscribers * 2 + 200)
    results: dict[str, Any] = {
        kind: run(kind, args.subscribers, args.events) for kind in ("bare", "gatewayd")
    }
    print(f"one event to {args.subscribers} WebSocket subscribers ({args.events} events)")
    for kind, r in results.items():
        print(
            f"  {kind:9s} time to reach all: p50 {r['p50_ms']:6.1f} ms  "
            f"p99 {r['p99_ms']:6.1f} ms  (events reaching everyone: {r['complete']:.0%})"
        )
    g, b = results["gatewayd"], results["bare"]
    print(
        f"  gatewayd/bare: p50 {g['p50_ms'] / b['p50_ms']:.2f}x  p99 {g['p99_ms'] / b['p99_ms']:.2f}x"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
