"""The openai and anthropic providers: request shapes, stream assembly, and the HTTP rules
(retries, timeouts, cancellation, secrecy) over real loopback sockets against stand-ins."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.web.http_headers import Headers
from zope.interface import provider

from gatewayd.agent.base import (
    ChatMessage,
    ProviderError,
    ProviderRequest,
    ProviderTurn,
    ToolCall,
    ToolSpec,
    Usage,
)
from gatewayd.agent.providers.anthropic import (
    AnthropicProvider,
    AnthropicStream,
    anthropic_request_body,
)
from gatewayd.agent.providers.http import (
    HTTPSettings,
    UpstreamHTTP,
    _Retry,
    parse_retry_after,
    upstream_message,
)
from gatewayd.agent.providers.openai import (
    OpenAIProvider,
    OpenAIStream,
    openai_request_body,
    parse_arguments,
)
from tests.standins import (
    AnthropicStandIn,
    Hang,
    OpenAIStandIn,
    ScriptedStandIn,
    Stream,
    anthropic_error,
    anthropic_error_event,
    anthropic_event,
    anthropic_text_events,
    anthropic_tool_use_events,
    listen_standin,
    openai_chunk,
    openai_error,
    openai_text_chunks,
    openai_tool_call_chunks,
    stop_standin,
)

KEY = "sk-test-SECRET-1234567890abcdef"

TOOLS = (
    ToolSpec(
        "bash",
        "Run a shell command",
        {"type": "object", "properties": {"command": {"type": "string"}}},
    ),
)

HISTORY = (
    ChatMessage("user", "list the files"),
    ChatMessage(
        "assistant",
        "Let me look.",
        tool_calls=(ToolCall("call_1", "bash", {"command": "ls"}),),
    ),
    ChatMessage("tool", "a.txt\nb.txt\n", tool_call_id="call_1", name="bash"),
    ChatMessage(
        "assistant", "", tool_calls=(ToolCall("call_2", "bash", {"command": "cat a.txt"}),)
    ),
    ChatMessage("tool", "permission denied", tool_call_id="call_2", name="bash", is_error=True),
    ChatMessage("user", "and now?"),
)


def request(*messages: ChatMessage, system: str = "", tools: tuple[ToolSpec, ...] = ()) -> Any:
    return ProviderRequest(model="", system=system, messages=messages, tools=tools)


# -- hygiene: every test leaves no timers behind, and no secret in any log line -------------


@pytest.fixture(autouse=True)
def no_leftover_delayed_calls() -> Iterator[None]:
    from twisted.internet import reactor

    before = set(reactor.getDelayedCalls())  # type: ignore[attr-defined]
    yield
    left = [
        c
        for c in reactor.getDelayedCalls()  # type: ignore[attr-defined]
        if c not in before and c.active()
    ]
    assert left == [], f"pending DelayedCalls: {left}"


@pytest.fixture(autouse=True)
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        lines.append(formatEvent(event) or "")
        if "log_failure" in event:
            lines.append(str(event["log_failure"].getTraceback()))

    globalLogPublisher.addObserver(observe)
    yield lines
    gc.collect()  # a Deferred dropped with an unhandled failure logs it when collected
    globalLogPublisher.removeObserver(observe)
    assert not [line for line in lines if KEY in line], "the API key reached a log line"
    assert not [line for line in lines if "Unhandled error in Deferred" in line], lines


def within(d: Deferred[Any], seconds: float = 5) -> Deferred[Any]:
    """``d``, but failing after ``seconds`` rather than hanging the suite."""
    from twisted.internet import reactor

    return d.addTimeout(seconds, reactor)


def when_logged(fragment: str) -> Deferred[None]:
    """A Deferred that fires the first time a log line contains ``fragment``."""
    d: Deferred[None] = Deferred()

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if fragment in (formatEvent(event) or "") and not d.called:
            globalLogPublisher.removeObserver(observe)
            d.callback(None)

    globalLogPublisher.addObserver(observe)
    return d


class Rig:
    """A stand-in on loopback and a provider pointed at it; ``close()`` tidies both."""

    def __init__(self, standin: ScriptedStandIn, make: Callable[..., Any], **knobs: Any) -> None:
        from twisted.internet import reactor

        self.standin = standin
        self.port, self.base_url = listen_standin(standin)
        knobs.setdefault("read_timeout_s", 5)  # every turn is bounded, even a broken one
        knobs.setdefault("backoff_base_s", 0.001)
        knobs.setdefault("backoff_max_s", 0.01)
        self.provider = make(reactor, base_url=self.base_url, api_key=KEY, model="m-1", **knobs)
        self.texts: list[str] = []

    def turn(self, req: ProviderRequest) -> Deferred[ProviderTurn]:
        d: Deferred[ProviderTurn] = self.provider.turn(req, self.texts.append)
        return within(d, 10)

    async def close(self) -> None:
        await self.provider.close()
        await stop_standin(self.port)


async def failure_of(d: Deferred[Any]) -> BaseException:
    try:
        await d
    except BaseException as exc:  # noqa: BLE001 - we want whatever it was
        return exc
    raise AssertionError("expected a failure")


# -- request shapes (pure) ------------------------------------------------------------------


def test_openai_request_body_shape() -> None:
    body = openai_request_body(request(*HISTORY, system="Be brief.", tools=TOOLS), "gpt-x")
    assert body["model"] == "gpt-x"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "list the files"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "bash", "arguments": '{"command": "ls"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a.txt\nb.txt\n"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "bash", "arguments": '{"command": "cat a.txt"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_2", "content": "permission denied"},
        {"role": "user", "content": "and now?"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "bash",
                "description": "Run a shell command",
                "parameters": TOOLS[0].input_schema,
            },
        }
    ]
    bare = openai_request_body(request(ChatMessage("user", "hi")), "gpt-x")
    assert "tools" not in bare
    assert bare["messages"] == [{"role": "user", "content": "hi"}]


def test_anthropic_request_body_shape() -> None:
    req = request(
        ChatMessage("system", "Extra rule."),
        *HISTORY,
        ChatMessage("user", "please"),
        system="Be brief.",
        tools=TOOLS,
    )
    body = anthropic_request_body(req, "claude-x", 1000)
    assert body["model"] == "claude-x"
    assert body["max_tokens"] == 1000
    assert body["stream"] is True
    assert body["system"] == "Be brief.\n\nExtra rule."
    assert body["tools"] == [
        {
            "name": "bash",
            "description": "Run a shell command",
            "input_schema": TOOLS[0].input_schema,
        }
    ]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "list the files"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "call_1", "name": "bash", "input": {"command": "ls"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "a.txt\nb.txt\n"}
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_2",
                    "name": "bash",
                    "input": {"command": "cat a.txt"},
                }
            ],
        },
        {
            "role": "user",  # the tool result and both user messages merged, results first
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": "permission denied",
                    "is_error": True,
                },
                {"type": "text", "text": "and now?"},
                {"type": "text", "text": "please"},
            ],
        },
    ]
    roles = [m["role"] for m in body["messages"]]
    assert all(a != b for a, b in zip(roles, roles[1:], strict=False))
    bare = anthropic_request_body(request(ChatMessage("user", "hi")), "c", 10)
    assert "system" not in bare and "tools" not in bare
    # A user remark that lands between a tool call and its result: results still go first.
    late = anthropic_request_body(
        request(
            ChatMessage("assistant", "", tool_calls=(ToolCall("t1", "ls", {}),)),
            ChatMessage("user", "hurry"),
            ChatMessage("tool", "ok", tool_call_id="t1"),
        ),
        "c",
        10,
    )
    assert late["messages"][1]["content"] == [
        {"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
        {"type": "text", "text": "hurry"},
    ]


def test_parse_arguments_never_raises() -> None:
    assert parse_arguments('{"a": 1}') == {"a": 1}
    assert parse_arguments("") == {}
    assert parse_arguments('{"a": ') == {"_raw": '{"a": '}
    assert parse_arguments("[1, 2]") == {"_raw": "[1, 2]"}


def test_retry_after_and_backoff() -> None:
    def h(**values: str) -> Headers:
        return Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in values.items()})

    now = 1_700_000_000.0
    assert parse_retry_after(h(retry_after="7"), now) == 7.0
    assert parse_retry_after(h(retry_after="0"), now) == 0.0
    assert parse_retry_after(h(retry_after_ms="250", retry_after="9"), now) == 0.25
    date = format_datetime(datetime.fromtimestamp(now + 30, tz=UTC), usegmt=True)
    assert parse_retry_after(h(retry_after=date), now) == pytest.approx(30, abs=1)
    past = format_datetime(datetime.fromtimestamp(now - 30, tz=UTC), usegmt=True)
    assert parse_retry_after(h(retry_after=past), now) == 0.0
    assert parse_retry_after(h(retry_after="soon"), now) is None
    assert parse_retry_after(h(retry_after="-3"), now) is None
    assert parse_retry_after(Headers(), now) is None

    s = HTTPSettings(backoff_base_s=0.5, backoff_max_s=8)
    assert [s.backoff(i) for i in range(6)] == [0.5, 1, 2, 4, 8, 8]
    assert s.backoff(0, retry_after=3) == 3
    assert s.backoff(0, retry_after=3600) == 8  # capped


def test_retry_schedule_and_cancel_on_a_clock() -> None:
    """The waits between tries, driven by a Clock: exponential, Retry-After wins, capped."""
    clock = Clock()
    http = UpstreamHTTP(
        clock,
        label="t",
        settings=HTTPSettings(max_retries=3, backoff_base_s=0.5, backoff_max_s=4),
        secrets=("s3cret",),
    )
    times: list[float] = []
    wishes = [None, 2.5, 60.0, None]

    async def attempt(call: Any) -> None:
        times.append(clock.seconds())
        raise _Retry("t: busy s3cret", "upstream_error", 503, wishes[len(times) - 1])

    d = http._cancellable(lambda call: http._with_retries(call, attempt, 3))
    for _ in range(40):
        clock.advance(0.25)
    assert times == [0, 0.5, 3.0, 7.0]  # 0.5 (base), 2.5 (asked), 4 (60 capped at 4)
    failures: list[Any] = []
    d.addErrback(failures.append)
    [failure] = failures
    assert failure.value.code == "upstream_error"
    assert "4 attempts" in failure.value.message and "s3cret" not in failure.value.message
    assert clock.getDelayedCalls() == []

    times.clear()
    d = http._cancellable(lambda call: http._with_retries(call, attempt, 3))
    assert len(times) == 1 and len(clock.getDelayedCalls()) == 1  # waiting to retry
    d.cancel()
    d.addErrback(failures.append)
    assert failures[-1].check(CancelledError)
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert len(times) == 1


def test_check_rule() -> None:
    from twisted.internet import reactor

    http = UpstreamHTTP(reactor, label="t", settings=HTTPSettings())
    for ok in (200, 204, 404, 405, 429):
        http.judge_probe(ok)
    for bad in (401, 403, 500, 503):
        with pytest.raises(ProviderError):
            http.judge_probe(bad)


def test_upstream_message_shapes() -> None:
    assert upstream_message(b'{"error": {"message": "bad model"}}') == "bad model"
    assert upstream_message(b'{"type":"error","error":{"type":"x","message":"m"}}') == "m"
    assert upstream_message(b'{"error": "plain"}') == "plain"
    assert upstream_message(b"<html>oops</html>") == "<html>oops</html>"
    assert upstream_message(b"") == "(empty body)"


def test_repr_hides_the_key() -> None:
    from twisted.internet import reactor

    for cls in (OpenAIProvider, AnthropicProvider):
        p = cls(reactor, base_url="", api_key=KEY, model="m")
        assert KEY not in repr(p)
        assert KEY not in repr(p.__dict__.get("_http"))
        p.close()
    assert OpenAIProvider(reactor, base_url="", api_key="", model="m").base_url == (
        "https://api.openai.com/v1"
    )
    assert AnthropicProvider(reactor, base_url="", api_key="", model="m").base_url == (
        "https://api.anthropic.com"
    )
    assert (
        AnthropicProvider(reactor, base_url="http://x/v1/", api_key="", model="m").base_url
        == "http://x"
    )


# -- stream assembly (pure) -----------------------------------------------------------------


def assemble(cls: Any, chunks: list[bytes]) -> tuple[ProviderTurn, list[str]]:
    texts: list[str] = []
    stream = cls(texts.append)
    done = False
    for chunk in chunks:
        done = stream.feed(chunk)
    assert done
    return stream.finish(), texts


def test_openai_assembles_text_tools_and_usage() -> None:
    chunks = openai_tool_call_chunks(
        [("call_a", "bash", '{"command": "echo hi"}'), ("call_b", "read_file", "{not json")],
        text="Checking now.",
        usage=Usage(11, 22),
    )
    turn, texts = assemble(OpenAIStream, chunks)
    assert texts == ["Checking ", "now."]
    assert turn == ProviderTurn(
        text="Checking now.",
        tool_calls=(
            ToolCall("call_a", "bash", {"command": "echo hi"}),
            ToolCall("call_b", "read_file", {"_raw": "{not json"}),
        ),
        usage=Usage(11, 22),
        stop_reason="tool_calls",
    )


def test_openai_tolerates_server_quirks() -> None:
    # Ollama-style: no index, whole call in one chunk, arguments as an object, "stop".
    chunks = [
        openai_chunk(
            {
                "tool_calls": [
                    {"id": "c1", "function": {"name": "ls", "arguments": {"path": "."}}},
                    {"id": "c2", "function": {"name": "ls", "arguments": '{"path": "/"}'}},
                ]
            }
        ),
        openai_chunk({}, finish_reason="stop"),
        b"data: [DONE]\n\n",
    ]
    turn, _ = assemble(OpenAIStream, chunks)
    assert turn.tool_calls == (
        ToolCall("c1", "ls", {"path": "."}),
        ToolCall("c2", "ls", {"path": "/"}),
    )
    assert turn.stop_reason == "tool_calls"
    assert turn.usage == Usage()


def test_openai_stream_errors() -> None:
    stream = OpenAIStream(lambda _: None)
    stream.feed(openai_chunk({"content": "partial"}))
    with pytest.raises(ProviderError, match="ended before"):
        stream.finish()
    with pytest.raises(ProviderError, match="overloaded") as info:
        OpenAIStream(lambda _: None).feed(b'data: {"error": {"message": "overloaded"}}\n\n')
    assert info.value.code == "upstream_error"
    with pytest.raises(ProviderError, match="malformed"):
        OpenAIStream(lambda _: None).feed(b"data: {oops\n\n")


def test_anthropic_assembles_text_tools_and_usage() -> None:
    chunks = anthropic_tool_use_events(
        [("toolu_1", "bash", '{"command": "echo hi"}'), ("toolu_2", "list_dir", "")],
        text="On it.",
        usage=Usage(30, 40),
    )
    turn, texts = assemble(AnthropicStream, chunks)
    assert texts == ["On ", "it."]
    assert turn == ProviderTurn(
        text="On it.",
        tool_calls=(
            ToolCall("toolu_1", "bash", {"command": "echo hi"}),
            ToolCall("toolu_2", "list_dir", {}),
        ),
        usage=Usage(30, 40),
        stop_reason="tool_calls",
    )
    turn, _ = assemble(AnthropicStream, anthropic_text_events("Hi.", Usage(1, 2)))
    assert (turn.text, turn.stop_reason, turn.usage) == ("Hi.", "stop", Usage(1, 2))
    turn, _ = assemble(
        AnthropicStream, anthropic_text_events("Cut", Usage(1, 2), stop_reason="max_tokens")
    )
    assert turn.stop_reason == "length"


def test_anthropic_cache_tokens_count_as_input_and_unknown_blocks_are_ignored() -> None:
    chunks = [
        anthropic_event(
            "message_start",
            {
                "message": {
                    "usage": {
                        "input_tokens": 3,
                        "cache_creation_input_tokens": 10,
                        "cache_read_input_tokens": 100,
                        "output_tokens": 1,
                    }
                }
            },
        ),
        anthropic_event("content_block_start", {"index": 0, "content_block": {"type": "thinking"}}),
        anthropic_event(
            "content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "x": "y"}}
        ),
        anthropic_event("content_block_stop", {"index": 0}),
        anthropic_event("some_future_event", {}),
        anthropic_event(
            "message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}
        ),
        anthropic_event("message_stop", {}),
    ]
    turn, texts = assemble(AnthropicStream, chunks)
    assert texts == [] and turn.usage == Usage(113, 9) and turn.stop_reason == "stop"


def test_anthropic_error_event() -> None:
    stream = AnthropicStream(lambda _: None)
    with pytest.raises(ProviderError, match="Overloaded") as info:
        stream.feed(anthropic_error_event("overloaded_error", "Overloaded"))
    assert info.value.code == "upstream_error"
    with pytest.raises(ProviderError) as info:
        AnthropicStream(lambda _: None).feed(anthropic_error_event("rate_limit_error", "slow"))
    assert info.value.code == "upstream_rate_limited"
    stream = AnthropicStream(lambda _: None)
    stream.feed(b"".join(anthropic_text_events("x")[:3]))
    with pytest.raises(ProviderError, match="ended before"):
        stream.finish()


# -- any split of the bytes gives the same turn --------------------------------------------

_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
_json_value = st.one_of(st.integers(), st.booleans(), _text, st.none())
_inputs = st.dictionaries(
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8),
    _json_value,
    max_size=4,
)
_calls = st.lists(st.tuples(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), _inputs), max_size=3)


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _check_splits(cls: Any, chunks: list[bytes], data: st.DataObject) -> ProviderTurn:
    raw = b"".join(chunks)
    whole, whole_texts = assemble(cls, [raw])
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=30))
    split, split_texts = assemble(cls, _cut(raw, cuts))
    assert split == whole
    assert split_texts == whole_texts
    assert "".join(whole_texts) == whole.text
    return whole


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_text, _calls, st.integers(1, 6), st.data())
def test_openai_any_split_same_turn(
    text: str, calls: list[tuple[str, dict[str, Any]]], pieces: int, data: st.DataObject
) -> None:
    wire = [
        (f"call_{i}", name, json.dumps(args, ensure_ascii=False))
        for i, (name, args) in enumerate(calls)
    ]
    if calls:
        chunks = openai_tool_call_chunks(wire, text=text, arg_pieces=pieces, usage=Usage(4, 2))
    else:
        chunks = openai_text_chunks(text, Usage(4, 2))
    turn = _check_splits(OpenAIStream, chunks, data)
    assert turn.text == text
    assert [(c.name, c.input) for c in turn.tool_calls] == calls
    assert turn.usage == Usage(4, 2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_text, _calls, st.integers(1, 6), st.data())
def test_anthropic_any_split_same_turn(
    text: str, calls: list[tuple[str, dict[str, Any]]], pieces: int, data: st.DataObject
) -> None:
    wire = [
        (f"toolu_{i}", name, json.dumps(args, ensure_ascii=False))
        for i, (name, args) in enumerate(calls)
    ]
    if calls:
        chunks = anthropic_tool_use_events(wire, text=text, json_pieces=pieces, usage=Usage(4, 2))
    else:
        chunks = anthropic_text_events(text, Usage(4, 2))
    turn = _check_splits(AnthropicStream, chunks, data)
    assert turn.text == text
    assert [(c.name, c.input) for c in turn.tool_calls] == calls
    assert turn.usage == Usage(4, 2)


# -- OpenAI over loopback -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_openai_streams_text_in_order() -> None:
    standin = OpenAIStandIn(api_key=KEY)
    standin.script.append(
        Stream(openai_text_chunks("Hello there, wörld €!", Usage(12, 5)), gap_s=0.001)
    )
    rig = Rig(standin, OpenAIProvider)
    try:
        turn = await rig.turn(request(ChatMessage("user", "hi"), system="sys"))
        assert rig.texts == ["Hello ", "there, ", "wörld ", "€!"]
        assert turn == ProviderTurn("Hello there, wörld €!", (), Usage(12, 5), "stop")
        [rec] = standin.requests
        assert rec.path == "/v1/chat/completions"
        assert rec.headers["authorization"] == f"Bearer {KEY}"
        assert rec.json["model"] == "m-1"
        assert rec.json["stream"] is True
        assert rec.json["stream_options"] == {"include_usage": True}
        assert rec.json["messages"] == [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hi"},
        ]
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_a_request_on_a_pooled_connection_leaves_at_once() -> None:
    """Time to first token: on a kept-alive connection the whole request (head and body, in
    one piece) is on the wire before ``turn`` returns, not a reactor pass later."""
    import socket

    standin = OpenAIStandIn(api_key=KEY)
    standin.script += [Stream(openai_text_chunks("one")), Stream(openai_text_chunks("two"))]
    rig = Rig(standin, OpenAIProvider)
    try:
        await rig.turn(request(ChatMessage("user", "first")))  # leaves a pooled connection
        [channel] = [c for c in rig.port.factory.channels if c.transport is not None]
        server_side = channel.transport.socket
        d = rig.turn(request(ChatMessage("user", "second")))
        # still inside this reactor turn: the stand-in has read nothing yet, the kernel has it
        waiting = server_side.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        head, _, body = waiting.partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v1/chat/completions HTTP/1.1")
        assert json.loads(body)["messages"] == [{"role": "user", "content": "second"}]
        assert (await d).text == "two"
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_an_upstream_cookie_is_never_sent_back() -> None:
    """One user's run must not carry what the model API set during another's."""
    standin = OpenAIStandIn(api_key=KEY)
    first = Stream(openai_text_chunks("one"))
    first.headers["Set-Cookie"] = "sid=from-someone-else; Path=/"
    standin.script += [first, Stream(openai_text_chunks("two"))]
    rig = Rig(standin, OpenAIProvider)
    try:
        await rig.turn(request(ChatMessage("user", "first")))
        assert (await rig.turn(request(ChatMessage("user", "second")))).text == "two"
        assert [r.headers.get("cookie") for r in standin.requests] == [None, None]
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_openai_tool_call_round_trip_and_history_shape() -> None:
    standin = OpenAIStandIn(api_key=KEY)
    args = '{"command": "echo \\"hi there\\""}'
    standin.script += [
        Stream(
            openai_tool_call_chunks([("call_xyz", "bash", args)], arg_pieces=5, usage=Usage(9, 3))
        ),
        Stream(openai_text_chunks("Done.", Usage(20, 1))),
    ]
    rig = Rig(standin, OpenAIProvider)
    try:
        first = await rig.turn(request(ChatMessage("user", "say hi"), tools=TOOLS))
        assert first.tool_calls == (ToolCall("call_xyz", "bash", {"command": 'echo "hi there"'}),)
        assert first.stop_reason == "tool_calls" and first.usage == Usage(9, 3)
        history = (
            ChatMessage("user", "say hi"),
            ChatMessage("assistant", first.text, tool_calls=first.tool_calls),
            ChatMessage("tool", "hi there\n", tool_call_id="call_xyz", name="bash"),
        )
        second = await rig.turn(request(*history, tools=TOOLS))
        assert second.text == "Done." and second.tool_calls == ()
        sent = standin.requests[1].json
        assert sent["tools"][0]["function"]["name"] == "bash"
        assert sent["messages"][1] == {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_xyz",
                    "type": "function",
                    "function": {
                        "name": "bash",
                        "arguments": json.dumps(first.tool_calls[0].input),
                    },
                }
            ],
        }
        assert sent["messages"][2] == {
            "role": "tool",
            "tool_call_id": "call_xyz",
            "content": "hi there\n",
        }
        assert rig.port.factory.connections_made == 1  # the pool kept the connection
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_openai_429_then_success() -> None:
    standin = OpenAIStandIn(api_key=KEY)
    standin.script += [
        openai_error(429, "slow down", kind="rate_limit_exceeded", retry_after="0"),
        Stream(openai_text_chunks("ok", Usage(1, 1))),
    ]
    rig = Rig(standin, OpenAIProvider, backoff_base_s=30, backoff_max_s=30)
    try:
        turn = await rig.turn(request(ChatMessage("user", "hi")))  # Retry-After: 0 beats 30 s
        assert turn.text == "ok"
        assert len(standin.requests) == 2
        assert standin.requests[0].json == standin.requests[1].json
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_openai_5xx_exhaustion() -> None:
    standin = OpenAIStandIn(api_key=KEY)
    standin.script += [openai_error(503, "upstream sad", kind="server_error")] * 3
    rig = Rig(standin, OpenAIProvider, max_retries=2)
    try:
        exc = await failure_of(rig.turn(request(ChatMessage("user", "hi"))))
        assert isinstance(exc, ProviderError)
        assert exc.code == "upstream_error"
        assert (
            "503" in exc.message and "upstream sad" in exc.message and "3 attempts" in exc.message
        )
        assert len(standin.requests) == 3
        assert rig.texts == []
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_openai_429_exhaustion_caps_retry_after() -> None:
    standin = OpenAIStandIn(api_key=KEY)
    standin.script += [openai_error(429, "quota", retry_after="3600")] * 2
    rig = Rig(standin, OpenAIProvider, max_retries=1, backoff_max_s=0.01)
    try:
        exc = await failure_of(rig.turn(request(ChatMessage("user", "hi"))))
        assert isinstance(exc, ProviderError) and exc.code == "upstream_rate_limited"
        assert len(standin.requests) == 2
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_openai_4xx_is_not_retried_and_never_shows_the_key(log_lines: list[str]) -> None:
    standin = OpenAIStandIn(api_key="sk-the-right-one")  # our KEY is wrong: 401 quotes it
    rig = Rig(standin, OpenAIProvider)
    try:
        exc = await failure_of(rig.turn(request(ChatMessage("user", "hi"))))
        assert isinstance(exc, ProviderError) and exc.code == "upstream_error"
        assert "Incorrect API key provided" in exc.message and "401" in exc.message
        assert KEY not in exc.message and KEY not in str(exc) and KEY not in repr(exc)
        assert len(standin.requests) == 1
        check = await failure_of(rig.provider.check())
        assert isinstance(check, ProviderError) and KEY not in str(check)
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_openai_hanging_server_hits_the_read_timeout() -> None:
    standin = OpenAIStandIn()
    standin.script.append(Hang())
    rig = Rig(standin, OpenAIProvider, read_timeout_s=0.3)
    try:
        exc = await failure_of(rig.turn(request(ChatMessage("user", "hi"))))
        assert isinstance(exc, ProviderError) and exc.code == "upstream_timeout"
        assert await within(standin.requests[0].outcome) == "lost"
        assert len(standin.requests) == 1  # timeouts are not retried
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_openai_slow_but_steady_stream_is_not_a_timeout() -> None:
    standin = OpenAIStandIn()
    chunks = openai_text_chunks("a b c d e f")  # 10 chunks, 0.05 s apart: 0.5 s in all
    standin.script.append(Stream(chunks, gap_s=0.05))
    rig = Rig(standin, OpenAIProvider, read_timeout_s=0.2)
    try:
        turn = await rig.turn(request(ChatMessage("user", "hi")))
        assert turn.text == "a b c d e f"
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_openai_stream_that_stalls_midway_times_out() -> None:
    standin = OpenAIStandIn()
    standin.script.append(Stream(openai_text_chunks("one two three")[:3], hold_open=True))
    rig = Rig(standin, OpenAIProvider, read_timeout_s=0.3)
    try:
        exc = await failure_of(rig.turn(request(ChatMessage("user", "hi"))))
        assert isinstance(exc, ProviderError) and exc.code == "upstream_timeout"
        assert rig.texts == ["one ", "two "]
        assert await within(standin.requests[0].outcome) == "lost"
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_openai_cancel_mid_stream_closes_the_connection() -> None:
    standin = OpenAIStandIn()
    standin.script.append(Stream(openai_text_chunks("first words")[:2], hold_open=True))
    rig = Rig(standin, OpenAIProvider)
    got_text: Deferred[None] = Deferred()
    try:
        d = rig.provider.turn(request(ChatMessage("user", "hi")), lambda t: got_text.callback(None))
        await within(got_text)
        d.cancel()
        assert isinstance(await failure_of(d), CancelledError)
        assert await within(standin.requests[0].outcome) == "lost"
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_openai_cancel_before_headers_and_during_backoff() -> None:
    standin = OpenAIStandIn()
    standin.script += [Hang(), openai_error(503, "busy", retry_after="30")]
    rig = Rig(standin, OpenAIProvider, backoff_max_s=60)
    try:
        seen = standin.next_request()
        d = rig.turn(request(ChatMessage("user", "hi")))
        await within(seen)  # the stand-in has the request and hangs
        d.cancel()
        assert isinstance(await failure_of(d), CancelledError)
        assert await within(standin.requests[0].outcome) == "lost"

        retrying = when_logged("retry 1 of 3")
        d = rig.turn(request(ChatMessage("user", "hi")))
        await within(retrying)  # now waiting 30 s on a DelayedCall
        d.cancel()
        assert isinstance(await failure_of(d), CancelledError)
        assert len(standin.requests) == 2
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_openai_connection_refused_is_retried_then_unreachable() -> None:
    from twisted.internet import reactor

    standin = OpenAIStandIn()
    port, _ = listen_standin(standin)
    number = port.getHost().port
    await stop_standin(port)  # nothing listens there now
    p = OpenAIProvider(
        reactor,
        base_url=f"http://127.0.0.1:{number}/v1",
        api_key=KEY,
        model="m",
        max_retries=1,
        backoff_base_s=0.001,
    )
    try:
        exc = await failure_of(p.turn(request(ChatMessage("user", "hi")), lambda _: None))
        assert isinstance(exc, ProviderError) and exc.code == "upstream_unreachable"
        assert "2 attempts" in exc.message and "127.0.0.1" in exc.message
        exc = await failure_of(p.check())
        assert isinstance(exc, ProviderError) and exc.code == "upstream_unreachable"
    finally:
        await p.close()


@pytest_twisted.ensureDeferred
async def test_openai_check_models_and_embeddings() -> None:
    standin = OpenAIStandIn(api_key=KEY)
    rig = Rig(standin, OpenAIProvider)
    try:
        assert await rig.provider.check() is None
        assert standin.requests[-1].path == "/v1/models"
        assert rig.provider.models() == ["m-1"]
        doc = await rig.provider.embeddings("emb-1", ["a", "b c"])
        assert [d["index"] for d in doc["data"]] == [0, 1]
        assert standin.requests[-1].json == {"model": "emb-1", "input": ["a", "b c"]}
        standin.script_for("/v1/embeddings").append(openai_error(400, "no such model"))
        exc = await failure_of(rig.provider.embeddings("nope", ["a"]))
        assert isinstance(exc, ProviderError) and "no such model" in exc.message
    finally:
        await rig.close()


# -- Anthropic over loopback ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_anthropic_streams_text_and_sends_the_right_headers() -> None:
    standin = AnthropicStandIn(api_key=KEY)
    standin.script.append(Stream(anthropic_text_events("Bonjour à tous", Usage(8, 4)), gap_s=0.001))
    rig = Rig(standin, AnthropicProvider, max_tokens=321)
    try:
        turn = await rig.turn(request(ChatMessage("user", "hi"), system="sys"))
        assert rig.texts == ["Bonjour ", "à ", "tous"]
        assert turn == ProviderTurn("Bonjour à tous", (), Usage(8, 4), "stop")
        [rec] = standin.requests
        assert rec.path == "/v1/messages"
        assert rec.headers["x-api-key"] == KEY
        assert rec.headers["anthropic-version"] == "2023-06-01"
        assert rec.headers["content-type"] == "application/json"
        assert rec.json["system"] == "sys" and rec.json["max_tokens"] == 321
        assert rec.json["stream"] is True and rec.json["model"] == "m-1"
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_anthropic_tool_use_round_trip_and_history_shape() -> None:
    standin = AnthropicStandIn(api_key=KEY)
    standin.script += [
        Stream(
            anthropic_tool_use_events(
                [("toolu_9", "bash", '{"command": "ls -la"}')], text="Looking.", json_pieces=6
            )
        ),
        Stream(anthropic_text_events("Two files.")),
    ]
    rig = Rig(standin, AnthropicProvider)
    try:
        first = await rig.turn(request(ChatMessage("user", "what is here?"), tools=TOOLS))
        assert first.text == "Looking."
        assert first.tool_calls == (ToolCall("toolu_9", "bash", {"command": "ls -la"}),)
        assert first.stop_reason == "tool_calls"
        history = (
            ChatMessage("user", "what is here?"),
            ChatMessage("assistant", first.text, tool_calls=first.tool_calls),
            ChatMessage("tool", "boom", tool_call_id="toolu_9", name="bash", is_error=True),
        )
        second = await rig.turn(request(*history, tools=TOOLS))
        assert second.text == "Two files."
        sent = standin.requests[1].json
        assert sent["tools"] == [
            {
                "name": "bash",
                "description": "Run a shell command",
                "input_schema": TOOLS[0].input_schema,
            }
        ]
        assert sent["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "what is here?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Looking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_9",
                        "name": "bash",
                        "input": {"command": "ls -la"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_9",
                        "content": "boom",
                        "is_error": True,
                    }
                ],
            },
        ]
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_anthropic_overloaded_then_success_and_mid_stream_error() -> None:
    standin = AnthropicStandIn(api_key=KEY)
    standin.script += [
        anthropic_error(529, "Overloaded", kind="overloaded_error", retry_after="0"),
        Stream(anthropic_text_events("fine")),
        Stream(
            anthropic_text_events("half")[:4]
            + [anthropic_error_event("overloaded_error", "Overloaded")]
        ),
    ]
    rig = Rig(standin, AnthropicProvider)
    try:
        turn = await rig.turn(request(ChatMessage("user", "hi")))
        assert turn.text == "fine" and len(standin.requests) == 2
        exc = await failure_of(rig.turn(request(ChatMessage("user", "again"))))
        assert isinstance(exc, ProviderError) and exc.code == "upstream_error"
        assert "Overloaded" in exc.message
        assert len(standin.requests) == 3  # text was already streamed: no retry
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_anthropic_bad_key_hang_cancel_check_embeddings() -> None:
    standin = AnthropicStandIn(api_key="the-right-one")
    rig = Rig(standin, AnthropicProvider, read_timeout_s=0.3)
    try:
        exc = await failure_of(rig.turn(request(ChatMessage("user", "hi"))))
        assert isinstance(exc, ProviderError) and "invalid x-api-key" in exc.message
        assert KEY not in str(exc) and "[redacted]" in exc.message
        assert len(standin.requests) == 1
        assert isinstance(await failure_of(rig.provider.check()), ProviderError)

        standin.api_key = None
        assert await rig.provider.check() is None
        assert standin.requests[-1].path == "/v1/models"

        standin.script.append(Hang())
        exc = await failure_of(rig.turn(request(ChatMessage("user", "hi"))))
        assert isinstance(exc, ProviderError) and exc.code == "upstream_timeout"

        standin.script.append(Stream(anthropic_text_events("a b c")[:4], hold_open=True))
        got_text: Deferred[None] = Deferred()
        d = rig.provider.turn(request(ChatMessage("user", "hi")), lambda t: got_text.callback(None))
        await within(got_text)
        d.cancel()
        assert isinstance(await failure_of(d), CancelledError)
        assert await within(standin.requests[-1].outcome) == "lost"

        exc = await failure_of(rig.provider.embeddings("x", ["a"]))
        assert isinstance(exc, ProviderError) and exc.code == "unsupported"
        assert rig.provider.models() == ["m-1"]
    finally:
        await rig.close()


def test_upstream_urls_are_made_uris_once() -> None:
    from gatewayd.agent.providers.http import _URI, _parse_url

    ascii_url = _parse_url("http://127.0.0.1:8000/v1/chat/completions")
    assert isinstance(ascii_url, _URI) and ascii_url.to_uri() is ascii_url
    assert ascii_url.to_text() == "http://127.0.0.1:8000/v1/chat/completions"
    other = _parse_url("http://127.0.0.1:8000/v1/modèles")
    assert not isinstance(other, _URI)  # treq percent-encodes it on each request
    assert other.to_uri().to_text() == "http://127.0.0.1:8000/v1/mod%C3%A8les"
