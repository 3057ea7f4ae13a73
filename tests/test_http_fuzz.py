"""Hypothesis fuzzes the request head of a real ``twistd gateway``: never a 5xx, never stuck.

Each example opens a connection, sends a generated head (and maybe a body), half-closes, and
reads until the server closes, bounded by a timeout: every input must end in answers without
a 5xx (or in a silent close), and promptly.  Afterwards the server is still healthy and its
logs hold no traceback.  The ``@given`` function is plain and called from an ordinary test
(pytest-twisted and parametrized ``@given`` do not mix).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import ADMIN, TOKENS_TOML, Process, spawn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")

CONFIG = (
    """
[gateway]
header_timeout_s = 2
request_timeout_s = 5
[gateway.rate_limit]
rate_per_s = 100000
burst = 100000
"""
    + TOKENS_TOML
)

PATHS = [
    b"/",
    b"/health",
    b"/api/health",
    b"/api/status",
    b"/api/chat",
    b"/api/sessions",
    b"/api/sessions/abc/history",
    b"/api/tokens",
    b"/api/devices",
    b"/pair",
    b"/api/activity?limit=5",
    b"/api/activity?limit=-1",
    b"/api/runs/%00",
    b"/admin/paircode",
    b"/v1/models",
    b"/api/events",
    b"/ws",
    b"*",
    b"http://127.0.0.1/api/status",
    b"/api/status?token=x&ticket=y",
]
METHODS = [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS", b"get", b"BREW"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 extra", b"", b"FTP/1"]
HEADER_NAMES = [
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Expect",
    b"Authorization",
    b"Connection",
    b"Content-Type",
    b"Origin",
    b"X-Forwarded-For",
    b"Upgrade",
    b"Accept",
    b"Cookie",
]
VALUES = [
    b"0",
    b"5",
    b"-1",
    b"99999999999999999999",
    b"chunked",
    b"gzip, chunked",
    b"100-continue",
    b"Bearer " + ADMIN.encode(),
    b"Bearer \xff\xfe",
    b"Basic abc",
    b"close",
    b"keep-alive",
    b"application/json",
    b"websocket",
    b"text/event-stream",
    b"https://evil.example",
    b"127.0.0.1",
    b"",
]

token = st.binary(min_size=0, max_size=12)
header = st.tuples(
    st.one_of(st.sampled_from(HEADER_NAMES), token), st.one_of(st.sampled_from(VALUES), token)
)
heads = st.builds(
    lambda method, path, version, headers, eol, body, tail: (
        method
        + b" "
        + path
        + (b" " + version if version else b"")
        + eol
        + b"".join(n + b": " + v + eol for n, v in headers)
        + eol
        + body
        + tail
    ),
    st.one_of(st.sampled_from(METHODS), token),
    st.one_of(st.sampled_from(PATHS), st.binary(min_size=0, max_size=40)),
    st.sampled_from(VERSIONS),
    st.lists(header, max_size=8),
    st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n"]),
    st.one_of(
        st.just(b""),
        st.binary(max_size=64),
        st.just(b'{"message": "hi"}'),
        st.just(b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    st.one_of(st.just(b""), st.just(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")),
)
garbage = st.binary(min_size=1, max_size=300)


def exchange(port: int, data: bytes, timeout: float = 8.0) -> tuple[bytes, bool]:
    """Send, half-close, read to EOF; (everything read, whether the server closed in time)."""
    deadline = time.monotonic() + timeout
    got = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            return b"", True  # the server already dropped us: not stuck
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"".join(got), False
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return b"".join(got), False
            except OSError:
                return b"".join(got), True
            if not chunk:
                return b"".join(got), True
            got.append(chunk)


def check(port: int, data: bytes) -> None:
    data = data.replace(b"/admin/shutdown", b"/admin/nothing")
    reply, closed = exchange(port, data)
    assert closed, f"connection stuck for {data[:200]!r}"
    for status in STATUS.findall(reply):
        assert not status.startswith(b"5"), (status, data[:200], reply[:300])
    assert b"Traceback" not in reply


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    path = os.environ.get("PYTHONPATH", "")
    env = {"PYTHONPATH": REPO + (os.pathsep + path if path else "")}
    proc = spawn(str(tmp_path_factory.mktemp("fuzz")), config_text=CONFIG, env=env)
    try:
        yield proc
    finally:
        proc.terminate()


def fuzz_heads(port: int) -> None:
    @settings(
        max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(heads)
    def one(data: bytes) -> None:
        check(port, data)

    one()


def fuzz_garbage(port: int) -> None:
    @settings(
        max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(garbage)
    def one(data: bytes) -> None:
        check(port, data)

    one()


def test_fuzzed_request_heads_never_crash_or_hang(server: Process) -> None:
    fuzz_heads(server.port)
    fuzz_garbage(server.port)
    assert server.request("GET", "/api/status")[0] == 200
    logs = server.output()
    for name in os.listdir(server.state_dir):
        if name.startswith("gatewayd.log"):
            with open(
                os.path.join(server.state_dir, name), encoding="utf-8", errors="replace"
            ) as f:
                logs += f.read()
    assert "Traceback" not in logs and "Unhandled" not in logs, logs[-3000:]


def test_known_edge_cases(server: Process) -> None:
    port = server.port
    cases: list[Any] = [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\r\n\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
        b"POST /api/chat HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        b"GET /health HTTP/1.1\r\nHost: a\r\n folded: header\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHo\x00st: a\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\n\r\n",
        b"GET /api/sessions?limit=%ff HTTP/1.1\r\nAuthorization: Bearer "
        + ADMIN.encode()
        + b"\r\n\r\n",
        b"POST /api/chat HTTP/1.1\r\nAuthorization: Bearer "
        + ADMIN.encode()
        + b"\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd\xfc",
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ]
    for data in cases:
        check(port, data)
    assert server.request("GET", "/health", token=None)[0] == 200
