"""Time to first token: what gatewayd adds to a streamed ``/v1/chat/completions``.

    python bench/openai_ttft.py [--requests 300] [--delay-ms 20]

A stand-in OpenAI-compatible server (``tests/standins.py``, in its own process) answers every
streamed chat completion with the role chunk at once and the first content ``--delay-ms``
later.  gatewayd runs as a real ``twistd -n gateway`` process with ``provider = "openai"``
pointed at the stand-in.  One keep-alive client then alternates between asking the stand-in
directly and asking gatewayd (``stream: true``), timing each request from just before it is
sent to the arrival of the first non-empty content delta.  The gateway's cost is the paired
difference (through gatewayd minus direct), whose median is compared with the 2 ms goal.
Alternating, on the same connection kind and the same client code, keeps the machine's noise
out of the difference.  Bounded well under two minutes at the defaults.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from common import free_port, wait_up

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOKEN = "bench-chat-token-0123456789abcdefgh"
UPSTREAM_KEY = "sk-bench-standin"
MODEL = "gpt-standin"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


# -- the stand-in, in its own process ---------------------------------------------------------


def run_standin(delay_s: float) -> None:
    """Serve the stand-in on a free loopback port; print the port; run until killed."""
    sys.path.insert(0, REPO)
    from twisted.internet import reactor

    from tests.standins import (
        OpenAIStandIn,
        Reply,
        Stream,
        listen_standin,
        openai_chunk,
        openai_text_chunks,
    )

    class Delayed(OpenAIStandIn):
        """Every chat completion: the role chunk now, the rest ``delay_s`` later."""

        def canned(self, rec: Any) -> Reply:
            if rec.path != self.main_route:
                return super().canned(rec)
            role = openai_chunk({"role": "assistant", "content": "", "refusal": None})
            rest = b"".join(openai_text_chunks("Hello there, benchmark.")[1:])
            return Stream([role, rest], gap_s=delay_s)

    standin = Delayed(api_key=UPSTREAM_KEY)
    standin.requests = _Forgetful()
    port, _ = listen_standin(standin, reactor)
    print(port.getHost().port, flush=True)
    reactor.run()  # type: ignore[attr-defined]


class _Forgetful(list[Any]):
    """The stand-in records every request; a benchmark must not grow without bound."""

    def append(self, item: Any) -> None:
        pass


# -- the client ---------------------------------------------------------------------------------


def first_token_s(conn: http.client.HTTPConnection, path: str, body: bytes, token: str) -> float:
    """Seconds from sending the request to the first non-empty content delta; the whole
    answer is then read so the connection can be used again."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    start = time.perf_counter()
    conn.request("POST", path, body, headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"{path}: HTTP {resp.status}: {resp.read()[:300]!r}")
    first: float | None = None
    while True:
        line = resp.readline()
        if not line:
            break
        if first is None and line.startswith(b"data: {"):
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                first = time.perf_counter() - start
        if line.startswith(b"data: [DONE]"):
            break
    resp.read()
    if first is None:
        raise SystemExit(f"{path}: the stream had no content")
    return first


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300, help="measured requests per target")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--delay-ms", type=float, default=20.0, help="the stand-in's own TTFT")
    ap.add_argument("--standin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.standin:
        run_standin(args.delay_ms / 1000)
        return

    tmp = tempfile.mkdtemp(prefix="gatewayd-ttft-")
    standin = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--standin", "--delay-ms", str(args.delay_ms)],
        stdout=subprocess.PIPE,
    )
    gateway: subprocess.Popen[bytes] | None = None
    try:
        assert standin.stdout is not None
        standin_port = int(standin.stdout.readline())
        gw_port = free_port()
        config = os.path.join(tmp, "gatewayd.toml")
        with open(config, "w") as f:
            f.write(
                f'[[gateway.api_keys]]\nkey = "{TOKEN}"\nrole = "chat"\nname = "bench"\n'
                f'[agent]\nprovider = "openai"\nmodel = "{MODEL}"\n'
                f'base_url = "http://127.0.0.1:{standin_port}/v1"\napi_key = "{UPSTREAM_KEY}"\n'
            )
        log = open(os.path.join(tmp, "twistd.out"), "wb")  # noqa: SIM115 (the child writes it)
        gateway = subprocess.Popen(
            [
                TWISTD,
                "--pidfile=",
                "-n",
                "gateway",
                "--config",
                config,
                "--state-dir",
                tmp,
                "--listen",
                f"tcp:{gw_port}:interface=127.0.0.1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        wait_up(f"http://127.0.0.1:{gw_port}/health", gateway)

        body = json.dumps(
            {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        ).encode()
        direct = http.client.HTTPConnection("127.0.0.1", standin_port, timeout=10)
        via = http.client.HTTPConnection("127.0.0.1", gw_port, timeout=10)
        path = "/v1/chat/completions"
        for _ in range(args.warmup):
            first_token_s(direct, path, body, UPSTREAM_KEY)
            first_token_s(via, path, body, TOKEN)
        d_times: list[float] = []
        g_times: list[float] = []
        started = time.monotonic()
        for i in range(args.requests):
            # alternate which goes first, so neither always follows the other
            if i % 2:
                g_times.append(first_token_s(via, path, body, TOKEN))
                d_times.append(first_token_s(direct, path, body, UPSTREAM_KEY))
            else:
                d_times.append(first_token_s(direct, path, body, UPSTREAM_KEY))
                g_times.append(first_token_s(via, path, body, TOKEN))
        elapsed = time.monotonic() - started
        added = [g - d for g, d in zip(g_times, d_times, strict=True)]

        def ms(v: float) -> str:
            return f"{v * 1000:7.2f} ms"

        print(
            f"stand-in TTFT set to {args.delay_ms:g} ms; {args.requests} requests each "
            f"({elapsed:.1f} s)"
        )
        print(f"{'':24}{'p50':>10}{'p90':>10}{'p99':>10}")
        for name, values in (
            ("direct to stand-in", d_times),
            ("through gatewayd", g_times),
            ("added (paired)", added),
        ):
            print(
                f"{name:24}" + "".join(f"{ms(percentile(values, q)):>10}" for q in (0.5, 0.9, 0.99))
            )
        p50_added = statistics.median(added)
        verdict = "meets" if p50_added < 0.002 else "MISSES"
        print(f"gatewayd adds {p50_added * 1000:.2f} ms at p50: {verdict} the < 2 ms goal")
        direct.close()
        via.close()
    except BaseException:
        print(f"(gatewayd's output: {tmp}/twistd.out)", file=sys.stderr)
        raise
    finally:
        for proc in (gateway, standin):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
