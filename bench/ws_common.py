"""What the WebSocket benchmarks share: the servers they start and a raw, cheap client.

Servers (each in its own process, started with ``python bench/ws_common.py serve KIND PORT``):

- ``gatewayd``: the real service tree from ``gatewayd.tap.compose`` (SQLite in a temporary
  state dir, echo provider), with the per-connection and per-token limits raised so the load
  itself is not refused; a stdin publisher publishes on ``gw.bus`` (fan-out) so production
  code carries no bench hooks;
- ``bare``: a bare Autobahn ``WebSocketServerFactory`` on TCP (no twisted.web, no auth) that
  echoes every message, and broadcasts a prepared message to every client when the stdin
  publisher says so.

Both print ``READY`` when listening.  The stdin publisher takes ``publish COUNT INTERVAL`` and
answers one JSON line ``{"published": {id: monotonic time}}``; ``rss`` answers ``{"rss_kib": n}``;
``quit`` stops the server.

The client side speaks RFC 6455 with raw sockets on one epoll loop: masked frames with a zero
mask key (legal, and it leaves the payload as it is), minimal parsing of server frames.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKEN = "bench-token-0123456789abcdefghijklmnop"


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, want))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss_kib(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- servers ---------------------------------------------------------------------------------------


def _stdin_commands(reactor: Any, publish: Any) -> None:
    from twisted.internet import stdio
    from twisted.internet.task import LoopingCall
    from twisted.protocols.basic import LineReceiver

    class Commands(LineReceiver):
        delimiter = b"\n"

        def answer(self, obj: Any) -> None:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

        def lineReceived(self, line: bytes) -> None:
            cmd, *args = line.decode().split()
            if cmd == "quit":
                reactor.stop()
            elif cmd == "rss":
                import gc

                gc.collect()
                self.answer({"rss_kib": rss_kib()})
            elif cmd == "publish":
                count, interval = int(args[0]), float(args[1])
                times: dict[int, float] = {}
                sent = [0]

                def tick() -> None:
                    now = time.monotonic()
                    times[publish(sent[0])] = now
                    sent[0] += 1
                    if sent[0] >= count:
                        loop.stop()

                loop = LoopingCall(tick)
                loop.clock = reactor
                loop.start(interval).addCallback(lambda _: self.answer({"published": times}))

        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Commands(), reactor=reactor)


def serve_gatewayd(port: int, state_dir: str) -> None:
    from twisted.internet import reactor

    config = f"""
[gateway]
listen = ["tcp:{port}:interface=127.0.0.1:backlog=4096"]
max_streams_per_token = 20000
max_connections = 20000
max_connections_per_ip = 20000
[gateway.rate_limit]
rate_per_s = 1000000
burst = 1000000
[gateway.ws_rate_limit]
max_messages = 1000000000
window_ms = 1000
[agent]
max_concurrent_runs = 128
[[gateway.api_keys]]
key = "{TOKEN}"
role = "admin"
name = "bench"
"""

    def ready(gw: Any) -> None:
        def publish(n: int) -> int:
            return int(gw.bus.publish("text_delta", session_id="bench", content=f"word{n} ").id)

        _stdin_commands(reactor, publish)
        sys.stdout.write("READY\n")
        sys.stdout.flush()

    common.serve_gatewayd(config, state_dir, ready)


def serve_bare(port: int) -> None:
    import txaio

    txaio.use_twisted()
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor

    clients: set[Any] = set()

    class Echo(WebSocketServerProtocol):
        def onOpen(self) -> None:
            clients.add(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(payload, isBinary)

        def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
            clients.discard(self)

    factory = WebSocketServerFactory()
    factory.protocol = Echo
    counter = iter(range(1, 1 << 62))

    def publish(n: int) -> int:
        event_id = next(counter)
        envelope = {
            "id": event_id,
            "type": "text_delta",
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "session_id": "bench",
            "content": f"word{n} ",
        }
        body = json.dumps({"type": "event", "event": envelope}, separators=(",", ":")).encode()
        prepared = factory.prepareMessage(body)
        for client in list(clients):
            client.sendPreparedMessage(prepared)
        return event_id

    reactor.listenTCP(port, factory, backlog=4096, interface="127.0.0.1")  # type: ignore[attr-defined]
    _stdin_commands(reactor, publish)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


class Server:
    """A server child process driven over its stdin."""

    def __init__(self, kind: str, port: int, state_dir: str) -> None:
        self.kind = kind
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "serve", kind, str(port), state_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        line = self._line(30)
        if line.strip() != "READY":
            raise RuntimeError(f"{kind} server did not start: {line!r}")

    def _line(self, timeout: float) -> str:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"{self.kind} server: no answer in {timeout} s")
        return self.proc.stdout.readline().decode()

    def ask(self, command: str, timeout: float = 60) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return json.loads(self._line(timeout))

    def stop(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.flush()
            self.proc.wait(15)
        except Exception:
            self.proc.kill()
            self.proc.wait(5)


# -- the raw client --------------------------------------------------------------------------------


def handshake_bytes(path: str, *, token: str | None, protocol: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(payload: bytes) -> bytes:
    """A masked text frame with a zero mask key (the payload stays as it is)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + b"\x00\x00\x00\x00" + payload


def split_frames(buf: bytes) -> tuple[list[bytes], bytes]:
    """Whole server frames' payloads, and the bytes left over."""
    out = []
    i = 0
    n = len(buf)
    while n - i >= 2:
        length = buf[i + 1] & 0x7F
        start = i + 2
        if length == 126:
            if n - i < 4:
                break
            length = int.from_bytes(buf[i + 2 : i + 4], "big")
            start = i + 4
        elif length == 127:
            if n - i < 10:
                break
            length = int.from_bytes(buf[i + 2 : i + 10], "big")
            start = i + 10
        if n < start + length:
            break
        out.append(buf[start : start + length])
        i = start + length
    return out, buf[i:]


def open_many(
    port: int, count: int, *, path: str, token: str | None, protocol: str | None, wave: int = 500
) -> list[socket.socket]:
    """Open ``count`` WebSockets (handshake complete) in waves; blocking, bounded."""
    import select

    socks: list[socket.socket] = []
    deadline = time.monotonic() + 90
    while len(socks) < count:
        batch = []
        for _ in range(min(wave, count - len(socks))):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(handshake_bytes(path, token=token, protocol=protocol))
            batch.append(s)
        pending = {s.fileno(): (s, b"") for s in batch}
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLIN)
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError("handshakes took too long")
            for fd, _ in poller.poll(5000):
                s, buf = pending[fd]
                buf += s.recv(4096)
                if b"\r\n\r\n" in buf:
                    if not buf.startswith(b"HTTP/1.1 101"):
                        raise RuntimeError(f"handshake refused: {buf[:80]!r}")
                    del pending[fd]
                    poller.unregister(fd)
                else:
                    pending[fd] = (s, buf)
        socks.extend(batch)
    return socks


def main() -> None:
    if len(sys.argv) >= 4 and sys.argv[1] == "serve":
        raise_nofile(20000)
        kind, port = sys.argv[2], int(sys.argv[3])
        if kind == "gatewayd":
            serve_gatewayd(port, sys.argv[4])
        else:
            serve_bare(port)
        return
    sys.exit("usage: ws_common.py serve gatewayd|bare PORT STATE_DIR")


if __name__ == "__main__":
    main()
