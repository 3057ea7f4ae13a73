"""Calling one tool directly (``POST /tools/invoke``, ``tools.invoke``), under its policy.

An invocation is a run of its own, with ``source = "tools.invoke"`` and no provider turn: it
queues on its session (a new one unless ``session_id`` is given), stores ``/tool NAME {json}``
as the user message and the result as the tool and assistant messages, and goes through the
same policy, approval and abort machinery as a tool call a model asked for.  So an ``ask``
tool raises ``approval_requested`` (with the invocation's ``run_id``), ``POST
/api/runs/{run_id}/abort`` kills its process, and a restart marks it ``failed`` and its
approval ``expired`` like any other run.  Like ``/api/chat``, the caller waits for the
result; a caller that goes away stops only its own wait.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from gatewayd.agent.base import ToolCall
from gatewayd.auth import new_id
from gatewayd.errors import GatewayError, not_found
from gatewayd.ops import Call, Param, operation

if TYPE_CHECKING:
    from gatewayd.core import Gateway


@operation(
    "tools.invoke",
    "operate",
    Param("tool", str, required=True, aliases=("name",), max_length=128, doc="the tool's name"),
    Param("input", dict, aliases=("arguments", "args"), doc="the tool's input (JSON object)"),
    Param("session_id", str, is_id=True, doc="record the call in this session (default: new)"),
    summary="Run one tool under its policy and wait for {result, is_error}",
)
async def tools_invoke(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    name: str = p["tool"]
    tool_input: dict[str, Any] = p["input"] if p["input"] is not None else {}
    if gw.tools.get(name) is None:
        raise not_found(f"no such tool: {name}")
    if gw.tools.policy_for(name, gw.tool_policies) == "deny":
        # nothing would run: answer at once rather than open a session for a refusal
        return {"result": f"the tool {name} is denied by policy", "is_error": True}
    live = await gw.runs.submit(
        call.principal,
        f"/tool {name} {json.dumps(tool_input, ensure_ascii=False)}",
        session_id=p["session_id"],
        source="tools.invoke",
        allow_tool_commands=False,
        direct=ToolCall(id=new_id("call"), name=name, input=tool_input),
    )
    run = await gw.runs.wait(live.run.id)
    where = {"run_id": run.id, "session_id": run.session_id}
    result = live.tool_result
    if run.status == "completed" and result is not None:
        return {"result": result.content, "is_error": result.is_error, **where}
    if run.status == "aborted":
        raise GatewayError(
            "conflict", f"the invocation was aborted: {run.error or 'aborted'}", data=where
        )
    raise GatewayError(
        "unavailable", f"the invocation failed: {run.error or 'unknown error'}", data=where
    )
