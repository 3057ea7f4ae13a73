"""Real JavaScript clients against a real ``twistd -n gateway`` process: ``node --test tests/js/``.

The node tests (``ws`` for typed frames and JSON-RPC, ``eventsource`` for SSE resume, the
official ``openai`` package, and ``autobahn`` for WAMP) read ``GATEWAYD_URL`` and ``GATEWAYD_TOKEN`` (a chat token).
Skipped only when ``node`` is not installed; without ``node_modules`` this runs ``npm ci``
first (the lock file is committed), so in CI the clients always run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import pytest

from tests.harness import CHAT, spawn

JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
NODE = shutil.which("node")


def _ensure_modules() -> None:
    with open(os.path.join(JS_DIR, "package.json"), encoding="utf-8") as f:
        wanted = json.load(f).get("devDependencies", {})
    if all(os.path.isdir(os.path.join(JS_DIR, "node_modules", name)) for name in wanted):
        return
    npm = shutil.which("npm")
    assert npm is not None, "node is installed but npm is not"
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_js_clients(tmp_path: Any) -> None:
    _ensure_modules()
    gateway = spawn(str(tmp_path / "state"))
    try:
        env = {
            **os.environ,
            "GATEWAYD_URL": gateway.url,
            "GATEWAYD_TOKEN": CHAT,
            "NODE_NO_WARNINGS": "1",
        }
        tests = sorted(
            os.path.join(JS_DIR, name) for name in os.listdir(JS_DIR) if name.endswith(".test.mjs")
        )
        assert tests, "no JavaScript tests found"
        assert NODE is not None
        done = subprocess.run(
            [NODE, "--test", "--test-reporter=spec", *tests],
            cwd=JS_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        report = done.stdout + done.stderr
        assert done.returncode == 0, f"node --test failed:\n{report}\n{gateway.output()[-4000:]}"
    finally:
        gateway.terminate()
