"""WebSocket chat round trips/s: gatewayd's typed ``chat`` against a bare Autobahn echo.

    .venv/bin/python bench/ws_chat.py [--seconds 8]

One round trip on gatewayd is a ``chat`` frame on ``/ws`` (``gatewayd.v1``) answered by its
``delta`` frame(s) and ``run_complete``: a real run of the echo provider, with the user and
assistant messages and the run stored in SQLite.  On the bare server it is one message and its
echo.  Each connection keeps one request in flight; sessions rotate every 50 messages so
history stays short.  Measured over 1 connection and over 64, each server in its own process
and the load here (raw sockets, one epoll loop), in one invocation so the ratios compare.
Bounded well under two minutes.
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import socket
import tempfile
import time

from common import free_port
from ws_common import TOKEN, Server, client_frame, cpu_seconds, open_many, split_frames


def run_load(server: Server, conns: int, seconds: float, what: str) -> dict[str, float]:
    gatewayd = server.kind == "gatewayd"
    chat = what == "chat"
    socks = open_many(
        server.port,
        conns,
        path="/ws",
        token=TOKEN if gatewayd else None,
        protocol="gatewayd.v1" if gatewayd else None,
    )
    by_fd: dict[int, socket.socket] = {s.fileno(): s for s in socks}
    carry = dict.fromkeys(by_fd, b"")
    sent = dict.fromkeys(by_fd, 0)
    ep = select.epoll()
    for fd, s in by_fd.items():
        s.setblocking(False)
        ep.register(fd, select.EPOLLIN)

    def request(fd: int) -> None:
        n = sent[fd]
        sent[fd] = n + 1
        if gatewayd and chat:
            body = json.dumps(
                {"type": "chat", "message": "hello", "session_id": f"b{fd}-{n // 50}"}
            ).encode()
        elif gatewayd:
            body = b'{"type":"ping","id":1}'
        else:
            body = b'{"type":"chat","message":"hello"}'
        by_fd[fd].send(client_frame(body))

    done = 0
    latencies: list[float] = []
    started_at = dict.fromkeys(by_fd, 0.0)
    cpu0 = cpu_seconds(server.proc.pid)
    t0 = time.monotonic()
    for fd in by_fd:
        started_at[fd] = time.monotonic()
        request(fd)
    end = t0 + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        for fd, _ in ep.poll(0.5):
            data = by_fd[fd].recv(65536)
            if not data:
                raise RuntimeError("the server closed a connection")
            frames, carry[fd] = split_frames(carry[fd] + data)
            for payload in frames:
                finished = (b'"run_complete"' in payload) if gatewayd and chat else True
                if b'"error"' in payload[:20]:
                    raise RuntimeError(f"error frame: {payload[:200]!r}")
                if finished:
                    t = time.monotonic()
                    done += 1
                    latencies.append(t - started_at[fd])
                    started_at[fd] = t
                    request(fd)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(server.proc.pid) - cpu0
    for s in socks:
        s.close()
    latencies.sort()
    return {
        "rps": done / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else 0.0,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0,
        "server_cpu": cpu / elapsed,
        "cpu_us": cpu / done * 1e6 if done else 0.0,
    }


def run_rest(server: Server, conns: int, seconds: float) -> dict[str, float]:
    """The same chat over ``POST /api/chat`` (keep-alive HTTP/1.1), for context."""
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(conns)]
    by_fd = {s.fileno(): s for s in socks}
    carry = dict.fromkeys(by_fd, b"")
    sent = dict.fromkeys(by_fd, 0)
    ep = select.epoll()
    for fd, s in by_fd.items():
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        ep.register(fd, select.EPOLLIN)

    def request(fd: int) -> None:
        n = sent[fd]
        sent[fd] = n + 1
        body = json.dumps({"message": "hello", "session_id": f"r{fd}-{n // 50}"}).encode()
        head = (
            f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        by_fd[fd].send(head + body)

    done = 0
    cpu0 = cpu_seconds(server.proc.pid)
    t0 = time.monotonic()
    for fd in by_fd:
        request(fd)
    end = t0 + seconds
    while time.monotonic() < end:
        for fd, _ in ep.poll(0.5):
            buf = carry[fd] + by_fd[fd].recv(65536)
            while True:
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if not sep:
                    break
                lower = head.lower()
                if b"content-length:" in lower:
                    length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n")[0])
                else:  # chunked: the body ends with the last (empty) chunk
                    end_at = rest.find(b"\r\n0\r\n\r\n")
                    length = -1 if end_at < 0 else end_at + 7
                if length < 0 or len(rest) < length:
                    break
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"REST chat failed: {head[:80]!r}")
                buf = rest[length:]
                done += 1
                request(fd)
            carry[fd] = buf
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(server.proc.pid) - cpu0
    for s in socks:
        s.close()
    return {"rps": done / elapsed, "server_cpu": cpu / elapsed, "cpu_us": cpu / done * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    results: dict[tuple[str, str, int], dict[str, float]] = {}
    rest: dict[int, dict[str, float]] = {}
    for kind, whats in (("bare", ("echo",)), ("gatewayd", ("chat", "ping"))):
        state = tempfile.mkdtemp(prefix="ws-chat-")
        server = Server(kind, free_port(), state)
        try:
            for what in whats:
                for conns in (1, 64):
                    results[(kind, what, conns)] = run_load(server, conns, args.seconds, what)
            if kind == "gatewayd":
                for conns in (1, 64):
                    rest[conns] = run_rest(server, conns, args.seconds)
        finally:
            server.stop()
            shutil.rmtree(state, ignore_errors=True)
    print("WebSocket round trips (gatewayd chat: chat -> delta + run_complete, a real run;")
    print("gatewayd ping: typed ping -> pong; bare: an Autobahn echo)")
    for (kind, what, conns), r in results.items():
        print(
            f"  {kind:8s} {what:4s} {conns:3d} conn: {r['rps']:7.0f}/s  "
            f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
            f"server CPU {r['server_cpu'] * 100:3.0f}% = {r['cpu_us']:6.0f} us/round trip"
        )
    for conns, r in rest.items():
        print(
            f"  gatewayd REST POST /api/chat {conns:2d} conn: {r['rps']:7.0f}/s  "
            f"server CPU {r['server_cpu'] * 100:3.0f}% = {r['cpu_us']:6.0f} us/round trip"
        )
    for what in ("chat", "ping"):
        for conns in (1, 64):
            mine, bare = results[("gatewayd", what, conns)], results[("bare", "echo", conns)]
            print(
                f"  gatewayd {what}/bare echo over {conns:2d} connection(s): "
                f"{mine['rps'] / bare['rps']:.2f}x round trips/s, "
                f"{mine['cpu_us'] / bare['cpu_us']:.1f}x server CPU per round trip"
            )


if __name__ == "__main__":
    main()
