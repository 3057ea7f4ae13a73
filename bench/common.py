"""What every load script needs: a free loopback port, and waiting for a server to answer."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Poll ``url`` until it answers; give up if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early ({proc.returncode})")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def serve_gatewayd(config_text: str, state_dir: str, on_ready: Any) -> None:
    """Run the real gatewayd service tree in this process, as ``twistd gateway`` would (the
    daemon's process settings included), and call ``on_ready(gateway)`` once it serves; the
    load scripts publish on its bus from there.  Returns when the reactor stops."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from twisted.internet import reactor

    from gatewayd.config import parse_config
    from gatewayd.process import run_as_daemon
    from gatewayd.tap import compose

    service = compose(parse_config(config_text, {}), reactor=reactor, state_dir=state_dir)
    run_as_daemon(service, reactor)
    service.ready.addCallback(lambda _: on_ready(service.gateway))
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
