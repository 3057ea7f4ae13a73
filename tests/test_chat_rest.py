"""Chat, sessions and runs over REST against the real service tree on a loopback port."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq
from twisted.internet.defer import DeferredList

from tests.harness import ADMIN, CHAT, CHAT2, OPERATOR, VIEWER, Running, auth, start_gateway


async def _json(resp: Any) -> Any:
    return json.loads(await resp.content())


async def post(g: Running, path: str, body: Any, token: str = ADMIN) -> tuple[int, Any]:
    resp = await treq.post(g.url + path, json.dumps(body).encode(), headers=auth(token))
    return resp.code, await _json(resp)


async def get(g: Running, path: str, token: str = ADMIN) -> tuple[int, Any]:
    resp = await treq.get(g.url + path, headers=auth(token))
    return resp.code, await _json(resp)


@pytest_twisted.ensureDeferred
async def test_chat_echo_and_history(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        code, body = await post(g, "/api/chat", {"message": "hello  there world "})
        assert code == 200
        assert body["response"] == "hello  there world "
        assert body["tools_used"] == []
        assert body["tokens"] == {"input": 3, "output": 3}
        assert body["cost_cents"] == 0
        sid = body["session_id"]
        code, hist = await get(g, f"/api/sessions/{sid}/history")
        assert code == 200
        roles = [(m["role"], m["content"], m["run_id"]) for m in hist["messages"]]
        assert roles == [
            ("user", "hello  there world ", body["run_id"]),
            ("assistant", "hello  there world ", body["run_id"]),
        ]
        code, run = await get(g, f"/api/runs/{body['run_id']}")
        assert code == 200 and run["status"] == "completed"
        # second message on the same session: usage counts the history too
        code, body2 = await post(g, "/api/message", {"message": "again", "sessionKey": sid})
        assert code == 200 and body2["session_id"] == sid
        assert body2["tokens"] == {"input": 3 + 3 + 1, "output": 1}
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_concurrent_chats_on_one_session_keep_order(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), _with_queue(64))
    try:
        ds = [
            treq.post(
                g.url + "/api/chat",
                json.dumps({"message": f"m{i}", "session_id": "busy"}).encode(),
                headers=auth(ADMIN),
            )
            for i in range(50)
        ]
        results = await DeferredList(ds, consumeErrors=True)
        codes = [r.code for ok, r in results if ok]
        assert codes == [200] * 50
        code, hist = await get(g, "/api/sessions/busy/history")
        msgs = hist["messages"]
        assert len(msgs) == 100
        # every message is there; runs ran one at a time in the order their messages arrived
        users = [m for m in msgs if m["role"] == "user"]
        replies = [m for m in msgs if m["role"] == "assistant"]
        assert len(users) == len(replies) == 50
        assert sorted(m["content"] for m in users) == sorted(f"m{i}" for i in range(50))
        assert [m["run_id"] for m in replies] == [m["run_id"] for m in users]
        position = {m["id"]: i for i, m in enumerate(msgs)}
        by_run = {m["run_id"]: m for m in users}
        for reply in replies:
            user = by_run[reply["run_id"]]
            assert reply["content"] == user["content"]
            assert position[reply["id"]] > position[user["id"]]
        ids = [int(m["id"]) for m in msgs]
        assert ids == sorted(ids)
    finally:
        await g.stop()


def _with_queue(n: int) -> str:
    from tests.harness import TOKENS_TOML

    return (
        f"[agent]\nmax_queue_per_session = {n}\n"
        "[gateway.rate_limit]\nrate_per_s = 1000\nburst = 1000\n" + TOKENS_TOML
    )


@pytest_twisted.ensureDeferred
async def test_chat_tokens_see_only_their_own_sessions(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        code, mine = await post(g, "/api/chat", {"message": "mine"}, CHAT)
        assert code == 200
        sid, rid = mine["session_id"], mine["run_id"]
        for path in (
            f"/api/sessions/{sid}",
            f"/api/sessions/{sid}/history",
            f"/api/runs/{rid}",
            f"/api/chat/history?session_id={sid}",
        ):
            code, body = await get(g, path, CHAT2)
            assert code == 404, path
            assert body["error"]["code"] == "not_found"
            code, _ = await get(g, path, CHAT)
            assert code == 200, path
            code, _ = await get(g, path, VIEWER)
            assert code == 200, path
        code, listing = await get(g, "/api/sessions", CHAT2)
        assert listing == {"sessions": []}
        # joining someone else's session by id is 404, never a join
        code, body = await post(g, "/api/chat", {"message": "x", "session_id": sid}, CHAT2)
        assert code == 404
        code, hist = await get(g, f"/api/sessions/{sid}/history", CHAT)
        assert len(hist["messages"]) == 2
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_auth_matrix(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        cases = [
            ("GET", "/api/status", {"admin": 200, "operator": 200, "chat": 403, "viewer": 200}),
            ("POST", "/api/chat", {"admin": 200, "operator": 200, "chat": 200, "viewer": 403}),
            ("GET", "/api/sessions", {"admin": 200, "operator": 200, "chat": 200, "viewer": 200}),
            (
                "POST",
                "/api/token/validate",
                {"admin": 200, "operator": 200, "chat": 200, "viewer": 200},
            ),
        ]
        tokens = {"admin": ADMIN, "operator": OPERATOR, "chat": CHAT, "viewer": VIEWER}
        for method, path, expected in cases:
            for role, status in expected.items():
                body = json.dumps({"message": "hi"}).encode() if method == "POST" else None
                resp = await treq.request(
                    method, g.url + path, data=body, headers=auth(tokens[role])
                )
                payload = await _json(resp)
                assert resp.code == status, (method, path, role, payload)
                if status == 403:
                    assert payload["error"]["code"] == "forbidden"
            resp = await treq.request(method, g.url + path)
            assert resp.code == 401
            assert resp.headers.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer")
            assert (await _json(resp))["error"]["code"] == "unauthorized"
            resp = await treq.request(
                method, g.url + path, headers=auth("wrong-token-xxxxxxxxxxxx")
            )
            assert resp.code == 401
        code, who = await post(g, "/api/token/validate", {}, CHAT)
        assert who["valid"] is True and who["role"] == "chat" and who["scopes"] == ["chat"]
        assert who["name"] == "chat" and who["token_id"]
        # session edits need operate
        code, s = await post(g, "/api/sessions", {"title": "t"}, CHAT)
        assert code == 201
        resp = await treq.request(
            "PATCH", g.url + f"/api/sessions/{s['id']}", data=b'{"title":"x"}', headers=auth(CHAT)
        )
        assert resp.code == 403
        await resp.content()
        resp = await treq.request(
            "PATCH",
            g.url + f"/api/sessions/{s['id']}",
            data=b'{"title":"x"}',
            headers=auth(OPERATOR),
        )
        assert resp.code == 200 and (await _json(resp))["title"] == "x"
        resp = await treq.delete(g.url + f"/api/sessions/{s['id']}", headers=auth(OPERATOR))
        assert resp.code == 204
        await resp.content()
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_bad_input_gets_contract_errors(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        for raw in (
            b"[1]",
            b"not json",
            b"\xff\xfe",
            b'{"message": 5}',
            b"{}",
            b'{"message":"x","session_id":"bad id!"}',
            b'{"message": "\\ud800"}',
            b'{"message":"   "}',
        ):
            resp = await treq.post(g.url + "/api/chat", raw, headers=auth(ADMIN))
            body = await _json(resp)
            assert resp.code == 400, raw
            assert body["error"]["code"] == "invalid_request"
            assert set(body["error"]) == {"code", "message"}
        resp = await treq.get(g.url + "/api/nope", headers=auth(ADMIN))
        assert resp.code == 404 and (await _json(resp))["error"]["code"] == "not_found"
        resp = await treq.put(g.url + "/api/sessions", b"{}", headers=auth(ADMIN))
        assert resp.code == 405
        assert (await _json(resp))["error"]["code"] == "method_not_allowed"
        resp = await treq.post(g.url + "/health", b"{}")
        assert resp.code == 405
        await resp.content()
        code, body = await get(g, "/api/sessions?limit=abc")
        assert code == 400
        code, body = await get(g, "/api/sessions/nope")
        assert code == 404
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_async_agent_and_session_crud(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        code, started = await post(g, "/api/agent", {"message": "later please"})
        assert code == 202 and set(started) == {"run_id", "session_id"}
        code, done = await post(
            g, "/api/agent/wait", {"message": "now", "session_id": started["session_id"]}
        )
        assert code == 200 and done["response"] == "now"
        code, run = await get(g, f"/api/runs/{started['run_id']}")
        assert run["status"] == "completed" and run["response"] == "later please"
        code, session = await get(g, f"/api/sessions/{started['session_id']}")
        assert session["message_count"] == 4 and len(session["messages"]) == 4
        code, hist = await get(g, f"/api/chat/history?session_id={started['session_id']}&limit=1")
        assert [m["content"] for m in hist["messages"]] == ["now"]
        code, reset = await post(g, f"/api/sessions/{started['session_id']}/reset", {})
        assert code == 200 and reset["message_count"] == 0
        code, found = await get(g, "/api/memory/search?q=later")
        assert code == 200
        code, health = await get(g, "/api/health", token="")
        assert code == 200 and health["status"] == "ok"
        code, status = await get(g, "/api/status")
        assert status["provider"] == "echo" and status["model"] == "echo-1"
    finally:
        await g.stop()
