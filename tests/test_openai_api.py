"""The OpenAI-compatible API, driven by the official ``openai`` package, unchanged.

Most tests talk to one real ``twistd -n gateway`` process over loopback (the SDK is
synchronous, so plain tests suit it).  A few run the service tree in this process, where
the test can reach into the gateway: a client that hangs up mid-stream (the run must go on),
and a provider that fails (the stream must say so in OpenAI's terms).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from gatewayd.events import Event, make_filter
from tests.harness import (
    ADMIN,
    CHAT,
    CHAT2,
    TOKENS_TOML,
    VIEWER,
    Process,
    Running,
    spawn,
    start_gateway,
)
from tests.standins import OpenAIStandIn, listen_standin, openai_error, stop_standin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = (
    TOKENS_TOML
    + """
[agent]
agents = ["helper"]
max_queue_per_session = 1
"""
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    # PYTHONPATH: the child must see this tree's modules even before a reinstall
    p = spawn(str(tmp_path_factory.mktemp("openai")), config_text=CONFIG, env={"PYTHONPATH": REPO})
    try:
        yield p
    finally:
        p.terminate()


def client(g: Process, token: str = CHAT, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.url + "/v1", api_key=token, max_retries=0, timeout=10, **kw)


def raw(
    g: Process, method: str, path: str, body: bytes | None = None, token: str | None = CHAT
) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(g.url + path, data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def history(g: Process, sid: str) -> list[tuple[str, str]]:
    code, body = g.request("GET", f"/api/sessions/{sid}/history")
    assert code == 200, body
    return [(m["role"], m["content"]) for m in body["messages"]]


def assert_openai_error(body: Any, code: str | None, kind: str = "invalid_request_error") -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == kind
    assert body["error"]["code"] == code
    assert body["error"]["message"]


# -- models -----------------------------------------------------------------------------------


def test_models_list_and_retrieve(gateway: Process) -> None:
    c = client(gateway)
    models = c.models.list()
    assert [m.id for m in models.data] == ["echo-1", "default", "helper"]
    assert all(m.object == "model" and isinstance(m.created, int) for m in models.data)
    assert models.data[0].owned_by == "echo"
    assert c.models.retrieve("helper").id == "helper"
    assert c.models.retrieve("echo-1").owned_by == "echo"
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"


# -- chat completions ---------------------------------------------------------------------------


def test_chat_completion(gateway: Process) -> None:
    c = client(gateway)
    got = c.chat.completions.with_raw_response.create(
        model="echo-1",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}],
            },
        ],
    )
    completion = got.parse()
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "echo-1"
    assert completion.system_fingerprint
    assert abs(completion.created - time.time()) < 60
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "hello there"
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    # echo counts words of all it was sent: instructions, context and the turn
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2 + 2 + 2 + 2
    assert completion.usage.completion_tokens == 2
    assert completion.usage.total_tokens == 10
    # the earlier messages became the gatewayd session's context, stored before the turn
    sid = got.headers["x-session-id"]
    assert got.headers["x-run-id"].startswith("run_")
    assert history(gateway, sid) == [
        ("user", "first question"),
        ("assistant", "first answer"),
        ("user", "hello there"),
        ("assistant", "hello there"),
    ]


def test_chat_completion_streamed_with_usage(gateway: Process) -> None:
    c = client(gateway)
    chunks = list(
        c.chat.completions.create(
            model="echo-1",
            messages=[{"role": "user", "content": "one two  three"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [ch.choices[0].delta.content for ch in chunks[1:-2]]
    assert deltas == ["one ", "two  ", "three"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (3, 3)
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_completion_streamed_without_usage(gateway: Process) -> None:
    c = client(gateway)
    chunks = list(
        c.chat.completions.create(
            model="helper", messages=[{"role": "user", "content": "hi there"}], stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(ch.usage is None and ch.choices for ch in chunks)
    assert all(ch.model == "helper" for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "hi there"


def test_agent_tools_give_a_plain_assistant_message(gateway: Process) -> None:
    c = client(gateway)
    got = c.chat.completions.with_raw_response.create(
        model="echo-1", messages=[{"role": "user", "content": '/tool list_dir {"path": "."}'}]
    )
    completion = got.parse()
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)
    code, run = gateway.request("GET", f"/api/runs/{got.headers['x-run-id']}")
    assert code == 200 and run["tools_used"] == ["list_dir"]
    assert run["response"] == choice.message.content


def test_session_id_keeps_the_conversation(gateway: Process) -> None:
    c = client(gateway)
    sid = f"ses-openai-{time.monotonic_ns()}"
    headers = {"X-Session-Id": sid}
    convo: list[Any] = [
        {"role": "system", "content": "you echo"},
        {"role": "user", "content": "alpha"},
    ]
    first = c.chat.completions.create(model="echo-1", messages=convo, extra_headers=headers)
    assert first.choices[0].message.content == "alpha"
    # the client resends the whole conversation, as OpenAI clients do: nothing is doubled
    convo += [{"role": "assistant", "content": "alpha"}, {"role": "user", "content": "beta"}]
    second = c.chat.completions.create(model="echo-1", messages=convo, extra_headers=headers)
    assert second.choices[0].message.content == "beta"
    # or sends only the new turn: the session is the context
    third = c.chat.completions.create(
        model="echo-1", messages=[{"role": "user", "content": "gamma"}], extra_headers=headers
    )
    assert history(gateway, sid) == [
        ("user", "alpha"),
        ("assistant", "alpha"),
        ("user", "beta"),
        ("assistant", "beta"),
        ("user", "gamma"),
        ("assistant", "gamma"),
    ]
    assert first.usage and second.usage and third.usage
    assert (first.usage.prompt_tokens, second.usage.prompt_tokens) == (2 + 1, 2 + 3)
    assert third.usage.prompt_tokens == 5
    # another chat token cannot join it, and learns nothing about it
    with pytest.raises(openai.NotFoundError):
        client(gateway, CHAT2).chat.completions.create(
            model="echo-1", messages=[{"role": "user", "content": "x"}], extra_headers=headers
        )
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(
            model="echo-1",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Session-Id": "bad id!"},
        )


def test_full_session_queue_is_429_with_retry_after(gateway: Process) -> None:
    """max_queue_per_session = 1: a run waiting for approval fills its session."""
    c = client(gateway)
    sid = f"ses-busy-{time.monotonic_ns()}"
    stream = c.chat.completions.create(
        model="echo-1",
        stream=True,
        extra_headers={"X-Session-Id": sid},
        messages=[{"role": "user", "content": '/tool bash {"command": "echo hi"}'}],
    )
    try:
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        run_id = stream.response.headers["x-run-id"]
        with pytest.raises(openai.RateLimitError) as err:
            c.chat.completions.create(
                model="echo-1",
                messages=[{"role": "user", "content": "x"}],
                extra_headers={"X-Session-Id": sid},
            )
        assert err.value.code == "queue_full"
        assert int(err.value.response.headers["retry-after"]) >= 1
    finally:
        stream.close()  # the client hangs up; the run is not its connection's
    code, run = gateway.request("GET", f"/api/runs/{run_id}")
    assert code == 200 and run["status"] == "awaiting_approval"
    code, aborted = gateway.request("POST", f"/api/runs/{run_id}/abort", {})
    assert code == 202


# -- responses ----------------------------------------------------------------------------------


def test_responses_create(gateway: Process) -> None:
    c = client(gateway)
    response = c.responses.create(
        model="echo-1", input="hello  world", instructions="answer kindly", metadata={"k": "v"}
    )
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == "hello  world"
    [item] = response.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.content[0].type == "output_text"
    assert response.instructions == "answer kindly"
    assert response.metadata == {"k": "v"}
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (2 + 2, 2)
    assert response.usage.total_tokens == 6
    # previous_response_id continues that response's session
    follow = c.responses.create(model="echo-1", input="again", previous_response_id=response.id)
    assert follow.output_text == "again"
    assert follow.previous_response_id == response.id
    assert follow.usage is not None and follow.usage.input_tokens == 2 + 2 + 1
    with pytest.raises(openai.NotFoundError):
        client(gateway, CHAT2).responses.create(
            model="echo-1", input="x", previous_response_id=response.id
        )


def test_responses_input_items(gateway: Process) -> None:
    c = client(gateway)
    response = c.responses.create(
        model="default",
        input=[
            {"role": "developer", "content": "be short"},
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "reply"},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "now this"}],
            },
        ],
    )
    assert response.output_text == "now this"
    assert response.model == "default"
    assert response.usage is not None and response.usage.input_tokens == 2 + 1 + 1 + 2


def test_responses_streamed(gateway: Process) -> None:
    c = client(gateway)
    events = list(c.responses.create(model="echo-1", input="stream me please", stream=True))
    types = [e.type for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(d.delta for d in deltas) == "stream me please"
    item_id = events[2].item.id  # type: ignore[union-attr]
    assert all(
        d.item_id == item_id and d.output_index == 0 and d.content_index == 0 for d in deltas
    )
    created, completed = events[0], events[-1]
    assert created.response.status == "in_progress"  # type: ignore[union-attr]
    assert completed.response.id == created.response.id  # type: ignore[union-attr]
    assert completed.response.output_text == "stream me please"  # type: ignore[union-attr]
    assert completed.response.usage.output_tokens == 3  # type: ignore[union-attr]
    # the SDK's own accumulating helper agrees
    with c.responses.stream(model="echo-1", input="a b c") as stream:
        final = stream.get_final_response()
    assert final.output_text == "a b c" and final.status == "completed"


# -- embeddings ---------------------------------------------------------------------------------


def test_embeddings_on_echo_are_400(gateway: Process) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).embeddings.create(model="text-embedding-3-small", input="hello")
    assert err.value.code == "unsupported"


# -- errors -------------------------------------------------------------------------------------


def test_error_classes(gateway: Process) -> None:
    with pytest.raises(openai.AuthenticationError) as auth_err:
        client(gateway, "not-a-valid-token-0123456789").models.list()
    assert auth_err.value.code == "invalid_api_key"
    assert "not-a-valid" not in str(auth_err.value)  # the key is never echoed
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway, VIEWER).chat.completions.create(
            model="echo-1", messages=[{"role": "user", "content": "hi"}]
        )
    c = client(gateway)
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert nf.value.code == "model_not_found" and nf.value.param == "model"  # type: ignore[attr-defined]
    bad_bodies: list[dict[str, Any]] = [
        {"messages": []},
        {"messages": [{"role": "assistant", "content": "no user"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "   "}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
        {"messages": [{"role": "user", "content": "hi"}], "n": 2},
    ]
    for body in bad_bodies:
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="echo-1", **body)
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="echo-1", input=[{"type": "function_call_output"}])  # type: ignore[list-item]


def test_raw_error_shapes(gateway: Process) -> None:
    code, headers, body = raw(gateway, "GET", "/v1/models", token=None)
    assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert_openai_error(body, "invalid_api_key")
    code, _, body = raw(gateway, "GET", "/v1/nothing-here")
    assert code == 404
    assert_openai_error(body, "not_found")
    code, headers, body = raw(gateway, "GET", "/v1/chat/completions")
    assert code == 405 and headers["Allow"] == "POST"
    code, _, body = raw(gateway, "POST", "/v1/chat/completions", b"{not json")
    assert code == 400
    assert_openai_error(body, None)
    code, _, body = raw(gateway, "POST", "/v1/chat/completions", b"[1]")
    assert code == 400
    code, _, body = raw(gateway, "POST", "/v1/chat/completions", b"\xff\xfe")
    assert code == 400
    code, _, body = raw(gateway, "GET", "/v1/models/nope")
    assert code == 404
    assert_openai_error(body, "model_not_found")


def test_body_over_4_mib_is_413(gateway: Process) -> None:
    text = "x" * (4 * 1024 * 1024)
    with pytest.raises(openai.APIStatusError) as err:
        client(gateway).chat.completions.create(
            model="echo-1", messages=[{"role": "user", "content": text}]
        )
    assert err.value.status_code == 413
    # just under the cap is fine (and goes through the whole run)
    body = json.dumps(
        {"model": "echo-1", "messages": [{"role": "user", "content": "y" * 900_000}]}
    ).encode()
    code, _, answer = raw(gateway, "POST", "/v1/chat/completions", body)
    assert code == 200 and len(answer["choices"][0]["message"]["content"]) == 900_000


# -- in this process: disconnects and failures --------------------------------------------


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class _RawClient(protocol.Protocol):
    """A client that sends one request, collects bytes, and can hang up at any moment."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for marker, d in list(self._waiting):
            if marker in self.received:
                self._waiting.remove((marker, d))
                d.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def until(self, marker: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if marker in self.received:
            d.callback(None)
        else:
            self._waiting.append((marker, d))
        return d.addTimeout(5, _reactor())


def _post(path: str, body: dict[str, Any], token: str, port: int) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def _connect(g: Running, request: bytes) -> _RawClient:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    proto = _RawClient(request)
    await connectProtocol(TCP4ClientEndpoint(_reactor(), "127.0.0.1", g.port), proto)
    return proto


@pytest_twisted.ensureDeferred
async def test_client_hanging_up_mid_stream_leaves_the_run_going(tmp_path: Any) -> None:
    config = '[gateway]\nlisten = ["tcp:0:interface=127.0.0.1"]\nsse_keepalive_s = 0.05\n'
    g = await start_gateway(str(tmp_path), config + TOKENS_TOML)
    gw = g.gateway
    approvals: dict[str, Deferred[Event]] = {}

    def requested(event: Event) -> None:
        assert event.run_id is not None
        approvals.setdefault(event.run_id, Deferred()).callback(event)

    sub = gw.bus.subscribe(requested, make_filter(types=["approval_requested"]))
    message = '/tool bash {"command": "echo hi"}'
    try:
        for path, body in (
            (
                "/v1/chat/completions",
                {
                    "model": "echo-1",
                    "stream": True,
                    "messages": [{"role": "user", "content": message}],
                },
            ),
            ("/v1/responses", {"model": "echo-1", "stream": True, "input": message}),
        ):
            client_ = await _connect(g, _post(path, body, CHAT, g.port))
            await client_.until(b": keep-alive")  # headers, the opening events, keep-alives
            head = client_.received.split(b"\r\n\r\n", 1)[0].decode()
            assert "text/event-stream" in head
            run_id = next(
                line.split(": ")[1]
                for line in head.split("\r\n")
                if line.lower().startswith("x-run-id")
            )
            approval = await approvals.setdefault(run_id, Deferred()).addTimeout(5, _reactor())
            if path == "/v1/chat/completions":
                # revoking the token ends its streams at once, in OpenAI's terms
                chat = gw.tokens.authenticate(CHAT)
                assert gw.streams.revoke(chat.token_id) == 1
                await client_.until(b"0\r\n\r\n")  # the chunked body's end
                assert b'data: {"error":' in client_.received
                assert gw.connections["sse"] == 0
            client_.transport.loseConnection()  # type: ignore[union-attr]
            await client_.lost
            assert gw.runs.live(run_id) is not None  # the run did not go with its client
            admin = gw.tokens.authenticate(ADMIN)
            await gw.approvals.resolve(admin, approval.payload["approval_id"], "approve", None)
            run = await gw.runs.wait(run_id)
            assert run.status == "completed" and run.response == "hi\n"
        assert gw.connections["sse"] == 0  # the streams were released
    finally:
        sub.cancel()
        await g.stop()


def _openai_config(base_url: str) -> str:
    return (
        '[gateway]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        + TOKENS_TOML
        + f'[agent]\nprovider = "openai"\nmodel = "gpt-standin"\nbase_url = "{base_url}"\n'
        'api_key = "sk-standin"\nmax_retries = 0\n'
    )


@pytest_twisted.ensureDeferred
async def test_failing_provider_in_openai_terms(tmp_path: Any) -> None:
    standin = OpenAIStandIn(api_key="sk-standin")
    port, base_url = listen_standin(standin)
    g = await start_gateway(str(tmp_path), _openai_config(base_url))
    c = openai.OpenAI(base_url=g.url + "/v1", api_key=CHAT, max_retries=0, timeout=10)
    convo = [{"role": "user", "content": "hi"}]
    try:
        # non-streaming: a server error the SDK is told not to retry (the turn already ran)
        standin.script.append(openai_error(500, "upstream broke", kind="server_error"))
        with pytest.raises(openai.InternalServerError) as err:
            await deferToThread(
                lambda: c.chat.completions.create(model="gpt-standin", messages=convo)  # type: ignore[arg-type]
            )
        assert err.value.status_code == 503
        assert err.value.response.headers["x-should-retry"] == "false"
        # streamed chat: the SDK raises on the error line that ends the stream
        standin.script.append(openai_error(500, "upstream broke", kind="server_error"))

        def chat_stream() -> list[Any]:
            return list(
                c.chat.completions.create(
                    model="gpt-standin",
                    messages=convo,
                    stream=True,  # type: ignore[arg-type]
                )
            )

        with pytest.raises(openai.APIError, match="the run failed"):
            await deferToThread(chat_stream)
        # streamed response: response.failed
        standin.script.append(openai_error(500, "upstream broke", kind="server_error"))
        events = await deferToThread(
            lambda: list(c.responses.create(model="gpt-standin", input="hi", stream=True))
        )
        assert events[-1].type == "response.failed"
        assert events[-1].response.status == "failed"
        assert events[-1].response.error.code == "server_error"
        # embeddings go to the provider, in both encodings
        result = await deferToThread(
            lambda: c.embeddings.create(model="text-embedding-3-small", input=["a", "b c"])
        )
        assert [len(d.embedding) for d in result.data] == [4, 4]
        asked = standin.requests_to("/v1/embeddings")[-1].json
        assert asked["input"] == ["a", "b c"]
        floats = await deferToThread(
            lambda: c.embeddings.create(model="m", input="a", encoding_format="float")
        )
        assert floats.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-6)
    finally:
        c.close()
        await g.stop()
        await stop_standin(port)


# -- the conversation split, as pure functions ------------------------------------------------


def test_conversation_split() -> None:
    from gatewayd.errors import GatewayError
    from gatewayd.ops.openai import chat_conversation, responses_conversation

    convo = chat_conversation(
        [
            {"role": "system", "content": "one"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
            {"role": "tool", "content": "tool output", "tool_call_id": "c"},
            {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
            {"role": "developer", "content": "two"},
            {"role": "user", "content": "q2"},
            {"role": "system", "content": "three"},
        ]
    )
    assert convo.turn == "q2"
    assert convo.context == (("user", "q1"), ("assistant", "a1"))
    assert convo.instructions == "one\n\ntwo\n\nthree"
    plain = responses_conversation("just this", "be kind")
    assert (plain.turn, plain.context, plain.instructions) == ("just this", (), "be kind")
    for bad_input in ("", [], [{"role": "user", "content": 5}], [{"role": "robot"}], None):
        with pytest.raises(GatewayError) as err:
            responses_conversation(bad_input, None)
        assert err.value.status == 400 and err.value.data["param"].startswith("input")
    with pytest.raises(GatewayError):
        responses_conversation("x", 7)


@pytest_twisted.ensureDeferred
async def test_edge_refusals_under_v1_speak_openai(tmp_path: Any) -> None:
    """413 from the site's limits and 429 from the rate limiter use OpenAI's error shape."""
    import treq

    from tests.harness import ADMIN, TOKENS_TOML, auth, start_gateway

    config = "[gateway.rate_limit]\nrate_per_s = 0.01\nburst = 1\n" + TOKENS_TOML
    g = await start_gateway(str(tmp_path), config)
    try:
        big = b'{"model": "echo-1", "messages": []}' + b" " * (4 * 1024 * 1024)
        resp = await treq.post(g.url + "/v1/chat/completions", big, headers=auth(ADMIN))
        body = await resp.json()
        assert resp.code == 413 and set(body["error"]) == {"message", "type", "param", "code"}
        for _ in range(2):
            resp = await treq.get(g.url + "/v1/models", headers=auth(ADMIN))
            body = await resp.json()
        assert resp.code == 429 and body["error"]["type"] == "requests"
        assert resp.headers.getRawHeaders(b"retry-after")
        resp = await treq.get(g.url + "/api/status", headers=auth(ADMIN))
        assert resp.code == 429 and set((await resp.json())["error"]) == {"code", "message"}
    finally:
        await g.stop()
