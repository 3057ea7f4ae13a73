"""SSE fan-out: 1,000 subscribers, a bare twisted.web SSE resource against gatewayd's /api/events.

    .venv/bin/python bench/sse_fanout.py [--subscribers 1000] [--rate 100] [--seconds 10]

Runs everything itself and exits in well under two minutes.  For each server, in turn:

1. the server starts in its own process (``serve baseline|gatewayd PORT``): the baseline is
   the naive resource (each event framed once, then ``Request.write`` to every subscriber);
   gatewayd is the real service tree from ``gatewayd.tap.compose`` with its own SSE code.
   The bench launcher adds an in-process publisher driven over stdin, so production code
   carries no bench hooks (gatewayd's events go through ``gw.bus.publish``, as ``text_delta``:
   the hot, unstored kind);
2. a load process (``load PORT N``) opens N subscriber sockets from one epoll loop with
   minimal parsing (frame ids only) and records, per event id, how many subscribers got it
   and when the last one did;
3. phase "single": 20 isolated events, 100 ms apart → time-to-reach-all p50/p99 (from the
   publish call to the moment the last of the N subscribers has read it);
4. phase "rate": ``--rate`` events/s for ``--seconds`` → delivered fraction (frames read by
   all subscribers within 1 s after the last publish / events × N), the server process's
   CPU% during the phase (utime+stime from /proc/<pid>/stat) and time-to-reach-all under load.

The figures are printed per server and as gatewayd/baseline ratios from this one invocation.
Clocks: publish and arrival times are CLOCK_MONOTONIC (``time.monotonic``), which is one
system-wide clock on Linux, so they compare across processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import common
from common import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKEN = "bench-token-0123456789abcdefghijklmnop"
DEADLINE_S = 110.0


# -- servers ---------------------------------------------------------------------------------------


def _publisher(publish: Any, reactor: Any) -> None:
    """Read phase commands on stdin; publish; answer each with a JSON line of publish times."""
    from twisted.internet import stdio
    from twisted.internet.task import LoopingCall
    from twisted.protocols.basic import LineReceiver

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            cmd, *args = line.decode().split()
            if cmd == "quit":
                reactor.stop()
                return
            count, interval = int(args[0]), float(args[1])
            times: dict[int, float] = {}
            start = time.monotonic()
            sent = [0]

            def tick() -> None:
                # catch up when late, so the offered rate holds even when the server lags
                due = min(count, int((time.monotonic() - start) / interval) + 1)
                while sent[0] < due:
                    now = time.monotonic()
                    times[publish(sent[0], now)] = now
                    sent[0] += 1
                if sent[0] >= count:
                    loop.stop()

            def done(_: Any) -> None:
                sys.stdout.write(json.dumps({"published": times}) + "\n")
                sys.stdout.flush()

            loop = LoopingCall(tick)
            loop.clock = reactor
            loop.start(interval).addCallback(done)

        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Commands(), reactor=reactor)


def serve_baseline(port: int) -> None:
    """The naive SSE resource: frame once per event, then Request.write to each subscriber."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    subscribers: set[Any] = set()

    class Events(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> Any:
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
            request.write(b"retry: 3000\n\n")
            subscribers.add(request)
            request.notifyFinish().addBoth(lambda _: subscribers.discard(request))
            return NOT_DONE_YET

    counter = iter(range(1, 1 << 62))

    def publish(n: int, now: float) -> int:
        event_id = next(counter)
        data = json.dumps(
            {
                "id": event_id,
                "type": "text_delta",
                "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "content": f"word{n} ",
            },
            separators=(",", ":"),
        ).encode()
        frame = b"id: %d\nevent: text_delta\ndata: %s\n\n" % (event_id, data)
        for request in list(subscribers):
            request.write(frame)
        return event_id

    root = Resource()
    api = Resource()
    root.putChild(b"api", api)
    api.putChild(b"events", Events())
    site = Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(port, site, backlog=2048, interface="127.0.0.1")  # type: ignore[attr-defined]
    _publisher(publish, reactor)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


def serve_gatewayd(port: int, state_dir: str) -> None:
    """The real gatewayd service tree; the launcher publishes on its bus."""
    from twisted.internet import reactor

    config = f"""
[gateway]
listen = ["tcp:{port}:interface=127.0.0.1:backlog=2048"]
max_streams_per_token = 5000
max_connections_per_ip = 5000
[gateway.rate_limit]
rate_per_s = 1000000
burst = 1000000
[[gateway.api_keys]]
key = "{TOKEN}"
role = "admin"
name = "bench"
"""

    def ready(gw: Any) -> None:
        def publish(n: int, now: float) -> int:
            return int(gw.bus.publish("text_delta", session_id="bench", content=f"word{n} ").id)

        _publisher(publish, reactor)
        sys.stdout.write("READY\n")
        sys.stdout.flush()

    common.serve_gatewayd(config, state_dir, ready)


# -- the load process ------------------------------------------------------------------------------

_ID = re.compile(rb"id: (\d+)\n")


def load(port: int, n: int) -> None:
    """N subscribers on one epoll loop; per event id: subscribers reached, last arrival."""
    request = (
        b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n\r\n"
        % TOKEN.encode()
    )
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    carry: dict[int, bytes] = {}
    started: set[int] = set()
    refused: set[int] = set()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(request)
        s.setblocking(False)
        socks[s.fileno()] = s
        carry[s.fileno()] = b""
        ep.register(s.fileno(), select.EPOLLIN)
    stdin = sys.stdin.fileno()
    ep.register(stdin, select.EPOLLIN)
    counts: dict[int, int] = {}
    last: dict[int, float] = {}
    announced = False
    closed = 0
    line = b""
    while True:
        events = ep.poll(1.0)
        # the moment the loop saw the sockets readable: the data was there by then
        now = time.monotonic()
        for fd, _ in events:
            if fd == stdin:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return
                line += chunk
                while b"\n" in line:
                    cmd, line = line.split(b"\n", 1)
                    if cmd == b"quit":
                        return
                    if cmd == b"snapshot":
                        out = {"counts": counts, "last": last, "closed": closed}
                        sys.stdout.write(json.dumps(out) + "\n")
                        sys.stdout.flush()
                        counts, last = {}, {}
                continue
            s = socks[fd]
            try:
                data = s.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                ep.unregister(fd)
                closed += 1
                continue
            buf = carry[fd] + data
            cut = buf.rfind(b"\n\n")
            if cut < 0:
                carry[fd] = buf
                continue
            carry[fd] = buf[cut + 2 :]
            if fd not in started and fd not in refused:
                if not buf.startswith(b"HTTP/1.1 200"):
                    refused.add(fd)
                elif b"retry: 3000" in buf:
                    started.add(fd)
            for raw in _ID.findall(buf, 0, cut + 2):
                i = int(raw)
                counts[i] = counts.get(i, 0) + 1
                last[i] = now
        if not announced and len(started) + len(refused) == n:
            announced = True
            sys.stdout.write(f"CONNECTED {len(started)} REFUSED {len(refused)}\n")
            sys.stdout.flush()


# -- the orchestrator ------------------------------------------------------------------------------


class Proc:
    def __init__(self, argv: list[str], deadline: float) -> None:
        self.deadline = deadline
        self.p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        self._buf = b""

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def readline(self, timeout: float) -> str:
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        end = min(time.monotonic() + timeout, self.deadline)
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from " + " ".join(map(str, self.p.args)))
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"process exited: {self.p.args}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.send("quit")
                self.p.wait(5)
            except Exception:
                self.p.kill()
                self.p.wait(5)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def reach_all(published: dict[str, float], snap: dict[str, Any], n: int) -> list[float]:
    """Time from publish to the last subscriber, for the events every subscriber got."""
    counts, last = snap["counts"], snap["last"]
    return [last[i] - t for i, t in published.items() if counts.get(i, 0) >= n and i in last]


def run_one(kind: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    port = free_port()
    state = tempfile.mkdtemp(prefix="sse-bench-")
    me = [sys.executable, os.path.abspath(__file__)]
    argv = me + ["serve", kind, str(port)] + ([state] if kind == "gatewayd" else [])
    server = Proc(argv, deadline)
    loader = None
    try:
        if server.readline(30) != "READY":
            raise RuntimeError(f"{kind} did not start")
        loader = Proc(me + ["load", str(port), str(args.subscribers)], deadline)
        line = loader.readline(30)
        if line != f"CONNECTED {args.subscribers} REFUSED 0":
            raise RuntimeError(f"{kind}: {line}")
        n = args.subscribers
        # phase 1: isolated events
        server.send("go 20 0.1")
        single = json.loads(server.readline(20))["published"]
        time.sleep(0.5)
        loader.send("snapshot")
        lat1 = reach_all(single, json.loads(loader.readline(20)), n)
        # phase 2: a steady rate
        count = int(args.rate * args.seconds)
        cpu0, t0 = cpu_seconds(server.p.pid), time.monotonic()
        server.send(f"go {count} {1.0 / args.rate}")
        steady = json.loads(server.readline(args.seconds + 30))["published"]
        t1 = time.monotonic()
        time.sleep(1.0)
        cpu2, t2 = cpu_seconds(server.p.pid), time.monotonic()
        loader.send("snapshot")
        snap = json.loads(loader.readline(30))
        delivered = sum(min(c, n) for i, c in snap["counts"].items() if i in steady)
        lat2 = reach_all(steady, snap, n)
        return {
            "events": len(steady),
            "offered_rate": len(steady) / (t1 - t0),
            "delivered": delivered / (len(steady) * n),
            "cpu_pct": 100.0 * (cpu2 - cpu0) / (t2 - t0),
            "cpu_us_per_frame": 1e6 * (cpu2 - cpu0) / max(1, delivered),
            "single_p50_ms": 1000 * pct(lat1, 0.5),
            "single_p99_ms": 1000 * pct(lat1, 0.99),
            "single_reached_all": f"{len(lat1)}/{len(single)}",
            "load_p50_ms": 1000 * pct(lat2, 0.5),
            "load_p99_ms": 1000 * pct(lat2, 0.99),
            "dropped_subscribers": snap["closed"],
        }
    finally:
        if loader is not None:
            loader.stop()
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        if sys.argv[2] == "baseline":
            serve_baseline(int(sys.argv[3]))
        else:
            serve_gatewayd(int(sys.argv[3]), sys.argv[4])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        load(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median)")
    args = parser.parse_args()
    deadline = time.monotonic() + DEADLINE_S
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "gatewayd": []}
    for _ in range(args.rounds):  # interleaved, so a busy moment on the machine hits both
        for kind in runs:
            runs[kind].append(run_one(kind, args, deadline))
    base, gw = (_median(runs[k]) for k in ("baseline", "gatewayd"))
    print(
        f"SSE fan-out: {args.subscribers} subscribers, {args.rate:g} events/s for "
        f"{args.seconds:g} s; median of {args.rounds} interleaved rounds "
        f"(CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f})"
    )
    print(f"{'metric':24} {'baseline':>12} {'gatewayd':>12} {'ratio':>8}")
    for k in base:
        b, g = base[k], gw[k]
        if isinstance(b, float):
            ratio = g / b if b else float("nan")
            print(f"{k:24} {b:12.3f} {g:12.3f} {ratio:8.2f}")
        else:
            print(f"{k:24} {b!s:>12} {g!s:>12}")
    print(json.dumps(runs))


def _median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in rounds[0].items():
        if isinstance(v, float):
            values = sorted(r[k] for r in rounds)
            mid = len(values) // 2
            out[k] = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
        else:
            out[k] = " ".join(str(r[k]) for r in rounds)
    return out


if __name__ == "__main__":
    main()
