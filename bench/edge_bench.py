"""The price of the edge: GET /api/status over plain TCP without the rate limiter (1.0), with
it, and over TLS (with it), as ratios measured in one invocation.

    python bench/edge_bench.py [--duration 4] [--rounds 3] [--connections 32]

One gatewayd process (``bench/edge_server.py``) serves three listeners over the same gateway:
its site as shipped (limiter on, at a rate high enough never to refuse) on plain TCP and on
``ssl:`` with a certificate made here, and a second site without the limiter on plain TCP.
One process, so allocation and scheduling differences between processes do not pose as the
limiter's cost; with ``taskset`` the server and ``wrk`` get a core each.  ``wrk`` (apt-get
install wrk) drives each in turn, round-robin, so drift hits every variant alike; the best
round of each counts.  The goal: the limiter costs under 10%.  Bounded: about a minute.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOKEN = "bench-admin-token-0123456789abcdef"
LUA = 'wrk.headers["Authorization"] = "Bearer %s"\n'


def make_cert(directory: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def start(state: str, listen: list[str], bare_port: int) -> subprocess.Popen[bytes]:
    os.makedirs(state, exist_ok=True)
    config = os.path.join(state, "gatewayd.toml")
    with open(config, "w") as f:
        f.write(
            "[gateway]\nlisten = [" + ", ".join(f'"{spec}"' for spec in listen) + "]\n"
            "[gateway.rate_limit]\nrate_per_s = 1000000000\nburst = 1000000000\n"
            f'[[gateway.api_keys]]\nkey = "{TOKEN}"\nrole = "admin"\n'
        )
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": REPO + (os.pathsep + path if path else "")}
    argv = [sys.executable, os.path.join(HERE, "edge_server.py"), state, config, str(bare_port)]
    proc = subprocess.Popen(
        pin(argv, 1), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        raise SystemExit(f"server did not start: {line!r}")
    return proc


def pin(argv: list[str], cpu: int) -> list[str]:
    """Run on one core when taskset is there and the machine has two or more."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def wrk(url: str, duration: int, connections: int, script: str) -> tuple[float, int]:
    argv = pin(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s", script, url], 0)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, int(bad.group(1)) if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gatewayd-edge-bench-")
    key, cert = make_cert(tmp)
    script = os.path.join(tmp, "auth.lua")
    with open(script, "w") as f:
        f.write(LUA % TOKEN)
    bare_port, tcp_port, tls_port = free_port(), free_port(), free_port()
    server = start(
        os.path.join(tmp, "state"),
        [
            f"tcp:{tcp_port}:interface=127.0.0.1",
            f"ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        ],
        bare_port,
    )
    variants = {
        "tcp, no limiter": f"http://127.0.0.1:{bare_port}/api/status",
        "tcp, limiter": f"http://127.0.0.1:{tcp_port}/api/status",
        "tls, limiter": f"https://127.0.0.1:{tls_port}/api/status",
    }
    best = dict.fromkeys(variants, 0.0)
    refused = dict.fromkeys(variants, 0)
    started = time.monotonic()
    try:
        for url in variants.values():
            wrk(url, 1, args.connections, script)  # warm-up
        for _ in range(args.rounds):
            for name, url in variants.items():
                rps, bad = wrk(url, args.duration, args.connections, script)
                best[name] = max(best[name], rps)
                refused[name] += bad
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    base = best["tcp, no limiter"]
    print(
        f"GET /api/status, {args.connections} connections, best of {args.rounds} x "
        f"{args.duration} s ({time.monotonic() - started:.0f} s in all)"
    )
    print(f"{'variant':<18}{'req/s':>10}{'ratio':>8}{'non-2xx':>9}")
    for name in variants:
        print(f"{name:<18}{best[name]:>10.0f}{best[name] / base:>8.3f}{refused[name]:>9}")
    cost = 1 - best["tcp, limiter"] / base
    print(f"limiter cost: {cost * 100:.1f}% (goal < 10%)")


if __name__ == "__main__":
    main()
