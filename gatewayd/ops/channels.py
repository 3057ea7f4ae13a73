"""Channels: list the bridges, send through one, wake the agent, and the dead-letter list."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gatewayd.bridges import manager_for
from gatewayd.bridges.records import list_dead_letters
from gatewayd.errors import GatewayError
from gatewayd.ops import Call, Param, operation

if TYPE_CHECKING:
    from gatewayd.core import Gateway


def _not_blank(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


CHANNEL_DOC = '"<bridge>" or "<bridge>:<target>"'


@operation("channels.list", "read", summary="The chat bridges: state, counts and last error")
async def channels_list(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return {"channels": manager_for(gw).describe()}


@operation(
    "send",
    "operate",
    Param("channel", str, required=True, doc=CHANNEL_DOC, max_length=2048, check=_not_blank),
    Param("text", str, required=True, max_length=100_000, check=_not_blank),
    summary="Send a message through a bridge (to its default_target unless one is named)",
)
async def send(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    result = await manager_for(gw).deliver(p["channel"], p["text"])
    gw.audit(call.principal, "send", p["channel"], status=result["status"])
    return result


@operation(
    "wake",
    "operate",
    Param(
        "prompt",
        str,
        required=True,
        aliases=("text",),
        max_length=1_000_000,
        check=_not_blank,
        doc="what the agent is asked",
    ),
    Param(
        "channel", str, default="", doc="deliver the answer here: " + CHANNEL_DOC, max_length=2048
    ),
    Param("metadata", dict, doc="recorded with the wake in the audit log"),
    Param(
        "session_id",
        str,
        aliases=("sessionKey",),
        is_id=True,
        doc="continue this session (created when new)",
    ),
    status=202,
    summary="Start a run now; its answer goes to the channel, if one is named",
)
async def wake(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    channel = p["channel"].strip()
    if channel:
        manager_for(gw).check_channel(channel)
    live = await gw.runs.submit(
        call.principal,
        p["prompt"],
        session_id=p["session_id"],
        source="wake",
        channel=channel,
    )
    gw.audit(call.principal, "wake", live.run.id, channel=channel, metadata=p["metadata"] or {})
    return {"session_id": live.run.session_id, "run_id": live.run.id}


@operation(
    "dead_letters.list",
    "operate",
    Param("limit", int, default=200, minimum=1, maximum=1000),
    summary="Outbound webhook messages that were never delivered",
)
async def dead_letters_list(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    from gatewayd.bridges.outbound import dead_letter_view

    letters = await list_dead_letters(gw.store, p["limit"])
    return {"dead_letters": [dead_letter_view(letter) for letter in letters]}


@operation(
    "dead_letters.replay",
    "operate",
    Param("id", str, required=True, is_id=True, aliases=("letter_id",)),
    summary="Try to deliver a dead letter again; it leaves the list once delivered",
)
async def dead_letters_replay(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    from gatewayd.bridges.outbound import OutboundWebhook

    bridge = manager_for(gw).bridges.get("webhook")
    if not isinstance(bridge, OutboundWebhook):
        raise GatewayError("conflict", "the outbound webhook bridge is not configured")
    result = await bridge.replay(p["id"])
    gw.audit(call.principal, "dead_letters.replay", p["id"])
    return result
