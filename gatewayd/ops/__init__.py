"""The one operations table.

Each thing a client can do is declared once here, with the scope it needs and its
parameters; REST, JSON-RPC (WebSocket and ``POST /rpc``), typed WebSocket frames, WAMP, the
OpenAI layer, bridges and gatewayctl all call :func:`call`.  Parameter checks live in
:class:`Param`, so every transport rejects the same bad input with the same message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, ensureDeferred

from gatewayd.auth import Principal
from gatewayd.errors import GatewayError, invalid

if TYPE_CHECKING:
    from gatewayd.core import Gateway

ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_JSON_TYPES: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
}


def _is_id(value: Any) -> str | None:
    return None if ID_RE.fullmatch(value) else "must match [A-Za-z0-9._:-]{1,128}"


@attrs.frozen
class Param:
    name: str
    type: type
    required: bool = False
    default: Any = None
    doc: str = ""
    aliases: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    is_id: bool = False
    choices: tuple[str, ...] = ()

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": _JSON_TYPES[self.type]}
        if self.doc:
            schema["description"] = self.doc
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        if self.is_id:
            schema["pattern"] = "^[A-Za-z0-9._:-]{1,128}$"
        if self.choices:
            schema["enum"] = list(self.choices)
        return schema

    def coerce(self, value: Any, from_text: bool) -> Any:
        """Check one value; ``from_text`` allows query-string numbers and booleans."""
        t = self.type
        if from_text and isinstance(value, str):
            if t is int and re.fullmatch(r"-?\d{1,12}", value):
                value = int(value)
            elif t is float and re.fullmatch(r"-?\d{1,12}(\.\d{1,12})?", value):
                value = float(value)
            elif t is bool and value in ("true", "false", "1", "0"):
                value = value in ("true", "1")
        ok = isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise invalid(f"{self.name}: expected {_JSON_TYPES[t]}")
        if self.minimum is not None and value < self.minimum:
            raise invalid(f"{self.name}: must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise invalid(f"{self.name}: must be at most {self.maximum:g}")
        if self.max_length is not None and len(value) > self.max_length:
            raise invalid(f"{self.name}: longer than {self.max_length}")
        if self.choices and value not in self.choices:
            raise invalid(f"{self.name}: must be one of {', '.join(self.choices)}")
        for check in (_is_id if self.is_id else None, self.check):
            if check is not None:
                problem = check(value)
                if problem:
                    raise invalid(f"{self.name}: {problem}")
        return value


@attrs.frozen
class Call:
    """One invocation: who asks, from which transport, and where streamed updates go."""

    principal: Principal
    transport: str = "rest"
    notify: Callable[[str, dict[str, Any]], None] | None = None
    peer: str = ""


Handler = Callable[["Gateway", Call, dict[str, Any]], Coroutine[Any, Any, Any]]
H = TypeVar("H", bound=Handler)


@attrs.frozen
class Operation:
    name: str
    scope: str
    params: tuple[Param, ...]
    handler: Handler
    summary: str = ""
    #: the REST status of a success (201 create, 202 started, 204 deleted)
    status: int = 200
    #: keys other than the declared ones are refused (strict) or ignored
    strict: bool = False
    audit: bool = False

    def validate(self, raw: Mapping[str, Any], from_text: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        known = set()
        for p in self.params:
            known.add(p.name)
            known.update(p.aliases)
            for key in (p.name, *p.aliases):
                if key in raw and raw[key] is not None:
                    out[p.name] = p.coerce(raw[key], from_text)
                    break
            else:
                if p.required:
                    raise invalid(f"{p.name}: required")
                out[p.name] = p.default
        if self.strict:
            extra = sorted(set(raw) - known)
            if extra:
                raise invalid(f"{extra[0]}: unknown parameter")
        return out

    def params_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {p.name: p.json_schema() for p in self.params},
            "required": [p.name for p in self.params if p.required],
        }


OPERATIONS: dict[str, Operation] = {}


def operation(
    name: str,
    scope: str,
    *params: Param,
    summary: str = "",
    status: int = 200,
    strict: bool = False,
    audit: bool = False,
) -> Callable[[H], H]:
    def register(fn: H) -> H:
        OPERATIONS[name] = Operation(
            name,
            scope,
            params,
            fn,
            summary or (fn.__doc__ or "").strip().split("\n")[0],
            status,
            strict,
            audit,
        )
        return fn

    return register


def authorize(op: Operation, principal: Principal | None) -> Principal:
    if principal is None:
        raise GatewayError("unauthorized", "a valid bearer token is required")
    if not principal.can(op.scope):
        scope = "read" if op.scope == "own" else op.scope
        raise GatewayError("forbidden", f"{op.name} needs the {scope} scope")
    return principal


def call(
    gateway: Gateway,
    name: str,
    principal: Principal | None,
    raw: Mapping[str, Any],
    *,
    transport: str = "rest",
    notify: Callable[[str, dict[str, Any]], None] | None = None,
    from_text: bool = False,
    peer: str = "",
) -> Deferred[Any]:
    """Authorize, validate and run one operation; failures are GatewayErrors."""
    try:
        op = OPERATIONS[name]
        who = authorize(op, principal)
        params = op.validate(raw, from_text)
    except KeyError:
        return _failed(GatewayError("not_found", f"no such operation: {name}"))
    except GatewayError as e:
        if e.code == "forbidden" and principal is not None and op.scope == "admin":
            gateway.audit(principal, "denied", name, transport=transport)  # CONTRACT §3
        return _failed(e)
    return ensureDeferred(op.handler(gateway, Call(who, transport, notify, peer), params))


def _failed(error: GatewayError) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


def load_all() -> dict[str, Operation]:
    """Import every operations module so the table is complete."""
    from gatewayd.ops import (  # noqa: F401
        activity,
        approvals,
        channels,
        chat,
        config,
        cron,
        devices,
        events,
        maintenance,
        sessions,
        system,
        tokens,
        tools,
    )

    return OPERATIONS
