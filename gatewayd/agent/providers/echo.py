"""The offline default provider: it answers with the user's words, one delta per word.

``/tool NAME {json}`` makes it ask for tool NAME (only in runs a token started), and after a
tool result it answers with that result's text — enough to drive the whole tool and
approval machinery with no model and no network.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from gatewayd.agent.base import (
    ChatMessage,
    ProviderError,
    ProviderRequest,
    ProviderTurn,
    ToolCall,
    Usage,
    count_words,
)

_WORD = re.compile(r"\s*\S+\s*")
_TOOL = re.compile(r"^/tool\s+([A-Za-z0-9_.-]+)\s*(.*)$", re.DOTALL)


def words(text: str) -> list[str]:
    parts = _WORD.findall(text)
    return parts if parts or not text else [text]


def _input_words(request: ProviderRequest) -> int:
    total = count_words(request.system)
    for m in request.messages:
        total += count_words(m.content)
    return total


class EchoProvider:
    name = "echo"

    def __init__(self, model: str = "echo-1") -> None:
        self.model = model
        self._calls = 0

    def models(self) -> list[str]:
        return [self.model]

    def check(self) -> Deferred[None]:
        return succeed(None)

    def embeddings(self, model: str, inputs: list[str]) -> Deferred[dict[str, Any]]:
        return fail(ProviderError("the echo provider has no embeddings", code="unsupported"))

    def _reply(self, request: ProviderRequest) -> ProviderTurn | str:
        last = request.messages[-1] if request.messages else ChatMessage("user", "")
        if last.role == "tool":
            results = []
            for m in reversed(request.messages):
                if m.role != "tool":
                    break
                results.append(m.content)
            return "".join(reversed(results))
        match = _TOOL.match(last.content.strip()) if request.allow_tool_commands else None
        if match:
            name, raw = match.group(1), match.group(2).strip() or "{}"
            try:
                args = json.loads(raw)
            except ValueError:
                args = None
            if not isinstance(args, dict):
                return f"/tool {name}: the input must be a JSON object"
            self._calls += 1
            call = ToolCall(id=f"call_{self._calls}", name=name, input=args)
            return ProviderTurn(
                text="",
                tool_calls=(call,),
                usage=Usage(_input_words(request), 0),
                stop_reason="tool_calls",
            )
        return last.content

    def turn(
        self, request: ProviderRequest, on_text: Callable[[str], None]
    ) -> Deferred[ProviderTurn]:
        reply = self._reply(request)
        if isinstance(reply, ProviderTurn):
            return succeed(reply)
        for part in words(reply):
            on_text(part)
        return succeed(
            ProviderTurn(text=reply, usage=Usage(_input_words(request), count_words(reply)))
        )
