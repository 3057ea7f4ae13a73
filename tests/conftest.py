"""Shared fixtures. Deliberately imports no klein (it would install a reactor, DESIGN trap 2)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

os.environ.setdefault("GATEWAYD_STATE_DIR", tempfile.mkdtemp(prefix="gatewayd-test-state-"))


def _leftovers() -> list[str]:
    from twisted.internet import reactor

    calls = [
        c
        for c in reactor.getDelayedCalls()  # type: ignore[attr-defined]
        if c.active() and not _ignorable(c)
    ]
    return [repr(c) for c in calls]


def _ignorable(call: object) -> bool:
    text = repr(call)
    # the reactor's own thread-pool and signal bookkeeping, and HTTP keep-alive of clients
    return any(
        marker in text
        for marker in (
            "_ThreadPoolShutdown",
            "threadpool",
            "HTTPConnectionPool",
            "_removeConnection",
        )
    )


@pytest.fixture(autouse=True)
def _clean_reactor(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves pending DelayedCalls behind (DESIGN trap 7)."""
    before = set(_leftovers())
    yield
    if request.node.get_closest_marker("allow_leftovers"):
        return
    after = [c for c in _leftovers() if c not in before]
    if after:
        from twisted.internet import reactor

        for c in reactor.getDelayedCalls():  # type: ignore[attr-defined]
            if repr(c) in after:
                c.cancel()
        pytest.fail(f"test left {len(after)} pending DelayedCall(s): {after[:3]}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_leftovers: the test may leave DelayedCalls")
