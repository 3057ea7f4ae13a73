"""Who am I, how is the gateway, what can it do."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gatewayd.bridges import manager_for
from gatewayd.ops import OPERATIONS, Call, operation
from gatewayd.schedule import rfc3339

if TYPE_CHECKING:
    from gatewayd.core import Gateway


def identity(call: Call) -> dict[str, Any]:
    p = call.principal
    return {
        "valid": True,
        "role": p.role,
        "scopes": sorted(p.scopes),
        "token_id": p.token_id,
        "name": p.name,
    }


@operation("health", "any", summary="Liveness")
async def health(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return {"status": "ok", "timestamp": rfc3339(gw.clock.seconds())}


@operation("token.validate", "any", summary="Describe the calling token")
async def token_validate(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return identity(call)


@operation("connect", "any", summary="Identity, role, scopes and the server's limits")
async def connect(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    g = gw.config.gateway
    return {
        **identity(call),
        "server": {"name": "gatewayd", "version": gw.version},
        "limits": {
            "ws_max_message_bytes": g.ws_max_message_bytes,
            "ws_rate_limit": {
                "max_messages": g.ws_rate_limit.max_messages,
                "window_ms": g.ws_rate_limit.window_ms,
            },
            "max_streams_per_token": g.max_streams_per_token,
            "body_limit_bytes": g.body_limit_bytes,
        },
        "methods": sorted(name for name, op in OPERATIONS.items() if call.principal.can(op.scope)),
    }


@operation("status", "read", summary="Version, uptime, provider, listeners, load")
async def status(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    agent = gw.config.agent
    return {
        "version": gw.version,
        "uptime_seconds": round(gw.clock.seconds() - gw.started_at, 3),
        "provider": gw.provider.name,
        "model": agent.effective_model,
        "listeners": list(gw.listeners),
        "store": gw.store.url.split("://", 1)[0] if "://" in gw.store.url else "sqlite",
        "sessions": await gw.store.count_sessions(),
        "active_runs": gw.runs.active_count,
        "connections": dict(gw.connections),
        "channels": manager_for(gw).describe(),
        "event_id": gw.bus.last_id,
    }


@operation("agent.identity", "read", summary="The agent's name, provider and model")
async def agent_identity(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    agent = gw.config.agent
    return {
        "name": "gatewayd",
        "provider": gw.provider.name,
        "model": agent.effective_model,
        "agents": ["default", *agent.agents],
        "tools": list(gw.tools.names()),
    }


@operation("models.list", "read", summary="The models the agent can use")
async def models_list(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": [
            {"id": m, "provider": gw.provider.name, "default": i == 0}
            for i, m in enumerate(gw.provider.models())
        ]
    }


@operation("agents.list", "read", summary="The configured agents")
async def agents_list(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    model = gw.config.agent.effective_model
    return {
        "agents": [
            {"id": a, "model": model, "provider": gw.provider.name}
            for a in ("default", *gw.config.agent.agents)
        ]
    }


@operation("tools.list", "read", summary="The tools and their policies")
async def tools_list(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    policies = gw.tool_policies
    return {
        "tools": [
            {
                "name": spec.name,
                "description": spec.description,
                "input_schema": spec.input_schema,
                "policy": gw.tools.policy_for(spec.name, policies),
            }
            for spec in gw.tools.specs(None)
        ]
    }


@operation(
    "tickets.create",
    "any",
    status=201,
    summary="A one-time credential (60 s) for one WebSocket or SSE URL",
)
async def tickets_create(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    ticket, expires = gw.tokens.issue_ticket(call.principal)
    return {"ticket": ticket, "expires_at": rfc3339(expires)}
