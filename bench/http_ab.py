"""POST /api/chat: this tree against another build of gatewayd, interleaved, with the baseline.

    python bench/http_ab.py --other /path/to/other/.venv/bin/twistd [--rounds 4] [--duration 5]

The machine's speed drifts by ±15% within minutes, so one run of each side says little about
a change of a few percent.  This starts the bare twisted.web baseline and both gateways at
once and drives them in turn with `wrk` for several rounds (alternating which gateway goes
first), then prints each round and the medians: chats/s, the ratio against the baseline and
A/B (this tree over the other; the median of the rounds' own A/B is the steadier figure,
since both sides of a round ran within seconds of each other).  To build the other side, e.g. the previous commit:

    git worktree add /tmp/other HEAD~1 && python3.11 -m venv /tmp/other/.venv
    /tmp/other/.venv/bin/pip install -e /tmp/other --config-settings editable_mode=strict
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from common import free_port, wait_up
from http_bench import LUA, TOKEN, wrk

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = (
    f'[[gateway.api_keys]]\nkey = "{TOKEN}"\nrole = "admin"\n'
    "[gateway.rate_limit]\nrate_per_s = 1000000\nburst = 1000000\n"
    "[agent]\nmax_queue_per_session = 100000\n"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", required=True, help="the other build's twistd")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    this = os.path.join(os.path.dirname(sys.executable), "twistd")
    tmp = tempfile.mkdtemp(prefix="gatewayd-ab-")
    lua = os.path.join(tmp, "chat.lua")
    with open(lua, "w") as f:
        f.write(LUA % TOKEN)
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    try:
        port = free_port()
        procs.append(
            subprocess.Popen([sys.executable, os.path.join(HERE, "baseline_server.py"), str(port)])
        )
        wait_up(f"http://127.0.0.1:{port}/health", procs[-1])
        urls["base"] = f"http://127.0.0.1:{port}/api/chat"
        for name, twistd in (("A", this), ("B", args.other)):
            state = tempfile.mkdtemp(prefix=f"gatewayd-ab-{name}-")
            config = os.path.join(state, "gatewayd.toml")
            with open(config, "w") as f:
                f.write(CONFIG)
            port = free_port()
            argv = [twistd, "--pidfile=", "-n", "gateway", "--state-dir", state, "--config",
                    config, "--listen", f"tcp:{port}:interface=127.0.0.1"]
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            wait_up(f"http://127.0.0.1:{port}/health", procs[-1])
            urls[name] = f"http://127.0.0.1:{port}/api/chat"
        for url in urls.values():
            wrk(url, 1, args.connections, lua)  # warm-up
        rps: dict[str, list[float]] = {name: [] for name in urls}
        p99: dict[str, list[float]] = {name: [] for name in urls}
        for r in range(args.rounds):
            for name in ("base", "A", "B") if r % 2 == 0 else ("base", "B", "A"):
                got = wrk(urls[name], args.duration, args.connections, lua)
                rps[name].append(got[0])
                p99[name].append(got[1])
            base, a, b = rps["base"][-1], rps["A"][-1], rps["B"][-1]
            print(f"round {r + 1}: baseline {base:.0f}  A {a:.0f} ({a / base:.3f})  "
                  f"B {b:.0f} ({b / base:.3f})  A/B {a / b:.3f}  "
                  f"p99 ms: A {p99['A'][-1]:.1f} B {p99['B'][-1]:.1f}", flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
    base, a, b = (statistics.median(rps[name]) for name in ("base", "A", "B"))
    paired = statistics.median(x / y for x, y in zip(rps["A"], rps["B"], strict=True))
    print(f"median: baseline {base:.0f}  A {a:.0f} ({a / base:.3f})  B {b:.0f} ({b / base:.3f})"
          f"  A/B of the medians {a / b:.3f}, median A/B of a round {paired:.3f}")
    print(f"median p99: baseline {statistics.median(p99['base']):.1f} ms  "
          f"A {statistics.median(p99['A']):.1f} ms  B {statistics.median(p99['B']):.1f} ms")


if __name__ == "__main__":
    main()
