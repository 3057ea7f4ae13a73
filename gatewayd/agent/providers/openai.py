"""The ``openai`` provider: Chat Completions, streamed, with tool calls.

Speaks to any OpenAI-compatible server (OpenAI, Ollama, vLLM, llama.cpp, …).  The wire work
is split in two so each half can be tested alone: :class:`OpenAIStream` turns the bytes of a
``chat.completion.chunk`` stream into a :class:`ProviderTurn` with no I/O at all, and
:class:`OpenAIProvider` moves those bytes with :class:`UpstreamHTTP`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred

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
from gatewayd.agent.providers.remote import RemoteProvider, SSETurnStream
from gatewayd.agent.sse import SSEEvent

DEFAULT_BASE_URL = "https://api.openai.com/v1"


def parse_arguments(text: str) -> dict[str, Any]:
    """A tool call's input from its JSON-string arguments; never raises.

    Models do emit broken JSON now and then; the call then carries ``{"_raw": text}`` so the
    tool can refuse it with a useful message instead of the whole run crashing.
    """
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"_raw": text}
    return value if isinstance(value, dict) else {"_raw": text}


def as_int(value: Any) -> int:
    """A token count from JSON, forgiving nulls and floats."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float) and value == value:
        return max(0, int(value))
    return 0


# -- the request ----------------------------------------------------------------------------


def openai_messages(system: str, messages: Iterable[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation in Chat Completions' shape (system prompt first when non-empty)."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": system})
    for m in messages:
        if m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.tool_call_id or "", "content": m.content})
        elif m.role == "assistant" and m.tool_calls:
            out.append(
                {
                    "role": "assistant",
                    "content": m.content or None,
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": json.dumps(c.input)},
                        }
                        for c in m.tool_calls
                    ],
                }
            )
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def openai_tools(tools: Iterable[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": t.input_schema,
            },
        }
        for t in tools
    ]


def openai_request_body(request: ProviderRequest, default_model: str) -> dict[str, Any]:
    """The JSON body of a streamed ``POST /chat/completions``."""
    body: dict[str, Any] = {
        "model": request.model or default_model,
        "messages": openai_messages(request.system, request.messages),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.tools:  # some compatible servers reject an empty list
        body["tools"] = openai_tools(request.tools)
    return body


# -- the stream -----------------------------------------------------------------------------


@attrs.define
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = attrs.Factory(list)

    def build(self, index: int) -> ToolCall:
        return ToolCall(
            id=self.id or f"call_{index}",
            name=self.name,
            input=parse_arguments("".join(self.arguments)),
        )


class OpenAIStream(SSETurnStream):
    """Assemble a ``chat.completion.chunk`` stream into a :class:`ProviderTurn`.

    Pure: feed it bytes as they come (:meth:`feed`), or decoded events or chunks, then call
    :meth:`finish`.  Text deltas go to ``on_text`` as they arrive; tool calls are put
    together by ``index`` from pieces (id, name and arguments may each come in any chunk);
    usage is read from whichever chunk carries it (the last one, with ``include_usage``).
    """

    label = "openai"

    def __init__(self, on_text: Callable[[str], None]) -> None:
        super().__init__()  # done once ``data: [DONE]`` arrives
        self._on_text = on_text
        self._text: list[str] = []
        self._calls: dict[int, _PartialCall] = {}
        self._usage: Usage | None = None
        self._finish_reason: str | None = None

    def feed_event(self, event: SSEEvent) -> None:
        data = event.data.strip()
        if not data:
            return
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise UpstreamError(
                f"openai: the stream carried a malformed chunk: {data[:200]!r}", "upstream_error"
            ) from None
        if not isinstance(chunk, dict):
            raise UpstreamError("openai: the stream carried a non-object chunk", "upstream_error")
        self.feed_chunk(chunk)

    def feed_chunk(self, chunk: dict[str, Any]) -> None:
        error = chunk.get("error")
        if error:
            raise _stream_error(error)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = Usage(
                input=as_int(usage.get("prompt_tokens")),
                output=as_int(usage.get("completion_tokens")),
            )
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # we ask for one choice; ignore any others
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self._finish_reason = reason

    def _delta(self, delta: dict[str, Any]) -> None:
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._text.append(content)
            self._on_text(content)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for piece in calls:
                if isinstance(piece, dict):
                    self._tool_piece(piece)

    def _tool_piece(self, piece: dict[str, Any]) -> None:
        piece_id = piece.get("id") if isinstance(piece.get("id"), str) else ""
        index = piece.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            # Some servers omit the index: a new id starts a new call, else extend the last.
            known = {c.id: i for i, c in self._calls.items() if c.id}
            if piece_id and piece_id in known:
                index = known[piece_id]
            elif piece_id or not self._calls:
                index = len(self._calls)
            else:
                index = max(self._calls)
        call = self._calls.setdefault(index, _PartialCall())
        if piece_id and not call.id:
            call.id = piece_id
        function = piece.get("function")
        if isinstance(function, dict):
            name = function.get("name")
            if isinstance(name, str) and name and name != call.name:
                # OpenAI sends the name once; some servers resend it whole with every piece.
                call.name += name
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call.arguments.append(arguments)
            elif isinstance(arguments, dict):  # a few servers send an object, not a string
                call.arguments.append(json.dumps(arguments))

    def finish(self) -> ProviderTurn:
        """The whole turn; fails if the stream ended before the model said it was done."""
        if not self.done and self._finish_reason is None:
            raise UpstreamError(
                "openai: the stream ended before the model finished", "upstream_error"
            )
        calls = tuple(self._calls[i].build(i) for i in sorted(self._calls))
        reason = self._finish_reason or "stop"
        if calls and reason == "stop":
            reason = "tool_calls"  # Ollama and others say "stop" even when calling tools
        return ProviderTurn(
            text="".join(self._text),
            tool_calls=calls,
            usage=self._usage or Usage(),
            stop_reason=reason,
        )


def _stream_error(error: Any) -> ProviderError:
    message = error.get("message") if isinstance(error, dict) else error
    kind = (error.get("type") or error.get("code")) if isinstance(error, dict) else None
    code = "upstream_rate_limited" if kind in ("rate_limit_exceeded", 429) else "upstream_error"
    return UpstreamError(f"openai: the upstream failed mid-stream: {message}", code)


# -- the provider ---------------------------------------------------------------------------


class OpenAIProvider(RemoteProvider):
    """Chat Completions over HTTP; see the module docstring.  Call :meth:`close` when done."""

    name = "openai"
    models_path = "/models"

    def __init__(self, reactor: Any, *, base_url: str, **kw: Any) -> None:
        super().__init__(reactor, base_url=(base_url or DEFAULT_BASE_URL).rstrip("/"), **kw)

    def _headers(self, *, streaming: bool = False) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        headers["Accept"] = "text/event-stream" if streaming else "application/json"
        if self._api_key:  # local servers (Ollama, vLLM) often need none
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def turn(
        self, request: ProviderRequest, on_text: Callable[[str], None]
    ) -> Deferred[ProviderTurn]:
        body = openai_request_body(request, self.model)
        return self._turn("/chat/completions", body, OpenAIStream(on_text))

    def embeddings(self, model: str, inputs: list[str]) -> Deferred[dict[str, Any]]:
        body = json.dumps({"model": model or self.model, "input": inputs}).encode("utf-8")
        d = self._http.fetch_json(
            "POST", f"{self.base_url}/embeddings", headers=self._headers(), body=body
        )
        return d.addCallback(_embeddings_shape)


def _embeddings_shape(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise UpstreamError("openai: the embeddings answer has no data list", "upstream_error")
    return doc
