"""The seams between the run loop, the model providers and the tools.

A provider takes one turn: the conversation so far (and the tools on offer) in, streamed
text out through ``on_text``, and a :class:`ProviderTurn` at the end that either answers in
text or asks for tool calls.  The run loop (``gatewayd.runs``) executes the tool calls under
their policies, appends the results and asks again.  Cancelling the Deferred a provider or a
tool returned must stop its work (close the HTTP stream, kill the process group).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred

Role = str  # "system" | "user" | "assistant" | "tool"


@attrs.frozen
class ToolCall:
    id: str
    name: str
    input: dict[str, Any]


@attrs.frozen
class ChatMessage:
    """One entry of the conversation sent to a provider."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    #: for role "tool": which call this answers, the tool's name, and whether it failed
    tool_call_id: str | None = None
    name: str | None = None
    is_error: bool = False


@attrs.frozen
class Usage:
    input: int = 0
    output: int = 0


@attrs.frozen
class ToolSpec:
    """What a provider is told about a tool."""

    name: str
    description: str
    input_schema: dict[str, Any]


@attrs.frozen
class ProviderRequest:
    model: str
    system: str
    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    #: the echo provider honours ``/tool NAME {json}`` only for runs a token started
    allow_tool_commands: bool = False


@attrs.frozen
class ProviderTurn:
    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage = Usage()
    stop_reason: str = "stop"


class ProviderError(Exception):
    """The provider could not answer; ``code`` is a REST-style code for ``run_error``."""

    def __init__(self, message: str, code: str = "provider_error") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Provider(Protocol):
    name: str

    def turn(
        self, request: ProviderRequest, on_text: Callable[[str], None]
    ) -> Deferred[ProviderTurn]:
        """Take one turn, streaming text through ``on_text``; cancellable."""

    def check(self) -> Deferred[None]:
        """Succeed when the provider is reachable (for /ready and the heartbeat)."""

    def models(self) -> list[str]:
        """Model ids this provider serves (the configured one first)."""

    def embeddings(self, model: str, inputs: list[str]) -> Deferred[dict[str, Any]]:
        """OpenAI-shaped embeddings response; ProviderError(code="unsupported") if none."""


@attrs.frozen
class ToolResult:
    content: str
    is_error: bool = False


@attrs.frozen
class ToolContext:
    """What a tool may touch: its workspace root, and the reactor it runs on."""

    workspace: str
    reactor: Any


class Tool(Protocol):
    name: str
    description: str
    input_schema: dict[str, Any]
    #: "allow" | "ask" | "deny"; config can override per tool
    default_policy: str

    def run(self, input: dict[str, Any], ctx: ToolContext) -> Deferred[ToolResult]:
        """Run once; cancelling the Deferred kills the work (the whole process group)."""


def count_words(text: str) -> int:
    """Echo's usage unit (CONTRACT §15)."""
    return len(text.split())
