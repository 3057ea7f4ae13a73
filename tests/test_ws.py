"""WebSocket /ws and /ws/chat over real loopback sockets, with an Autobahn (Twisted) client."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import treq

from gatewayd.auth import Principal, hash_token
from gatewayd.web import ws
from gatewayd.web.ws import RateWindow, factory_for, text_frame
from tests.harness import CHAT, CHAT2, OPERATOR, VIEWER, auth
from tests.wsclient import BASH, HandshakeRefused, connect, handshake, running

# -- pure parts ----------------------------------------------------------------------------


def test_text_frame_lengths() -> None:
    assert text_frame(b"x" * 125)[:2] == b"\x81\x7d"
    assert text_frame(b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert text_frame(b"x" * 65535)[:4] == b"\x81\x7e\xff\xff"
    big = text_frame(b"x" * 65536)
    assert big[:2] == b"\x81\x7f" and int.from_bytes(big[2:10], "big") == 65536


def test_rate_window_burst_limit_and_close() -> None:
    w = RateWindow(0.0)
    assert [w.hit(1.0, 3, 1000) for _ in range(3)] == [0, 0, 0]
    retry = w.hit(2.0, 3, 1000)
    assert 0 < retry <= 1000 + 1000
    assert w.hit(3.0, 3, 1000) > 0
    assert w.hit(4.0, 3, 1000) > 0
    assert w.hit(5.0, 3, 1000) == -1  # the 7th within one window: more than twice the limit


def test_rate_window_slides() -> None:
    w = RateWindow(0.0)
    for _ in range(3):
        assert w.hit(0.0, 3, 1000) == 0
    # the next window: the last one's 3 still weigh in, fading as it passes
    assert w.hit(1000.0, 3, 1000) > 0
    assert w.hit(1900.0, 3, 1000) == 0
    # long idle: everything forgotten
    w2 = RateWindow(0.0)
    for _ in range(3):
        w2.hit(0.0, 3, 1000)
    assert w2.hit(5000.0, 3, 1000) == 0


def test_rate_window_retry_after_is_honest() -> None:
    """Waiting the advised time (and sending nothing meanwhile) always lets a message in."""
    for limit in (1, 3, 10):
        for burst in range(limit + 1, 2 * limit + 1):
            for start in (0.0, 250.0, 999.0):
                w = RateWindow(0.0)
                retry = 0
                for i in range(burst):
                    retry = w.hit(start + i * 0.001, limit, 1000)
                assert retry > 0
                later = start + burst * 0.001 + retry
                assert w.hit(later, limit, 1000) == 0, (limit, burst, start, retry)


# -- typed frames --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_typed_chat_streams_deltas_then_run_complete(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await env.connect(protocols=["gatewayd.v1"])
        assert c.protocol_in_use == "gatewayd.v1"
        c.send({"type": "chat", "message": "hello big world", "id": "m1"})
        deltas, done = await c.recv_until("run_complete")
        assert [d["type"] for d in deltas] == ["delta"] * 3
        assert "".join(d["content"] for d in deltas) == "hello big world"
        sid, rid = done["session_id"], done["run_id"]
        assert all(
            d["session_id"] == sid and d["run_id"] == rid and d["ref"] == "m1" for d in deltas
        )
        assert done["response"] == "hello big world"
        assert done["tokens"] == {"input": 3, "output": 3}
        assert done["cost_cents"] == 0 and done["ref"] == "m1"
        # the same session goes on, and history shows both turns
        c.send({"type": "chat", "message": "again", "session_id": sid})
        _, done2 = await c.recv_until("run_complete")
        assert done2["session_id"] == sid and "ref" not in done2
        c.send({"type": "history", "session_id": sid, "id": 7})
        hist = await c.recv()
        assert hist["type"] == "history" and hist["ref"] == 7
        assert [m["content"] for m in hist["messages"]] == [
            "hello big world",
            "hello big world",
            "again",
            "again",
        ]


@pytest_twisted.ensureDeferred
async def test_typed_errors_keep_the_connection_open(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await env.connect(token=CHAT)
        c.sendMessage(b"{not json")
        err = await c.recv()
        assert err["type"] == "error" and err["code"] == "invalid_request"
        c.send({"type": "dance", "id": 1})
        err = await c.recv()
        assert (err["code"], err["ref"]) == ("invalid_request", 1)
        c.send([1, 2])  # a typed connection (decided by its first message) takes objects only
        assert (await c.recv())["code"] == "invalid_request"
        c.send({"type": "chat", "id": "x"})  # no message
        err = await c.recv()
        assert err == {
            "type": "error",
            "code": "invalid_request",
            "message": "message: required",
            "ref": "x",
        }
        c.sendMessage(b'{"type": "ping"}', isBinary=True)
        assert (await c.recv())["code"] == "invalid_request"
        c.send({"type": "history", "session_id": "nope", "id": 2})
        err = await c.recv()
        assert (err["code"], err["ref"]) == ("not_found", 2)
        c.send({"type": "ping", "id": "p"})
        assert await c.recv() == {"type": "pong", "ref": "p"}


@pytest_twisted.ensureDeferred
async def test_typed_approve_runs_the_tool(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await env.connect(token=OPERATOR, protocols=["gatewayd.v1"])
        c.send({"type": "chat", "message": BASH, "id": "t"})
        before, asked = await c.recv_until("approval_requested")
        assert [f["type"] for f in before] == ["tool_start"]
        assert before[0]["tool"] == "bash" and before[0]["input"] == {"command": "echo hi"}
        assert asked["tool"] == "bash" and asked["ref"] == "t"
        c.send({"type": "approve", "approval_id": asked["approval_id"], "decision": "approve"})
        frames, done = await c.recv_until("run_complete")
        ends = [f for f in frames if f["type"] == "tool_end"]
        assert len(ends) == 1 and ends[0]["result"] == "hi\n" and ends[0]["is_error"] is False
        assert done["response"] == "hi\n"
        # resolved once: a second decision is a conflict
        c.send(
            {
                "type": "approve",
                "approval_id": asked["approval_id"],
                "decision": "deny",
                "id": "again",
            }
        )
        err = await c.recv()
        assert (err["type"], err["code"], err["ref"]) == ("error", "conflict", "again")
        c.send({"type": "approve", "approval_id": asked["approval_id"], "decision": "maybe"})
        assert (await c.recv())["code"] == "invalid_request"


@pytest_twisted.ensureDeferred
async def test_typed_deny_and_chat_token_may_not_approve(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await env.connect(token=CHAT)
        c.send({"type": "chat", "message": BASH})
        _, asked = await c.recv_until("approval_requested")
        c.send(
            {"type": "approve", "approval_id": asked["approval_id"], "decision": "approve", "id": 1}
        )
        err = await c.recv()
        assert (err["code"], err["ref"]) == ("forbidden", 1)
        op = await env.connect(token=OPERATOR)
        op.send(
            {
                "type": "approve",
                "approval_id": asked["approval_id"],
                "decision": "deny",
                "reason": "no",
            }
        )
        frames, done = await c.recv_until("run_complete")
        end = next(f for f in frames if f["type"] == "tool_end")
        assert end["is_error"] is True and "denied" in end["result"]


@pytest_twisted.ensureDeferred
async def test_typed_abort_by_run_and_by_session(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await env.connect(token=CHAT)
        c.send({"type": "chat", "message": BASH, "id": "a"})
        _, asked = await c.recv_until("approval_requested")
        c.send({"type": "abort", "run_id": asked["run_id"]})
        _, err = await c.recv_until("run_error")
        assert err["code"] == "aborted" and err["run_id"] == asked["run_id"]
        assert err["ref"] == "a"
        code, run = await env.rest("GET", f"/api/runs/{asked['run_id']}", token=CHAT)
        assert code == 200 and run["status"] == "aborted"
        # by session
        c.send({"type": "chat", "message": BASH, "session_id": "s-abort"})
        await c.recv_until("approval_requested")
        c.send({"type": "abort", "session_id": "s-abort"})
        _, err = await c.recv_until("run_error")
        assert err["code"] == "aborted" and err["session_id"] == "s-abort"
        # neither, or someone else's: refused
        c.send({"type": "abort", "id": 1})
        assert (await c.recv())["code"] == "invalid_request"
        other = await env.connect(token=CHAT2)
        other.send({"type": "abort", "run_id": asked["run_id"], "id": 2})
        err = await other.recv()
        assert (err["code"], err["ref"]) == ("not_found", 2)


@pytest_twisted.ensureDeferred
async def test_subscribe_filters_and_unsubscribe(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await env.connect(token=VIEWER)
        c.send({"type": "subscribe", "types": ["run_started", "run_complete"], "id": "s"})
        ack = await c.recv()
        assert ack["type"] == "subscribed" and ack["ref"] == "s" and "last_id" in ack
        code, body = await env.rest("POST", "/api/chat", {"message": "one two"})
        assert code == 200
        started = await c.recv()
        completed = await c.recv()
        assert started["type"] == "event" and started["event"]["type"] == "run_started"
        assert completed["event"]["type"] == "run_complete"
        assert completed["event"]["response"] == "one two"
        assert completed["event"]["run_id"] == body["run_id"]
        assert completed["event"]["id"] > started["event"]["id"]
        # comma-separated types work too; a new subscribe replaces the old one
        c.send({"type": "subscribe", "types": "session_created"})
        assert (await c.recv())["type"] == "subscribed"
        await env.rest("POST", "/api/sessions", {"title": "t"})
        ev = await c.recv()
        assert ev["event"]["type"] == "session_created"
        c.send({"type": "unsubscribe", "id": 9})
        assert await c.recv() == {"type": "unsubscribed", "ref": 9}
        await env.rest("POST", "/api/sessions", {"title": "t2"})
        c.send({"type": "ping"})
        assert (await c.recv())["type"] == "pong"  # no event came in between
        c.send({"type": "subscribe", "after_id": -1})
        assert (await c.recv())["code"] == "invalid_request"
        c.send({"type": "subscribe", "types": [1]})
        assert (await c.recv())["code"] == "invalid_request"


@pytest_twisted.ensureDeferred
async def test_chat_token_sees_only_its_own_events(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        mine = await env.connect(token=CHAT)
        mine.send({"type": "subscribe", "types": ["run_complete"]})
        await mine.recv()
        await env.rest("POST", "/api/chat", {"message": "theirs", "session_id": "s2"}, CHAT2)
        await env.rest("POST", "/api/chat", {"message": "mine"}, CHAT)
        ev = await mine.recv()
        assert ev["event"]["response"] == "mine"
        mine.send({"type": "subscribe", "session_id": "s2", "id": 1})
        err = await mine.recv()
        assert (err["type"], err["code"]) == ("error", "not_found")
        mine.send({"type": "history", "session_id": "s2"})
        assert (await mine.recv())["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_subscribe_after_id_replays_then_follows(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        await env.rest("POST", "/api/chat", {"message": "first", "session_id": "r1"})
        mark = env.gw.bus.last_id
        await env.rest("POST", "/api/chat", {"message": "second", "session_id": "r1"})
        missed = [e.id for e in env.gw.bus.replay(mark)]
        c = await env.connect()
        c.send({"type": "subscribe", "after_id": mark})
        assert (await c.recv())["type"] == "subscribed"
        replayed = [(await c.recv())["event"]["id"] for _ in missed]
        assert replayed == missed
        await env.rest("POST", "/api/chat", {"message": "third", "session_id": "r1"})
        live = await c.recv()
        assert live["event"]["id"] == missed[-1] + 1
        # an id the bus never gave out: reset, carrying the newest id to resume from
        c.send({"type": "subscribe", "after_id": 10**12})
        await c.recv_until("subscribed")
        reset = await c.recv()
        assert reset["type"] == "event" and reset["event"]["type"] == "reset"
        assert reset["event"]["id"] == env.gw.bus.last_id == reset["event"]["last_event_id"]


@pytest_twisted.ensureDeferred
async def test_mode_is_decided_by_the_first_message(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        rpc_client = await env.connect()
        assert rpc_client.protocol_in_use is None
        rpc_client.send({"jsonrpc": "2.0", "id": 1, "method": "health"})
        reply = await rpc_client.recv()
        assert reply["id"] == 1 and reply["result"]["status"] == "ok"
        rpc_client.send({"type": "ping"})  # now a JSON-RPC connection: not a typed frame
        assert (await rpc_client.recv())["error"]["code"] == -32600
        typed = await env.connect()
        typed.send({"type": "ping"})
        assert await typed.recv() == {"type": "pong"}
        typed.send({"jsonrpc": "2.0", "id": 1, "method": "health"})
        assert (await typed.recv())["code"] == "invalid_request"


# -- /ws/chat ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ws_chat_is_bound_to_its_session(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await env.connect("/ws/chat?session_id=bound-1", token=CHAT)
        c.send({"type": "chat", "message": "in the bound session"})
        _, done = await c.recv_until("run_complete")
        assert done["session_id"] == "bound-1"
        c.send({"type": "history"})
        hist = await c.recv()
        assert hist["session_id"] == "bound-1" and len(hist["messages"]) == 2
        # another chat token's session: 404 before the upgrade; its owner gets in
        status, _, body = await handshake(
            env.g.port, "/ws/chat?session_id=bound-1", {"Authorization": f"Bearer {CHAT2}"}
        )
        assert status == 404 and body["error"]["code"] == "not_found"
        status, _, body = await handshake(
            env.g.port, "/ws/chat", {"Authorization": f"Bearer {CHAT}"}
        )
        assert status == 400 and body["error"]["code"] == "invalid_request"
        admin = await env.connect("/ws/chat?session_id=bound-1", protocols=["gatewayd.jsonrpc"])
        admin.send({"jsonrpc": "2.0", "id": 1, "method": "chat.history"})
        reply = await admin.recv()
        assert reply["result"]["session_id"] == "bound-1"


# -- the handshake: credentials, Origin ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_handshake_credentials(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        port = env.g.port
        status, headers, body = await handshake(port, "/ws")
        assert status == 401 and body["error"]["code"] == "unauthorized"
        assert headers["www-authenticate"].startswith("Bearer")
        status, _, _ = await handshake(port, "/ws", {"Authorization": "Bearer wrong"})
        assert status == 401
        # ?token=
        c = await env.connect(f"/ws?token={CHAT}", token=None)
        c.send({"type": "ping"})
        assert (await c.recv())["type"] == "pong"
        # ?ticket=: once only
        code, t = await env.rest("POST", "/api/tickets", {}, CHAT)
        assert code == 201
        c2 = await env.connect(f"/ws?ticket={t['ticket']}", token=None)
        c2.send({"type": "ping"})
        assert (await c2.recv())["type"] == "pong"
        status, _, _ = await handshake(port, f"/ws?ticket={t['ticket']}")
        assert status == 401
        # bearer.<token> beside gatewayd.*: the server selects the gatewayd entry
        c3 = await env.connect(token=None, protocols=["gatewayd.jsonrpc", f"bearer.{VIEWER}"])
        assert c3.protocol_in_use == "gatewayd.jsonrpc"
        c3.send({"jsonrpc": "2.0", "id": 1, "method": "token.validate"})
        assert (await c3.recv())["result"]["role"] == "viewer"
        c4 = await env.connect(token=None, protocols=[f"bearer.{CHAT}", "gatewayd.v1"])
        assert c4.protocol_in_use == "gatewayd.v1"
        # bearer.<token> alone is not a credential
        status, _, _ = await handshake(port, "/ws", {"Sec-WebSocket-Protocol": f"bearer.{CHAT}"})
        assert status == 401
        with pytest.raises(HandshakeRefused):
            await connect(env.url, token=None, protocols=[f"bearer.{CHAT}"])
        # plain GET and other methods
        status, headers, body = await handshake(
            port, "/ws", {"Authorization": f"Bearer {CHAT}"}, upgrade=False
        )
        assert status == 426 and headers["upgrade"] == "websocket"
        resp = await treq.post(env.url + "/ws", b"", headers=auth(CHAT))
        assert resp.code == 405
        await resp.content()
        status, headers, _ = await handshake(port, "/ws", {"Authorization": f"Bearer {CHAT}"})
        assert status == 101
        # what browsers and node's ws offer: compression (declined) and a subprotocol
        offer = {
            "Authorization": f"Bearer {CHAT}",
            "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits",
            "Sec-WebSocket-Protocol": "gatewayd.v1",
        }
        status, headers, _ = await handshake(port, "/ws", offer)
        assert status == 101 and headers["sec-websocket-protocol"] == "gatewayd.v1"
        assert "sec-websocket-extensions" not in headers


@pytest_twisted.ensureDeferred
async def test_origin_checks(tmp_path: Any) -> None:
    extra = 'allowed_origins = ["https://app.example.com"]\n'
    async with running(tmp_path, extra) as env:
        port = env.g.port
        bearer = {"Authorization": f"Bearer {CHAT}"}
        status, _, body = await handshake(port, "/ws", {**bearer, "Origin": "http://evil.test"})
        assert status == 403 and body["error"]["code"] == "forbidden"
        status, _, _ = await handshake(port, "/ws", {**bearer, "Origin": "null"})
        assert status == 403
        # same host:port as Host
        status, _, _ = await handshake(
            port, "/ws", {**bearer, "Origin": f"http://127.0.0.1:{port}"}
        )
        assert status == 101
        # the same host on another port is another origin
        status, _, _ = await handshake(
            port, "/ws", {**bearer, "Origin": f"http://127.0.0.1:{port + 1}"}
        )
        assert status == 403
        for allowed in ("https://app.example.com", "https://APP.example.com:443"):
            status, _, _ = await handshake(port, "/ws", {**bearer, "Origin": allowed})
            assert status == 101, allowed
        status, _, _ = await handshake(port, "/ws", {**bearer, "Origin": "http://app.example.com"})
        assert status == 403
        # a browser client through Autobahn, with a good Origin
        c = await env.connect(token=CHAT, origin=f"http://127.0.0.1:{port}")
        c.send({"type": "ping"})
        assert (await c.recv())["type"] == "pong"


@pytest_twisted.ensureDeferred
async def test_stream_cap_per_token(tmp_path: Any) -> None:
    async with running(tmp_path, "max_streams_per_token = 2\n") as env:
        await env.connect(token=CHAT)
        await env.connect(token=CHAT)
        status, headers, body = await handshake(
            env.g.port, "/ws", {"Authorization": f"Bearer {CHAT}"}
        )
        assert status == 429 and body["error"]["code"] == "too_many_streams"
        assert "retry-after" in headers
        await env.connect(token=CHAT2)  # another token is not affected
        assert env.gw.connections["websocket"] == 3


# -- limits and closes ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_message_over_the_cap_closes_1009(tmp_path: Any) -> None:
    async with running(tmp_path, "ws_max_message_bytes = 1000\n") as env:
        c = await env.connect()
        c.send({"type": "chat", "message": "x" * 900})  # under the cap: fine
        await c.recv_until("run_complete")
        c.sendMessage(b'{"type":"chat","message":"' + b"y" * 1000 + b'"}')
        was_clean, code, _ = await c.closed
        assert code == 1009
        # fragments adding up past the cap count as one message
        c2 = await env.connect()
        c2.sendMessage(b'{"type":"chat","message":"' + b"x" * 1200 + b'"}', fragmentSize=400)
        assert (await c2.closed)[1] == 1009


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_closes_1007(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await env.connect()
        c.sendMessage(b'{"type": "ping", "x": "\xff\xfe"}')
        _, code, _ = await c.closed
        assert code == 1007


@pytest_twisted.ensureDeferred
async def test_rate_limit_frames_then_1008(tmp_path: Any) -> None:
    extra = "[gateway.ws_rate_limit]\nmax_messages = 3\nwindow_ms = 600000\n"
    async with running(tmp_path, extra) as env:
        c = await env.connect()
        for i in range(6):
            c.send({"type": "ping", "id": i})
        frames = [await c.recv() for _ in range(6)]
        assert [f["type"] for f in frames] == ["pong"] * 3 + ["error"] * 3
        assert all(f["code"] == "rate_limited" and f["retry_after_ms"] > 0 for f in frames[3:])
        assert [f["ref"] for f in frames[3:]] == [3, 4, 5]
        c.send({"type": "ping"})  # the 7th in one window: more than twice the limit
        _, code, reason = await c.closed
        assert code == 1008 and "rate" in (reason or "")
        # JSON-RPC connections get JSON-RPC errors
        r = await env.connect(protocols=["gatewayd.jsonrpc"])
        for i in range(4):
            r.send({"jsonrpc": "2.0", "id": i, "method": "health"})
        replies = [await r.recv() for _ in range(4)]
        assert replies[3]["id"] == 3 and replies[3]["error"]["code"] == -32000
        assert replies[3]["error"]["data"]["code"] == "rate_limited"
        assert replies[3]["error"]["data"]["retry_after_ms"] > 0


@pytest_twisted.ensureDeferred
async def test_slow_consumer_is_closed_1008(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(ws, "SLOW_CONSUMER_BYTES", 256 * 1024)
    async with running(tmp_path) as env:
        c = await env.connect()
        c.send({"type": "subscribe", "types": ["blob"]})
        await c.recv()
        assert c.transport is not None
        c.transport.pauseProducing()  # stop reading: the server's buffers fill up
        blob = "z" * 65536
        factory = factory_for(env.gw)
        assert factory is not None
        server = next(iter(factory.live))
        sent = 0
        while server.state == server.STATE_OPEN and sent < 400:
            env.gw.bus.publish("blob", blob=blob)
            sent += 1
        assert server.state != server.STATE_OPEN, "the server never gave up"
        assert sent < 400
        c.transport.resumeProducing()
        _, code, reason = await c.closed
        assert code == 1008 and reason == "slow consumer"
        received = 0
        while c.inbox.pending:
            received += 1
            c.inbox.pending.pop()
        assert received < sent


@pytest_twisted.ensureDeferred
async def test_dead_peer_is_dropped_by_auto_ping(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(ws, "AUTO_PING_INTERVAL_S", 0.2)
    monkeypatch.setattr(ws, "AUTO_PING_TIMEOUT_S", 0.3)
    async with running(tmp_path) as env:
        c = await env.connect()
        assert c.transport is not None
        c.transport.pauseProducing()  # never reads a ping again, so never answers
        await env.idle()
        c.transport.resumeProducing()
        _, code, _ = await c.closed
        assert code == 1006  # dropped, no close frame


@pytest_twisted.ensureDeferred
async def test_revoking_the_token_closes_its_sockets(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        token = "revocable-token-0123456789abcdefghij"
        principal = Principal(token_id="tok_revocable", role="chat", name="r", kind="stored")
        env.gw.tokens.add_stored(hash_token(token), principal)
        c = await env.connect(token=token)
        keep = await env.connect(token=CHAT)
        c.send({"type": "ping"})
        await c.recv()
        env.gw.tokens.remove_stored("tok_revocable")
        _, code, reason = await c.closed
        assert (code, reason) == (1008, "token revoked")
        assert env.gw.connections["websocket"] == 1
        metrics = env.gw.metrics.exposition()
        assert b'gatewayd_websocket_closes_total{code="1008"} 1.0' in metrics
        keep.send({"type": "ping"})
        assert (await keep.recv())["type"] == "pong"
        status, _, _ = await handshake(env.g.port, "/ws", {"Authorization": f"Bearer {token}"})
        assert status == 401


@pytest_twisted.ensureDeferred
async def test_shutdown_closes_with_1001(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        typed = await env.connect()
        rpc_client = await env.connect(protocols=["gatewayd.jsonrpc"])
        await env.stop()
        for c in (typed, rpc_client):
            _, code, reason = await c.closed
            assert (code, reason) == (1001, "going away")


@pytest_twisted.ensureDeferred
async def test_resume_after_a_dropped_socket_while_the_run_goes_on(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await env.connect(token=OPERATOR)
        c.send({"type": "subscribe"})
        await c.recv()
        c.send({"type": "chat", "message": BASH, "session_id": "resume"})
        frames, asked = await c.recv_until("approval_requested")
        seen = [f["event"]["id"] for f in frames if f["type"] == "event"]
        assert frames[-1]["event"]["type"] == "approval_requested"
        last = seen[-1]
        assert c.transport is not None
        c.transport.abortConnection()  # the socket dies; the run does not
        await c.closed
        await env.idle()
        run_id = asked["run_id"]
        code, run = await env.rest("GET", f"/api/runs/{run_id}", token=OPERATOR)
        assert run["status"] == "awaiting_approval"
        # someone approves while the client is away; the run finishes
        op = await env.connect(token=OPERATOR, protocols=["gatewayd.jsonrpc"])
        op.send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "approvals.resolve",
                "params": {"approval_id": asked["approval_id"], "decision": "approve"},
            }
        )
        assert (await op.recv())["result"]["status"] == "approved"
        op.send({"jsonrpc": "2.0", "id": 2, "method": "runs.wait", "params": {"run_id": run_id}})
        assert (await op.recv())["result"]["status"] == "completed"
        # the client comes back, resumes after the last id it saw, and follows on
        back = await env.connect(token=OPERATOR)
        back.send({"type": "subscribe", "after_id": last})
        assert (await back.recv())["type"] == "subscribed"
        missed = [e.id for e in env.gw.bus.replay(last)]
        replay = [(await back.recv())["event"] for _ in missed]
        assert [e["id"] for e in replay] == missed == list(range(last + 1, last + 1 + len(missed)))
        kinds = [e["type"] for e in replay]
        assert kinds[0] == "approval_resolved" and kinds[-1] == "run_complete"
        assert "tool_end" in kinds and replay[-1]["response"] == "hi\n"
        code, run = await env.rest("GET", f"/api/runs/{run_id}", token=OPERATOR)
        assert run["status"] == "completed" and run["response"] == "hi\n"
        await env.rest("POST", "/api/chat", {"message": "after", "session_id": "resume"}, OPERATOR)
        follow = await back.recv()
        assert follow["event"]["id"] == missed[-1] + 1


@pytest_twisted.ensureDeferred
async def test_no_new_websockets_once_going_away(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await env.connect()
        factory = factory_for(env.gw)
        assert factory is not None
        factory.going_away()  # what the service's stopping hook does first
        assert (await c.closed)[1] == 1001
        status, _, body = await handshake(env.g.port, "/ws", {"Authorization": f"Bearer {CHAT}"})
        assert status == 503 and body["error"]["code"] == "unavailable"
