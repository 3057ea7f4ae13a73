"""JSON-RPC 2.0 over WebSocket and ``POST /rpc``: every method from the operations table."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq

from gatewayd import ops
from gatewayd.ops import Param
from tests.harness import ADMIN, CHAT, OPERATOR, VIEWER, auth
from tests.wsclient import BASH, Client, Env, running


def req(method: str, params: Any = None, rid: Any = 1) -> dict[str, Any]:
    out: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        out["params"] = params
    if rid is not ...:
        out["id"] = rid
    return out


async def rpc_client(env: Env, token: str = ADMIN, path: str = "/ws") -> Client:
    c = await env.connect(path, token=token, protocols=["gatewayd.jsonrpc"])
    assert c.protocol_in_use == "gatewayd.jsonrpc"
    return c


async def post_rpc(env: Env, body: Any, token: str | None = ADMIN) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = auth(token) if token else {}
    resp = await treq.post(env.url + "/rpc", data, headers=headers)
    raw = await resp.content()
    return resp.code, (json.loads(raw) if raw else None)


@pytest_twisted.ensureDeferred
async def test_chat_send_streams_notifications_then_the_chat_body(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await rpc_client(env, CHAT)
        c.send(req("chat.send", {"message": "one two three"}, rid="c1"))
        notes, result = await c.recv_until("c1", key="id")
        assert {n["method"] for n in notes} == {"chat.event"}
        kinds = [n["params"]["type"] for n in notes]
        assert kinds[0] == "run_started" and kinds[-1] == "run_complete"
        assert kinds.count("text_delta") == 3
        body = result["result"]
        assert set(body) >= {
            "session_id",
            "run_id",
            "response",
            "tools_used",
            "tokens",
            "cost_cents",
        }
        assert body["response"] == "one two three" and body["tools_used"] == []
        assert result["jsonrpc"] == "2.0"
        c.send(req("sessions.list", rid=2))
        listed = (await c.recv())["result"]
        assert [s["id"] for s in listed["sessions"]] == [body["session_id"]]
        c.send(req("connect", rid=3))
        hello = (await c.recv())["result"]
        assert hello["role"] == "chat" and "chat.send" in hello["methods"]
        assert "events.subscribe" in hello["methods"] and "config.set" not in hello["methods"]


@pytest_twisted.ensureDeferred
async def test_batches_and_notifications(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await rpc_client(env)
        c.send(
            [
                req("health", rid=1),
                req("token.validate", rid="two"),
                req("status", rid=...),
                req("nope", rid=...),
            ]
        )
        replies = await c.recv()
        assert isinstance(replies, list)
        by_id = {r["id"]: r for r in replies}
        assert set(by_id) == {1, "two"}
        assert by_id[1]["result"]["status"] == "ok"
        assert by_id["two"]["result"]["role"] == "admin"
        # only notifications: nothing comes back (the next reply is the next request's)
        c.send([req("health", rid=...), req("status", rid=...)])
        c.send(req("health", rid=...))
        c.send(req("health", rid=5))
        assert (await c.recv())["id"] == 5
        # a batch mixing good and bad entries answers each
        c.send([req("health", rid=1), {"jsonrpc": "2.0", "id": 2}, 3])
        replies = await c.recv()
        assert replies[0]["result"]["status"] == "ok"
        assert replies[1] == {
            "jsonrpc": "2.0",
            "id": 2,
            "error": {"code": -32600, "message": "invalid request: method is required"},
        }
        assert replies[2]["id"] is None and replies[2]["error"]["code"] == -32600


@pytest_twisted.ensureDeferred
async def test_every_error_code(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await rpc_client(env, VIEWER)

        async def ask(message: Any) -> dict[str, Any]:
            c.sendMessage(message if isinstance(message, bytes) else json.dumps(message).encode())
            reply = await c.recv()
            assert isinstance(reply, dict)
            return reply

        parse = await ask(b'{"jsonrpc": "2.0", "method": "health", "id": 1')
        assert parse["id"] is None and parse["error"]["code"] == -32700
        assert (await ask({"jsonrpc": "2.0", "id": 1}))["error"]["code"] == -32600
        assert (await ask({"jsonrpc": "1.0", "method": "health", "id": 1}))["error"][
            "code"
        ] == -32600
        assert (await ask({"jsonrpc": "2.0", "method": "health", "id": {"a": 1}}))["error"][
            "code"
        ] == -32600
        assert (await ask(req("health", "nope")))["error"]["code"] == -32600
        assert (await ask([]))["error"]["code"] == -32600
        unknown = await ask(req("no.such.method", rid=4))
        assert unknown["id"] == 4 and unknown["error"]["code"] == -32601
        bad = await ask(req("runs.get", {}, rid=5))
        assert bad["error"]["code"] == -32602 and "run_id" in bad["error"]["message"]
        assert bad["error"]["data"]["code"] == "invalid_request"
        positional = await ask(req("runs.get", ["run_1"], rid=6))
        assert positional["error"]["code"] == -32602
        forbidden = await ask(req("chat.send", {"message": "hi"}, rid=7))
        assert forbidden["error"]["code"] == -32000
        assert forbidden["error"]["data"]["code"] == "forbidden"
        missing = await ask(req("runs.get", {"run_id": "run_nope"}, rid=8))
        assert missing["error"]["data"]["code"] == "not_found"

        # an operation that breaks: -32603, with no detail leaked
        async def broken(gw: Any, call: Any, p: dict[str, Any]) -> Any:
            raise RuntimeError("secret detail")

        ops.operation("test.broken", "read")(broken)
        try:
            crashed = await ask(req("test.broken", rid=9))
        finally:
            del ops.OPERATIONS["test.broken"]
        assert crashed["error"] == {"code": -32603, "message": "internal error"}


@pytest_twisted.ensureDeferred
async def test_new_operations_are_methods_at_once(tmp_path: Any) -> None:
    async with running(tmp_path) as env:

        async def shout(gw: Any, call: Any, p: dict[str, Any]) -> Any:
            return {"text": p["text"].upper(), "transport": call.transport}

        ops.operation("test.shout", "any", Param("text", str, required=True))(shout)
        try:
            c = await rpc_client(env, VIEWER)
            c.send(req("test.shout", {"text": "hey"}))
            assert (await c.recv())["result"] == {"text": "HEY", "transport": "websocket"}
            code, body = await post_rpc(env, req("test.shout", {"text": "yo"}), VIEWER)
            assert code == 200 and body["result"] == {"text": "YO", "transport": "http-rpc"}
        finally:
            del ops.OPERATIONS["test.shout"]


@pytest_twisted.ensureDeferred
async def test_events_subscribe_replay_and_unsubscribe(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        await env.rest("POST", "/api/chat", {"message": "before"})
        mark = env.gw.bus.last_id
        await env.rest("POST", "/api/chat", {"message": "missed"})
        missed = [e.id for e in env.gw.bus.replay(mark)]
        c = await rpc_client(env, VIEWER)
        c.send(req("events.subscribe", {"after_id": mark}, rid="s"))
        ack = await c.recv()
        assert ack["id"] == "s" and ack["result"]["subscribed"] is True
        replay = [await c.recv() for _ in missed]
        assert all(n["method"] == "event" and "id" not in n for n in replay)
        assert [n["params"]["id"] for n in replay] == missed
        c.send(req("events.subscribe", {"types": ["run_complete"]}, rid="s2"))
        assert (await c.recv())["result"]["subscribed"] is True
        await env.rest("POST", "/api/chat", {"message": "live"})
        live = await c.recv()
        assert live["method"] == "event" and live["params"]["type"] == "run_complete"
        assert live["params"]["response"] == "live"
        c.send(req("events.subscribe", {"after_id": 10**12}, rid="s3"))
        await c.recv()
        reset = await c.recv()
        assert reset["params"]["type"] == "reset"
        c.send(req("events.unsubscribe", rid="u"))
        assert (await c.recv())["result"] == {"unsubscribed": True}
        await env.rest("POST", "/api/chat", {"message": "unseen"})
        c.send(req("health", rid="h"))
        assert (await c.recv())["id"] == "h"
        # over plain HTTP there is no stream to follow
        code, body = await post_rpc(env, req("events.subscribe", {}), VIEWER)
        assert code == 200 and body["error"]["code"] == -32602


@pytest_twisted.ensureDeferred
async def test_approvals_over_json_rpc(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await rpc_client(env, OPERATOR)
        c.send(req("agent", {"message": BASH, "session_id": "appr"}, rid="a"))
        _, started = await c.recv_until("a", key="id")
        started = started["result"]
        assert started["session_id"] == "appr"
        c.send(req("events.subscribe", {"types": ["approval_requested"], "after_id": 0}, rid="s"))
        await c.recv_until("s", key="id")
        _, asked = await c.recv_until("event", key="method")
        asked = asked["params"]
        assert asked["type"] == "approval_requested"
        c.send(req("approvals.list", {"status": "pending"}, rid="l"))
        _, listed = await c.recv_until("l", key="id")
        listed = listed["result"]["approvals"]
        assert [a["id"] for a in listed] == [asked["approval_id"]]
        chat = await rpc_client(env, CHAT)
        chat.send(
            req(
                "approvals.resolve",
                {"approval_id": asked["approval_id"], "decision": "approve"},
                rid="x",
            )
        )
        assert (await chat.recv())["error"]["data"]["code"] == "forbidden"
        c.send(
            req(
                "approvals.resolve",
                {"approval_id": asked["approval_id"], "decision": "approve"},
                rid="r",
            )
        )
        _, resolved = await c.recv_until("r", key="id")
        assert resolved["result"]["status"] == "approved"
        c.send(
            req(
                "approvals.resolve",
                {"approval_id": asked["approval_id"], "decision": "deny"},
                rid="r2",
            )
        )
        _, again = await c.recv_until("r2", key="id")
        assert again["error"]["code"] == -32000 and again["error"]["data"]["code"] == "conflict"
        c.send(req("runs.wait", {"run_id": started["run_id"]}, rid="w"))
        _, waited = await c.recv_until("w", key="id")
        assert waited["result"]["response"] == "hi\n"


@pytest_twisted.ensureDeferred
async def test_post_rpc(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        code, body = await post_rpc(env, req("chat.send", {"message": "over http"}), CHAT)
        assert code == 200 and body["id"] == 1 and body["result"]["response"] == "over http"
        code, body = await post_rpc(env, [req("health", rid=1), req("status", rid=2)], VIEWER)
        assert code == 200 and [r["id"] for r in body] == [1, 2]
        code, body = await post_rpc(env, [req("health", rid=...), req("status", rid=...)])
        assert (code, body) == (204, None)
        code, body = await post_rpc(env, req("health", rid=...))
        assert (code, body) == (204, None)
        code, body = await post_rpc(env, req("chat.send", {"message": "x"}), VIEWER)
        assert code == 200 and body["error"]["data"]["code"] == "forbidden"
        code, body = await post_rpc(env, b"{broken")
        assert code == 200 and body["error"]["code"] == -32700
        code, body = await post_rpc(env, b"\xff\xfe")
        assert code == 200 and body["error"]["code"] == -32700
        code, body = await post_rpc(env, req("health"), token=None)
        assert code == 401 and body["error"]["code"] == "unauthorized"
        code, body = await post_rpc(env, req("health"), token="wrong")
        assert code == 401
        resp = await treq.get(env.url + "/rpc", headers=auth(ADMIN))
        assert resp.code == 405 and resp.headers.getRawHeaders(b"allow") == [b"POST"]
        await resp.content()
        code, body = await post_rpc(env, [req("health", rid=i) for i in range(101)])
        assert code == 200 and body["error"]["code"] == -32600


@pytest_twisted.ensureDeferred
async def test_ws_chat_binds_the_session_for_json_rpc(tmp_path: Any) -> None:
    async with running(tmp_path) as env:
        c = await rpc_client(env, CHAT, "/ws/chat?session_id=rpc-bound")
        c.send(req("chat.send", {"message": "bound"}, rid="b"))
        _, result = await c.recv_until("b", key="id")
        assert result["result"]["session_id"] == "rpc-bound"
        c.send(req("chat.send", {"message": "elsewhere", "session_id": "other"}, rid="o"))
        _, result = await c.recv_until("o", key="id")
        assert result["result"]["session_id"] == "other"
        c.send(req("chat.history", rid="h"))
        hist = (await c.recv())["result"]
        assert [m["content"] for m in hist["messages"]] == ["bound", "bound"]
