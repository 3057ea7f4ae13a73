"""The OpenAI-compatible layer's core side: which models exist, and how a conversation sent
the OpenAI way becomes one run of the run manager.

OpenAI clients send the whole conversation with every request.  gatewayd keeps
conversations in sessions instead, so a request becomes: the last user message is the turn,
the earlier user and assistant messages are *context* (stored ahead of the turn when the
session is new or empty, ignored when the session already has a history), and system or
developer messages are *instructions* for this run only.  Nothing here knows about HTTP;
:mod:`gatewayd.web.openai_api` translates the wire shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from gatewayd.auth import Principal
from gatewayd.errors import GatewayError
from gatewayd.events import Event
from gatewayd.ops import ID_RE
from gatewayd.runs import LiveRun

if TYPE_CHECKING:
    from gatewayd.core import Gateway

#: the longest turn accepted (the same cap as chat.send's ``message``)
MAX_TURN_CHARS = 1_000_000
_INSTRUCTION_ROLES = ("system", "developer")


def bad(message: str, param: str | None = None) -> GatewayError:
    """A 400 that names the offending request field (OpenAI's ``param``)."""
    return GatewayError("invalid_request", message, data={"param": param} if param else None)


# -- models ---------------------------------------------------------------------------------


def model_ids(gw: Gateway) -> list[str]:
    """The configured model, then each agent id (``default`` first), without repeats."""
    agent = gw.config.agent
    out: list[str] = []
    for name in (agent.effective_model, "default", *agent.agents):
        if name not in out:
            out.append(name)
    return out


def resolve_model(gw: Gateway, model: Any) -> str:
    """The agent id a request's ``model`` names ("" for the configured model)."""
    if not isinstance(model, str) or not model:
        raise bad("model: a model id (string) is required", "model")
    agent = gw.config.agent
    if model == agent.effective_model:
        return ""
    if model == "default" or model in agent.agents:
        return model
    raise GatewayError(
        "model_not_found",
        f"The model `{model}` does not exist or you do not have access to it.",
        data={"param": "model"},
    )


# -- conversations --------------------------------------------------------------------------


@attrs.frozen
class Conversation:
    """One request's conversation, in the run manager's terms."""

    turn: str
    context: tuple[tuple[str, str], ...] = ()
    instructions: str = ""


def _text_of(content: Any, where: str, kinds: tuple[str, ...]) -> str:
    """A message's text: a string, or the text parts of a part list (others are refused)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise bad(f"{where}: expected a string or a list of content parts", where)
    texts: list[str] = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(f"{where}[{i}]: expected a content part object with a type", where)
        kind = part["type"]
        if kind in kinds:
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"{where}[{i}].text: expected a string", where)
            texts.append(text)
        elif kind != "refusal":
            raise bad(f"{where}[{i}]: content parts of type {kind!r} are not supported", where)
    return "".join(texts)


def _conversation(
    messages: list[tuple[str, str]], extra_instructions: str, param: str
) -> Conversation:
    """Split (role, text) messages into the turn, the context and the instructions."""
    last_user = max((i for i, (role, _) in enumerate(messages) if role == "user"), default=-1)
    if last_user < 0:
        raise bad(f"{param}: at least one user message is required", param)
    for role, _ in messages[last_user + 1 :]:
        if role not in _INSTRUCTION_ROLES:
            raise bad(f"{param}: the conversation must end with a user message", param)
    turn = messages[last_user][1]
    if not turn.strip():
        raise bad(f"{param}: the last user message is empty", param)
    if len(turn) > MAX_TURN_CHARS:
        raise bad(f"{param}: the last user message is longer than {MAX_TURN_CHARS}", param)
    instructions = [extra_instructions] if extra_instructions else []
    context: list[tuple[str, str]] = []
    for i, (role, text) in enumerate(messages):
        if role in _INSTRUCTION_ROLES:
            if text:
                instructions.append(text)
        elif i < last_user and role in ("user", "assistant") and text:
            context.append((role, text))
    return Conversation(turn, tuple(context), "\n\n".join(instructions))


def chat_conversation(messages: Any) -> Conversation:
    """``/v1/chat/completions`` ``messages``: tool and function messages are left out (the
    agent runs its own tools), assistant tool calls keep only their text."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages: expected a non-empty array of messages", "messages")
    out: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where}: expected an object", "messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise bad(f"{where}.role: unknown role {role!r}", "messages")
        text = _text_of(m.get("content"), f"{where}.content", ("text",))
        out.append((role, text))
    return _conversation(out, "", "messages")


def responses_conversation(input: Any, instructions: Any) -> Conversation:
    """``/v1/responses`` ``input`` (a string, or a list of message items) and
    ``instructions``."""
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions: expected a string", "instructions")
    extra = instructions or ""
    if isinstance(input, str):
        return _conversation([("user", input)], extra, "input")
    if not isinstance(input, list) or not input:
        raise bad("input: expected a string or a non-empty array of input items", "input")
    out: list[tuple[str, str]] = []
    for i, item in enumerate(input):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{where}: expected an object", "input")
        kind = item.get("type", "message")
        if kind != "message":
            raise bad(f"{where}: input items of type {kind!r} are not supported", "input")
        role = item.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"{where}.role: unknown role {role!r}", "input")
        text = _text_of(
            item.get("content"), f"{where}.content", ("input_text", "output_text", "text")
        )
        out.append((role, text))
    return _conversation(out, extra, "input")


# -- runs -----------------------------------------------------------------------------------


def check_session_id(value: Any) -> str | None:
    """The ``X-Session-Id`` header (or None); ids follow the contract's id syntax."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise bad("X-Session-Id: must match [A-Za-z0-9._:-]{1,128}")
    return value


async def start_run(
    gw: Gateway,
    principal: Principal,
    convo: Conversation,
    *,
    session_id: str | None,
    agent_id: str,
    on_event: Callable[[Event], None] | None = None,
) -> LiveRun:
    """Submit the turn through the run manager, as every transport does."""
    if not principal.can("chat"):
        raise GatewayError("forbidden", "the OpenAI-compatible API needs the chat scope")
    return await gw.runs.submit(
        principal,
        convo.turn,
        session_id=session_id,
        agent_id=agent_id,
        on_event=on_event,
        context=convo.context,
        instructions=convo.instructions,
    )


def response_id(run_id: str) -> str:
    """A Responses API id that leads back to its run (for ``previous_response_id``)."""
    return "resp_" + run_id.removeprefix("run_")


async def session_of_response(gw: Gateway, principal: Principal, previous: Any) -> str:
    """The session a ``previous_response_id`` continues; unknown or foreign → 404."""
    if not isinstance(previous, str) or not previous.startswith("resp_"):
        raise bad("previous_response_id: expected a response id (resp_…)", "previous_response_id")
    run_id = "run_" + previous.removeprefix("resp_")
    live = gw.runs.live(run_id)
    run = live.run if live is not None else None
    if run is None and ID_RE.fullmatch(run_id):
        run = await gw.store.get_run(run_id)
    if run is None or not principal.owns(run.owner):
        raise GatewayError(
            "not_found",
            f"Previous response with id '{previous}' not found.",
            data={"param": "previous_response_id", "openai_code": "previous_response_not_found"},
        )
    return run.session_id
