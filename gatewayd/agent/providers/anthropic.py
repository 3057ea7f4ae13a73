"""The ``anthropic`` provider: the Messages API, streamed, with tool use.

As with the OpenAI provider, :class:`AnthropicStream` assembles the event stream with no I/O
and :class:`AnthropicProvider` moves the bytes.  Stop reasons are translated into OpenAI's
``finish_reason`` words (``end_turn`` → ``stop``, ``tool_use`` → ``tool_calls``,
``max_tokens`` → ``length``) so the run loop and the ``/v1`` layer see one vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail

from gatewayd.agent.base import (
    ChatMessage,
    ProviderError,
    ProviderRequest,
    ProviderTurn,
    ToolCall,
    ToolSpec,
    Usage,
)
from gatewayd.agent.providers.http import UpstreamError
from gatewayd.agent.providers.openai import as_int, parse_arguments
from gatewayd.agent.providers.remote import RemoteProvider, SSETurnStream
from gatewayd.agent.sse import SSEEvent

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


# -- the request ----------------------------------------------------------------------------


def anthropic_messages(
    system: str, messages: Iterable[ChatMessage]
) -> tuple[str, list[dict[str, Any]]]:
    """The top-level system text and the messages in the Messages API's shape.

    Tool calls become ``tool_use`` blocks, tool results a user message of ``tool_result``
    blocks; consecutive same-role messages are merged (the API wants strict alternation),
    and within a user message tool results go first, as the API requires.  Messages with
    role "system" join the system text; empty messages are dropped (the API refuses them).
    """
    systems = [system] if system else []
    out: list[dict[str, Any]] = []
    for m in messages:
        blocks: list[dict[str, Any]]
        if m.role == "system":
            if m.content:
                systems.append(m.content)
            continue
        if m.role == "tool":
            role = "user"
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": m.tool_call_id or "",
                "content": m.content,
            }
            if m.is_error:
                result["is_error"] = True
            blocks = [result]
        elif m.role == "assistant":
            role = "assistant"
            blocks = [{"type": "text", "text": m.content}] if m.content else []
            blocks += [
                {"type": "tool_use", "id": c.id, "name": c.name, "input": c.input}
                for c in m.tool_calls
            ]
        else:
            role = "user"
            blocks = [{"type": "text", "text": m.content}] if m.content else []
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    for message in out:
        if message["role"] == "user":
            message["content"].sort(key=lambda b: b["type"] != "tool_result")  # stable
    return "\n\n".join(systems), out


def anthropic_tools(tools: Iterable[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "description": t.description, "input_schema": t.input_schema}
        for t in tools
    ]


def anthropic_request_body(
    request: ProviderRequest, default_model: str, max_tokens: int
) -> dict[str, Any]:
    """The JSON body of a streamed ``POST /v1/messages``."""
    system, messages = anthropic_messages(request.system, request.messages)
    body: dict[str, Any] = {
        "model": request.model or default_model,
        "max_tokens": max_tokens,
        "stream": True,
        "messages": messages,
    }
    if system:
        body["system"] = system
    if request.tools:
        body["tools"] = anthropic_tools(request.tools)
    return body


# -- the stream -----------------------------------------------------------------------------


@attrs.define
class _Block:
    kind: str
    id: str = ""
    name: str = ""
    start_input: Any = None
    json_parts: list[str] = attrs.Factory(list)


class AnthropicStream(SSETurnStream):
    """Assemble a Messages API event stream into a :class:`ProviderTurn`.

    Pure, like :class:`~gatewayd.agent.providers.openai.OpenAIStream`: :meth:`feed` bytes
    (or :meth:`feed_event` decoded events), then :meth:`finish`.  Unknown event and block
    types (thinking, server tools, future additions) are ignored.
    """

    label = "anthropic"

    def __init__(self, on_text: Callable[[str], None]) -> None:
        super().__init__()  # done once ``message_stop`` arrives
        self._on_text = on_text
        self._text: list[str] = []
        self._blocks: dict[int, _Block] = {}
        self._calls: dict[int, ToolCall] = {}
        self._input = 0
        self._output = 0
        self._stop_reason: str | None = None

    def feed_event(self, event: SSEEvent) -> None:
        if not event.data.strip():
            return
        try:
            payload = json.loads(event.data)
        except ValueError:
            raise UpstreamError(
                f"anthropic: the stream carried malformed data: {event.data[:200]!r}",
                "upstream_error",
            ) from None
        if not isinstance(payload, dict):
            raise UpstreamError("anthropic: the stream carried a non-object", "upstream_error")
        kind = payload.get("type")
        if not isinstance(kind, str) or not kind:
            kind = event.event
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(payload)

    def _emit(self, text: Any) -> None:
        if isinstance(text, str) and text:
            self._text.append(text)
            self._on_text(text)

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        if usage.get("input_tokens") is not None:
            # cache writes and reads are input the model read too
            self._input = (
                as_int(usage.get("input_tokens"))
                + as_int(usage.get("cache_creation_input_tokens"))
                + as_int(usage.get("cache_read_input_tokens"))
            )
        if usage.get("output_tokens") is not None:
            self._output = as_int(usage.get("output_tokens"))  # cumulative, not a delta

    def _on_message_start(self, payload: dict[str, Any]) -> None:
        message = payload.get("message")
        if isinstance(message, dict):
            self._usage(message.get("usage"))

    def _on_content_block_start(self, payload: dict[str, Any]) -> None:
        index = payload.get("index")
        block = payload.get("content_block")
        if not isinstance(index, int) or not isinstance(block, dict):
            return
        kind = block.get("type")
        if kind == "text":
            self._blocks[index] = _Block("text")
            self._emit(block.get("text"))
        elif kind == "tool_use":
            self._blocks[index] = _Block(
                "tool_use",
                id=str(block.get("id") or f"toolu_{index}"),
                name=str(block.get("name") or ""),
                start_input=block.get("input"),
            )

    def _on_content_block_delta(self, payload: dict[str, Any]) -> None:
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta":
            self._emit(delta.get("text"))
        elif kind == "input_json_delta":
            block = self._blocks.get(payload.get("index", -1))
            partial = delta.get("partial_json")
            if block is not None and block.kind == "tool_use" and isinstance(partial, str):
                block.json_parts.append(partial)

    def _on_content_block_stop(self, payload: dict[str, Any]) -> None:
        index = payload.get("index")
        block = self._blocks.pop(index, None) if isinstance(index, int) else None
        if block is not None and block.kind == "tool_use" and isinstance(index, int):
            self._calls[index] = _tool_call(block)

    def _on_message_delta(self, payload: dict[str, Any]) -> None:
        delta = payload.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
            self._stop_reason = delta["stop_reason"]
        self._usage(payload.get("usage"))

    def _on_message_stop(self, payload: dict[str, Any]) -> None:
        self.done = True

    def _on_error(self, payload: dict[str, Any]) -> None:
        error = payload.get("error")
        kind = error.get("type") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        code = "upstream_rate_limited" if kind == "rate_limit_error" else "upstream_error"
        raise UpstreamError(f"anthropic: the upstream failed mid-stream: {kind}: {message}", code)

    def finish(self) -> ProviderTurn:
        """The whole turn; fails if the stream ended before the message did."""
        if not self.done and self._stop_reason is None:
            raise UpstreamError(
                "anthropic: the stream ended before the model finished", "upstream_error"
            )
        for index, block in self._blocks.items():  # blocks the stream never closed
            if block.kind == "tool_use":
                self._calls[index] = _tool_call(block)
        self._blocks.clear()
        calls = tuple(self._calls[i] for i in sorted(self._calls))
        raw = self._stop_reason or ("tool_use" if calls else "end_turn")
        return ProviderTurn(
            text="".join(self._text),
            tool_calls=calls,
            usage=Usage(input=self._input, output=self._output),
            stop_reason=STOP_REASONS.get(raw, raw),
        )


def _tool_call(block: _Block) -> ToolCall:
    if block.json_parts:
        data = parse_arguments("".join(block.json_parts))
    elif isinstance(block.start_input, dict):
        data = block.start_input
    else:
        data = {}
    return ToolCall(id=block.id, name=block.name, input=data)


# -- the provider ---------------------------------------------------------------------------


class AnthropicProvider(RemoteProvider):
    """The Messages API over HTTP; see the module docstring.  Call :meth:`close` when done."""

    name = "anthropic"
    #: reachable means any answer but 401/403 and 5xx: a proxy's 404 still counts
    models_path = "/v1/models"

    def __init__(self, reactor: Any, *, base_url: str, max_tokens: int = 4096, **kw: Any) -> None:
        base = (base_url or DEFAULT_BASE_URL).rstrip("/")
        # Accept ".../v1" too: the paths below add it.
        super().__init__(
            reactor, base_url=base[: -len("/v1")] if base.endswith("/v1") else base, **kw
        )
        self.max_tokens = max_tokens

    def _headers(self, *, streaming: bool = False) -> dict[str, str]:
        return {
            "x-api-key": self._api_key,
            "anthropic-version": API_VERSION,
            "content-type": "application/json",
            "accept": "text/event-stream" if streaming else "application/json",
        }

    def turn(
        self, request: ProviderRequest, on_text: Callable[[str], None]
    ) -> Deferred[ProviderTurn]:
        body = anthropic_request_body(request, self.model, self.max_tokens)
        return self._turn("/v1/messages", body, AnthropicStream(on_text))

    def embeddings(self, model: str, inputs: list[str]) -> Deferred[dict[str, Any]]:
        return fail(ProviderError("anthropic offers no embeddings API", code="unsupported"))
