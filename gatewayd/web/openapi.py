"""The published contract: OpenAPI 3.1 for REST, AsyncAPI 3.0 for WebSocket, JSON-RPC and SSE.

Generated, not written by hand: every row of :data:`gatewayd.web.routes.ROUTES` becomes an
operation whose parameters and body schema come from the operation's :class:`~gatewayd.ops.
Param` list (the same checks the server runs), so the document cannot drift from the code.
The few paths outside the table (fixed resources, streams, the ``/v1`` adapter, hooks) are
described by :data:`FIXED` below, and the handful of routes whose wire shape differs from their
operation (``/api/config``: ETag, If-Match, a TOML body) by :data:`OVERRIDES`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from gatewayd import __version__, ops
from gatewayd.errors import GatewayError
from gatewayd.web.common import render_error
from gatewayd.web.routes import ROUTES, Route

_PATH_PARAM = re.compile(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>")
ID_PATTERN = "^[A-Za-z0-9._:-]{1,128}$"
JSON_CT = "application/json"
SSE_CT = "text/event-stream"

#: error statuses every operation may answer (CONTRACT §4, §8)
ERROR_STATUSES: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "invalid_request: bad JSON, a wrong type, a bad parameter"),
    401: ("Unauthorized", "unauthorized: no valid credentials (with WWW-Authenticate: Bearer)"),
    403: ("Forbidden", "forbidden: the token lacks the scope"),
    404: ("NotFound", "not_found: no such route or object (another owner's is 404 too)"),
    405: ("MethodNotAllowed", "method_not_allowed: the path serves other methods (see Allow)"),
    408: ("RequestTimeout", "request_timeout: the request or its body was too slow"),
    409: ("Conflict", "conflict: the object exists, or was already resolved"),
    412: ("PreconditionFailed", "precondition_failed: If-Match names an old ETag"),
    413: ("PayloadTooLarge", "payload_too_large: the body is over the route's cap"),
    429: ("RateLimited", "rate_limited, queue_full, budget_exceeded or too_many_streams"),
    431: ("HeadersTooLarge", "headers_too_large: the request head is over 16 KiB"),
    503: ("Unavailable", "unavailable: the gateway is stopping or a dependency is down"),
}

_OBJECT: dict[str, Any] = {"type": "object"}
#: one server-sent event (``event``/``data``/``id`` lines), as SSE-aware clients see it
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "description": "JSON"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "snake_case, CONTRACT §4"},
                    "message": {"type": "string", "description": "for people"},
                },
            }
        },
    }


def _openai_error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    }


def _error_responses(statuses: list[int], schema_ref: str = "Error") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status in statuses:
        name, _ = ERROR_STATUSES[status]
        if schema_ref == "Error":
            out[str(status)] = {"$ref": f"#/components/responses/{name}"}
        else:
            # the adapter answers in its own shape; limits enforced before it (413, 408, 429,
            # 431) answer in gatewayd's
            either = {
                "anyOf": [
                    {"$ref": f"#/components/schemas/{schema_ref}"},
                    {"$ref": "#/components/schemas/Error"},
                ]
            }
            out[str(status)] = {
                "description": ERROR_STATUSES[status][1],
                "content": {JSON_CT: {"schema": either}},
            }
    return out


def _statuses(*, public: bool, body: bool) -> list[int]:
    statuses = [400, 404, 405, 408, 409, 429, 431, 503]
    if not public:
        statuses += [401, 403]
    if body:
        statuses.append(413)
    return sorted(statuses)


def _success(
    status: int, description: str, schema: dict[str, Any] | None = None, content_type: str = JSON_CT
) -> dict[str, Any]:
    if status == 204:
        return {"204": {"description": description}}
    return {
        str(status): {
            "description": description,
            "content": {content_type: {"schema": schema if schema is not None else _OBJECT}},
        }
    }


# -- ROUTES rows --------------------------------------------------------------------------------


def _route_operation(route: Route, op_id: str) -> dict[str, Any]:
    op = ops.OPERATIONS.get(route.op)
    path_names = _PATH_PARAM.findall(route.path)
    params = {p.name: p for p in op.params} if op is not None else {}
    parameters: list[dict[str, Any]] = []
    for name in path_names:
        param = params.get(name)
        schema = param.json_schema() if param is not None else {"type": "string"}
        schema.setdefault("pattern", ID_PATTERN)
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    body_params = [p for p in (op.params if op is not None else ()) if p.name not in path_names]
    has_body = route.method not in ("GET", "DELETE", "HEAD")
    entry: dict[str, Any] = {
        "operationId": op_id,
        "summary": (op.summary if op is not None else "") or route.summary or route.op,
        "tags": [route.op.split(".")[0]],
        "x-operation": route.op,
    }
    if op is not None:
        entry["x-scope"] = op.scope
    if not has_body:
        for p in body_params:
            parameters.append(
                {
                    "name": p.name,
                    "in": "query",
                    "required": p.required,
                    "schema": p.json_schema(),
                }
            )
    elif body_params or op is None:
        body: dict[str, Any] = {
            "type": "object",
            "properties": {p.name: p.json_schema() for p in body_params},
        }
        required = [p.name for p in body_params if p.required]
        if required:
            body["required"] = required
        if op is not None and op.strict:
            body["additionalProperties"] = False
        entry["requestBody"] = {
            "required": bool(required),
            "content": {JSON_CT: {"schema": body}},
        }
    if parameters:
        entry["parameters"] = parameters
    status = op.status if op is not None else 200
    entry["responses"] = {
        **_success(status, "success"),
        **_error_responses(_statuses(public=route.public, body=has_body)),
    }
    entry["security"] = [] if route.public else [{"bearerAuth": []}]
    return entry


# -- paths outside the table ----------------------------------------------------------------------


def _fixed(
    summary: str,
    *,
    public: bool = False,
    status: int = 200,
    content_type: str = JSON_CT,
    schema: dict[str, Any] | None = None,
    query: tuple[tuple[str, dict[str, Any]], ...] = (),
    body: dict[str, Any] | None = None,
    tag: str = "operations",
    scope: str = "",
    errors: str = "Error",
    extra_status: tuple[int, ...] = (),
    required: tuple[str, ...] = (),
) -> dict[str, Any]:
    entry: dict[str, Any] = {"summary": summary, "tags": [tag]}
    if scope:
        entry["x-scope"] = scope
    if query:
        entry["parameters"] = [
            {"name": name, "in": "query", "required": name in required, "schema": s}
            for name, s in query
        ]
    if body is not None:
        entry["requestBody"] = {"required": True, "content": {JSON_CT: {"schema": body}}}
    responses = _success(status, "success", schema, content_type)
    for extra in extra_status:
        responses.update(_success(extra, "see the summary", schema, content_type))
    responses.update(_error_responses(_statuses(public=public, body=body is not None), errors))
    entry["responses"] = responses
    entry["security"] = [] if public else [{"bearerAuth": []}]
    return entry


def _ready_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "unavailable"]},
            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
            "failing": {"type": "array", "items": {"type": "string"}},
        },
    }


_STREAM_QUERY: tuple[tuple[str, dict[str, Any]], ...] = (
    ("token", {"type": "string", "description": "a token (streams only; prefer a ticket)"}),
    ("ticket", {"type": "string", "description": "a one-time ticket from POST /api/tickets"}),
)


def fixed_paths() -> dict[str, dict[str, dict[str, Any]]]:
    """``{path: {method: operation}}`` for everything served outside :data:`ROUTES`."""
    text = {"type": "string"}
    paths: dict[str, dict[str, dict[str, Any]]] = {
        "/health": {
            "get": _fixed(
                "Liveness (never rate limited)",
                public=True,
                tag="system",
                schema={
                    "type": "object",
                    "required": ["status", "timestamp"],
                    "properties": {"status": {"const": "ok"}, "timestamp": text},
                },
            )
        },
        "/ready": {
            "get": _fixed(
                "Readiness: store, event bus, provider (503 names what fails)",
                public=True,
                tag="system",
                schema=_ready_schema(),
                extra_status=(503,),
            )
        },
        "/metrics": {
            "get": _fixed(
                "Prometheus text exposition (read scope unless gateway.metrics_public)",
                content_type="text/plain",
                schema=text,
                scope="read",
            )
        },
        "/api/openapi.json": {"get": _fixed("This document", public=True, tag="system")},
        "/api/asyncapi.json": {
            "get": _fixed(
                "The AsyncAPI document of the WebSocket, JSON-RPC and SSE messages",
                public=True,
                tag="system",
            )
        },
        "/api/events": {
            "get": _fixed(
                "SSE: the event bus (read; chat tokens see their own); Last-Event-ID resumes",
                content_type=SSE_CT,
                schema=SSE_EVENT,
                tag="events",
                scope="own",
                query=(
                    ("types", text),
                    ("session_id", {"type": "string", "pattern": ID_PATTERN}),
                    ("last_event_id", {"type": "integer", "minimum": 0}),
                    *_STREAM_QUERY,
                ),
            )
        },
        "/api/chat/stream": {
            "get": _fixed(
                "SSE: one chat turn as token, tool_start, tool_end, approval_requested, "
                "then done or error",
                content_type=SSE_CT,
                schema=SSE_EVENT,
                tag="chat",
                scope="chat",
                required=("message",),
                query=(
                    ("message", {"type": "string", "minLength": 1}),
                    ("session_id", {"type": "string", "pattern": ID_PATTERN}),
                    *_STREAM_QUERY,
                ),
            ),
            "post": _fixed(
                "SSE: as GET, with the /api/chat body",
                content_type=SSE_CT,
                schema=SSE_EVENT,
                tag="chat",
                scope="chat",
                body={
                    "type": "object",
                    "required": ["message"],
                    "properties": {
                        "message": text,
                        "session_id": {"type": "string", "pattern": ID_PATTERN},
                    },
                },
            ),
        },
        "/api/daemon/logs": {
            "get": _fixed(
                "SSE: the last N lines of gatewayd.log as `log` events, `tail_end`, then new "
                "lines (follow=0 stops after the tail)",
                content_type=SSE_CT,
                schema=SSE_EVENT,
                scope="admin",
                query=(
                    ("lines", {"type": "integer", "minimum": 0, "maximum": 10000}),
                    ("follow", {"type": "boolean"}),
                    *_STREAM_QUERY,
                ),
            )
        },
        "/rpc": {
            "post": _fixed(
                "JSON-RPC 2.0 over HTTP, single or batch (CONTRACT §6); the methods are the "
                "operations, see /api/asyncapi.json",
                tag="rpc",
                scope="any",
                body={"type": ["object", "array"]},
                schema={"type": ["object", "array"]},
                extra_status=(204,),
            )
        },
        "/hooks/{name}": {
            "post": _fixed(
                "A signed webhook delivery (CONTRACT §9); 202 accepted, 200 duplicate",
                public=True,
                status=202,
                tag="hooks",
                extra_status=(200,),
                body={"description": "any bytes; verified as received"},
            )
        },
        "/admin/paircode": {
            "get": _fixed(
                "A pairing code (loopback peer and loopback Host only)",
                public=True,
                tag="admin",
            )
        },
        "/admin/shutdown": {
            "post": _fixed(
                "Stop gracefully, as SIGTERM (loopback peer and loopback Host only)",
                public=True,
                status=202,
                tag="admin",
            )
        },
    }
    paths["/hooks/{name}"]["post"]["parameters"] = [
        {
            "name": "name",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
        }
    ]
    paths["/hooks/{name}"]["post"]["requestBody"]["content"] = {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        JSON_CT: {"schema": {}},
    }
    paths["/hooks/{name}"]["post"]["responses"]["401"] = {
        "$ref": "#/components/responses/Unauthorized"
    }
    for method, template in _openai_routes():
        op = _fixed(
            "OpenAI-compatible API (CONTRACT §7); errors in OpenAI's shape",
            tag="openai",
            scope="chat",
            errors="OpenAIError",
            body={"type": "object"} if method == "POST" else None,
        )
        if method == "POST":
            op["responses"]["200"]["content"][SSE_CT] = {"schema": SSE_EVENT}
        if "{model}" in template:
            op["parameters"] = [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        paths.setdefault(template, {})[method.lower()] = op
    return paths


def _openai_routes() -> tuple[tuple[str, str], ...]:
    try:
        from gatewayd.web.openai_api import ROUTES as OPENAI_ROUTES
    except ImportError:  # pragma: no cover - the adapter is optional for the document
        return ()
    return OPENAI_ROUTES


def _config_overrides(paths: dict[str, dict[str, dict[str, Any]]]) -> None:
    """``/api/config``: ETag on reads; If-Match, merge-patch and TOML bodies on writes."""
    if_match = {
        "name": "If-Match",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "the ETag the change is based on; a stale one gives 412",
    }
    etag = {"ETag": {"schema": {"type": "string"}, "description": "the config's version"}}
    result = {
        "type": "object",
        "required": ["applied", "restart_required"],
        "properties": {
            "applied": {"type": "array", "items": {"type": "string"}},
            "restart_required": {"type": "array", "items": {"type": "string"}},
        },
    }
    config = paths.get("/api/config", {})
    if "get" in config:
        config["get"]["responses"]["200"]["headers"] = etag
        config["get"]["responses"]["200"]["description"] = (
            'the effective config mirroring the TOML tree, secrets as "***"'
        )
    if "put" in config:
        put = config["put"]
        put["parameters"] = [if_match]
        put["requestBody"] = {
            "required": True,
            "content": {
                "application/toml": {"schema": {"type": "string", "maxLength": 1048576}},
                "text/plain": {"schema": {"type": "string", "maxLength": 1048576}},
            },
        }
        put["responses"]["200"]["content"][JSON_CT]["schema"] = result
        put["responses"]["412"] = {"$ref": "#/components/responses/PreconditionFailed"}
    patch = paths.get("/api/config/patch", {}).get("post")
    if patch is not None:
        patch["parameters"] = [
            if_match,
            {
                "name": "dry_run",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": ["0", "1", "true", "false"]},
                "description": "1: answer {dry_run, applied, restart_required, changes} only",
            },
        ]
        body = {"type": "object", "description": "a JSON merge patch (RFC 7396) of the tree"}
        patch["requestBody"] = {
            "required": True,
            "content": {
                "application/merge-patch+json": {"schema": body},
                JSON_CT: {"schema": body},
            },
        }
        patch["responses"]["200"]["content"][JSON_CT]["schema"] = result
        patch["responses"]["412"] = {"$ref": "#/components/responses/PreconditionFailed"}
    apply = paths.get("/api/config/apply", {}).get("post")
    if apply is not None:
        apply.pop("requestBody", None)
        apply["responses"]["200"]["content"][JSON_CT]["schema"] = result
    backup = paths.get("/api/backup", {}).get("post")
    if backup is not None:
        backup.pop("requestBody", None)
        backup["responses"]["201"]["content"][JSON_CT]["schema"] = {
            "type": "object",
            "required": ["path", "bytes"],
            "properties": {"path": {"type": "string"}, "bytes": {"type": "integer"}},
        }


OVERRIDES: tuple[Callable[[dict[str, dict[str, dict[str, Any]]]], None], ...] = (_config_overrides,)


def openapi_document(routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document, from the route table and the operations table."""
    ops.load_all()
    paths: dict[str, dict[str, dict[str, Any]]] = {}
    seen_ids: dict[str, int] = {}
    for route in routes:
        template = _PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", route.path)
        count = seen_ids.get(route.op, 0)
        seen_ids[route.op] = count + 1
        op_id = route.op if count == 0 else f"{route.op}#{count + 1}"
        paths.setdefault(template, {})[route.method.lower()] = _route_operation(route, op_id)
    for template, methods in fixed_paths().items():
        for method, entry in methods.items():
            if method in paths.get(template, {}):
                continue  # the route table wins
            entry.setdefault("operationId", f"{method}:{template}")
            paths.setdefault(template, {})[method] = entry
    for override in OVERRIDES:
        override(paths)
    responses = {
        name: {
            "description": description,
            "content": {JSON_CT: {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for _status, (name, description) in ERROR_STATUSES.items()
    }
    responses["Unauthorized"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    responses["RateLimited"]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gatewayd",
            "version": __version__,
            "description": "An AI-agent gateway: REST, SSE, WebSocket, JSON-RPC, "
            "OpenAI-compatible API, webhooks and bridges. Generated from the route and "
            "operations tables; `x-scope` is the scope a token needs.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a gatewayd token (CONTRACT §3)",
                },
            },
            "schemas": {
                "Error": _error_schema(),
                "OpenAIError": _openai_error_schema(),
                "Event": event_envelope_schema(),
            },
            "responses": responses,
        },
    }


# -- AsyncAPI ------------------------------------------------------------------------------------

#: event types and their payload fields (CONTRACT §6)
EVENT_TYPES: dict[str, dict[str, Any]] = {
    "run_started": {},
    "text_delta": {"content": {"type": "string"}},
    "tool_start": {
        "call_id": {"type": "string"},
        "tool": {"type": "string"},
        "input": {"type": "object"},
    },
    "tool_end": {
        "call_id": {"type": "string"},
        "tool": {"type": "string"},
        "result": {"type": "string"},
        "is_error": {"type": "boolean"},
    },
    "turn_complete": {},
    "run_complete": {
        "response": {"type": "string"},
        "tokens": {"type": "object"},
        "cost_cents": {"type": "number"},
    },
    "run_error": {"error": {"type": "string"}},
    "run_aborted": {},
    "approval_requested": {
        "approval_id": {"type": "string"},
        "tool": {"type": "string"},
        "input": {"type": "object"},
    },
    "approval_resolved": {
        "approval_id": {"type": "string"},
        "decision": {"enum": ["approve", "deny"]},
        "reason": {"type": ["string", "null"]},
    },
    "session_created": {},
    "session_updated": {},
    "session_deleted": {},
    "session_expired": {},
    "cron_fired": {"job_id": {"type": "string"}, "name": {"type": "string"}},
    "heartbeat_alert": {"check": {"type": "string"}, "message": {"type": "string"}},
    "budget_warning": {"spent_cents": {"type": "number"}, "limit_cents": {"type": "number"}},
    "config_patched": {"keys": {"type": "array", "items": {"type": "string"}}},
    "channel_event": {"channel": {"type": "string"}, "direction": {"type": "string"}},
    "webhook_received": {"hook": {"type": "string"}, "delivery_id": {"type": "string"}},
    "token_created": {},
    "token_revoked": {},
    "device_paired": {},
    "device_revoked": {},
    "shutdown": {"grace_s": {"type": "number"}},
}

#: typed WebSocket frames (subprotocol gatewayd.v1), CONTRACT §6 and §15
CLIENT_FRAMES: dict[str, dict[str, Any]] = {
    "chat": {
        "message": {"type": "string"},
        "session_id": {"type": "string"},
        "id": {"type": "string"},
    },
    "abort": {"run_id": {"type": "string"}, "session_id": {"type": "string"}},
    "approve": {
        "approval_id": {"type": "string"},
        "decision": {"enum": ["approve", "deny"]},
        "reason": {"type": "string"},
    },
    "subscribe": {
        "types": {"type": "array", "items": {"type": "string"}},
        "session_id": {"type": "string"},
        "after_id": {"type": "integer"},
    },
    "unsubscribe": {},
    "history": {"session_id": {"type": "string"}},
    "ping": {},
}
SERVER_FRAMES: dict[str, dict[str, Any]] = {
    "delta": {
        "session_id": {"type": "string"},
        "run_id": {"type": "string"},
        "content": {"type": "string"},
    },
    "tool_start": {},
    "tool_end": {"is_error": {"type": "boolean"}},
    "approval_requested": {},
    "run_complete": {
        "session_id": {"type": "string"},
        "run_id": {"type": "string"},
        "response": {"type": "string"},
        "tokens": {"type": "object"},
        "cost_cents": {"type": "number"},
    },
    "run_error": {},
    "event": {"event": {"$ref": "#/components/schemas/Event"}},
    "history": {"messages": {"type": "array"}},
    "pong": {},
    "subscribed": {},
    "error": {"code": {"type": "string"}, "message": {"type": "string"}, "ref": {"type": "string"}},
}


def event_envelope_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "type", "ts"],
        "properties": {
            "id": {"type": "integer"},
            "type": {"type": "string", "enum": sorted(EVENT_TYPES)},
            "ts": {"type": "string", "format": "date-time"},
            "session_id": {"type": "string"},
            "run_id": {"type": "string"},
        },
        "additionalProperties": True,
    }


def _frame(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "payload": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"const": name}, **fields},
        },
    }


def asyncapi_document() -> dict[str, Any]:
    """WebSocket typed frames, JSON-RPC methods (from the operations table) and SSE events."""
    table = ops.load_all()
    messages: dict[str, Any] = {}
    for name, fields in CLIENT_FRAMES.items():
        messages[f"client.{name}"] = _frame(name, fields)
    for name, fields in SERVER_FRAMES.items():
        messages[f"server.{name}"] = _frame(name, fields)
    for name, fields in EVENT_TYPES.items():
        messages[f"event.{name}"] = {
            "name": name,
            "payload": {
                "allOf": [
                    {"$ref": "#/components/schemas/Event"},
                    {"type": "object", "properties": {"type": {"const": name}, **fields}},
                ]
            },
        }
    for name, op in sorted(table.items()):
        messages[f"rpc.{name}"] = {
            "name": name,
            "summary": op.summary,
            "x-scope": op.scope,
            "payload": {
                "type": "object",
                "required": ["jsonrpc", "method"],
                "properties": {
                    "jsonrpc": {"const": "2.0"},
                    "id": {"type": ["string", "integer"]},
                    "method": {"const": name},
                    "params": op.params_schema(),
                },
            },
        }
    messages["rpc.result"] = {
        "name": "result",
        "payload": {
            "type": "object",
            "required": ["jsonrpc", "id"],
            "properties": {
                "jsonrpc": {"const": "2.0"},
                "id": {},
                "result": {},
                "error": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "integer"},
                        "message": {"type": "string"},
                        "data": {"type": "object"},
                    },
                },
            },
        },
    }
    messages["rpc.notification"] = {
        "name": "notification",
        "payload": {
            "type": "object",
            "required": ["jsonrpc", "method", "params"],
            "properties": {
                "jsonrpc": {"const": "2.0"},
                "method": {"enum": ["event", "chat.event"]},
                "params": {},
            },
        },
    }

    def refs(prefix: str) -> dict[str, Any]:
        return {k: {"$ref": f"#/components/messages/{k}"} for k in messages if k.startswith(prefix)}

    typed = {**refs("client."), **refs("server.")}
    rpc = {**refs("rpc.")}
    events = refs("event.")
    channels = {
        "ws": {
            "address": "/ws",
            "title": "WebSocket, subprotocol gatewayd.v1 (typed frames)",
            "messages": typed,
        },
        "wsChat": {
            "address": "/ws/chat",
            "title": "WebSocket bound to one session (?session_id=)",
            "messages": typed,
        },
        "wsRpc": {
            "address": "/ws",
            "title": "WebSocket, subprotocol gatewayd.jsonrpc",
            "messages": rpc,
        },
        "httpRpc": {"address": "/rpc", "title": "JSON-RPC 2.0 over POST", "messages": rpc},
        "events": {
            "address": "/api/events",
            "title": "SSE: id / event / data lines",
            "messages": events,
        },
    }

    def operation(action: str, channel: str, keys: list[str]) -> dict[str, Any]:
        return {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{k}"} for k in keys],
        }

    operations = {
        "sendTypedFrame": operation("receive", "ws", [k for k in typed if k.startswith("client.")]),
        "receiveTypedFrame": operation("send", "ws", [k for k in typed if k.startswith("server.")]),
        "callMethod": operation(
            "receive", "wsRpc", [k for k in rpc if k not in ("rpc.result", "rpc.notification")]
        ),
        "answerMethod": operation("send", "wsRpc", ["rpc.result", "rpc.notification"]),
        "streamEvents": operation("send", "events", list(events)),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "gatewayd streams",
            "version": __version__,
            "description": "WebSocket typed frames and JSON-RPC 2.0, SSE events. "
            "Credentials: Authorization: Bearer, ?token=, ?ticket=, or the subprotocol "
            "bearer.<token> beside gatewayd.v1 / gatewayd.jsonrpc.",
        },
        "defaultContentType": JSON_CT,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": {"Event": event_envelope_schema()}},
    }


class DocumentResource(Resource):
    """A generated JSON document, built on first use and kept (the tables do not change)."""

    isLeaf = True

    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._build = build
        self._body: bytes | None = None

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return render_error(
                request,
                GatewayError(
                    "method_not_allowed", "this path serves GET only", data={"allow": "GET, HEAD"}
                ),
            )
        if self._body is None:
            self._body = json.dumps(self._build(), separators=(",", ":")).encode()
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"public, max-age=60")
        request.setHeader(b"access-control-allow-origin", b"*")
        return self._body
