"""SIGTERM to a real ``twistd gateway`` while a chat streams over WebSocket (issue 9, §1).

The model (a local OpenAI-compatible stand-in) sends one word, then goes quiet. SIGTERM must
close the client's WebSocket with 1001, give the run ``shutdown_grace_s``, then abort it — and
the partial answer must be in the store when the gateway comes back.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.harness import ADMIN, TOKENS_TOML, spawn
from tests.standins import OpenAIStandIn, Stream, listen_standin, openai_chunk, stop_standin
from tests.wsclient import connect

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest_twisted.ensureDeferred
async def test_sigterm_during_a_streaming_chat(tmp_path: Any) -> None:
    standin = OpenAIStandIn()
    role = openai_chunk({"role": "assistant", "content": ""})
    word = openai_chunk({"content": "partial "})
    # one word, then silence: the stream stays open until the gateway hangs up
    standin.script.append(Stream([role, word], hold_open=True))
    port, base_url = listen_standin(standin)
    config = (
        TOKENS_TOML
        + "[gateway]\nshutdown_grace_s = 0.5\n"
        + f'[agent]\nprovider = "openai"\nmodel = "m"\nbase_url = "{base_url}"\n'
        + 'api_key = "sk-test"\nread_timeout_s = 60\n'
    )
    state = str(tmp_path / "state")
    env = {"PYTHONPATH": REPO}
    p = await deferToThread(spawn, state, config_text=config, env=env)
    try:
        client = await connect(p.url, token=ADMIN, protocols=["gatewayd.v1"])
        client.send({"type": "chat", "message": "tell me", "session_id": "sigterm", "id": "c1"})
        frames = []
        while True:
            frame = await client.recv()
            frames.append(frame)
            if frame["type"] == "delta":
                break
        assert frame["content"] == "partial "
        run_id = frame["run_id"]
        os.kill(p.proc.pid, signal.SIGTERM)
        _, code, _ = await client.closed
        assert code == 1001
        assert await deferToThread(p.terminate) == 0
    finally:
        p.kill()
    p2 = await deferToThread(spawn, state, config_text=config, env=env)
    try:
        status, run = await deferToThread(p2.request, "GET", f"/api/runs/{run_id}")
        assert status == 200 and run["status"] == "aborted"
        assert run["response"] == "partial "
        status, hist = await deferToThread(p2.request, "GET", "/api/sessions/sigterm/history")
        assert [(m["role"], m["content"]) for m in hist["messages"]] == [
            ("user", "tell me"),
            ("assistant", "partial "),
        ]
    finally:
        await deferToThread(p2.terminate)
        await stop_standin(port)
