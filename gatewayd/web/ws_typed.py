"""Typed WebSocket frames (subprotocol ``gatewayd.v1``): each one maps onto an operation.

Client → server: ``chat``, ``abort``, ``approve``, ``subscribe``, ``unsubscribe``,
``history``, ``ping``.  Server → client: ``delta``, ``tool_start``, ``tool_end``,
``approval_requested``, ``run_complete``, ``run_error``, ``event``, ``history``, ``pong``,
``subscribed``, ``unsubscribed`` and ``error``.  A frame's ``id`` comes back as ``ref`` on
every frame it causes.  ``abort`` and ``approve`` answer only on failure; their effect shows
in the run's own frames and events.  Nothing here re-implements an operation.

``subscribe {types?, session_id?, after_id?}`` is acknowledged with ``{"type": "subscribed",
"last_id": n}``; then the kept events after ``after_id`` (as SSE's ``Last-Event-ID``), then live
ones, each as ``{"type": "event", "event": <envelope>}``.  An ``after_id`` the server does not
know (too old, or newer than any it gave out) yields, instead of a replay, one
``{"type": "event", "event": {"id": <newest id>, "type": "reset", "ts", "last_event_id",
"after_id"}}`` — like SSE's ``event: reset``, its id is the one to resume from.  A connection
has one subscription; another ``subscribe`` replaces it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import ensureDeferred
from twisted.python.failure import Failure

from gatewayd import ops
from gatewayd.errors import GatewayError, invalid
from gatewayd.ops.events import normalize

if TYPE_CHECKING:
    from gatewayd.web.ws import GatewayWsProtocol

Handler = Callable[["GatewayWsProtocol", dict[str, Any], Any], None]
#: run events forwarded to the chat that started the run, by their typed frame name
_RUN_FRAMES = {
    "text_delta": "delta",
    "tool_start": "tool_start",
    "tool_end": "tool_end",
    "approval_requested": "approval_requested",
    "run_complete": "run_complete",
    "run_error": "run_error",
    "run_aborted": "run_error",
}
_TERMINAL = frozenset({"run_complete", "run_error", "run_aborted"})


def _params(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k not in ("type", "id")}


def _call(proto: GatewayWsProtocol, name: str, params: dict[str, Any], **kw: Any) -> Any:
    return ops.call(
        proto.gw,
        name,
        proto.principal,
        params,
        transport="websocket",
        peer=proto.peer_host,
        **kw,
    )


def run_frame(envelope: dict[str, Any], ref: Any) -> dict[str, Any] | None:
    """The typed frame for one of a chat's run events, or None for the ones not sent."""
    kind = _RUN_FRAMES.get(envelope["type"])
    if kind is None:
        return None
    if kind == "delta":
        frame = {
            "type": "delta",
            "session_id": envelope.get("session_id"),
            "run_id": envelope.get("run_id"),
            "content": envelope.get("content", ""),
        }
    elif envelope["type"] == "run_aborted":
        frame = {
            "type": "run_error",
            "session_id": envelope.get("session_id"),
            "run_id": envelope.get("run_id"),
            "error": envelope.get("reason") or "aborted",
            "code": "aborted",
        }
    else:
        frame = {k: v for k, v in envelope.items() if k not in ("id", "ts")}
    if ref is not None:
        frame["ref"] = ref
    return frame


def chat(proto: GatewayWsProtocol, frame: dict[str, Any], ref: Any) -> None:
    params = _params(frame)
    if proto.bound_session and not params.get("session_id") and not params.get("sessionKey"):
        params["session_id"] = proto.bound_session
    ended: list[bool] = []

    def notify(method: str, envelope: dict[str, Any]) -> None:
        if ended:
            return
        out = run_frame(envelope, ref)
        if out is not None:
            if envelope["type"] in _TERMINAL:
                ended.append(True)
            proto.send_obj(out)

    def done(result: Any) -> None:
        if not ended and isinstance(result, dict):  # the events said it already, normally
            ended.append(True)
            out = {"type": "run_complete", **result}
            if ref is not None:
                out["ref"] = ref
            proto.send_obj(out)

    def failed(failure: Failure) -> None:
        if not ended:  # refused before the run started: bad input, queue full, not found
            proto.send_failure(failure, ref)

    _call(proto, "chat.send", params, notify=notify).addCallbacks(done, failed)


def _acting(name: str) -> Handler:
    """A frame whose success shows in the run's own frames; only failures are answered."""

    def handler(proto: GatewayWsProtocol, frame: dict[str, Any], ref: Any) -> None:
        _call(proto, name, _params(frame)).addErrback(proto.send_failure, ref)

    return handler


def history(proto: GatewayWsProtocol, frame: dict[str, Any], ref: Any) -> None:
    params = _params(frame)
    if not params.get("session_id") and proto.bound_session:
        params["session_id"] = proto.bound_session

    def send(result: dict[str, Any]) -> None:
        out = {"type": "history", **result}
        if ref is not None:
            out["ref"] = ref
        proto.send_obj(out)

    _call(proto, "chat.history", params).addCallbacks(send, proto.send_failure, errbackArgs=(ref,))


def subscribe(proto: GatewayWsProtocol, frame: dict[str, Any], ref: Any) -> None:
    op = ops.OPERATIONS["events.subscribe"]
    try:
        ops.authorize(op, proto.principal)
        params = op.validate(normalize(_params(frame)))
    except GatewayError as e:
        proto.send_error(e, ref)
        return

    def started(backlog: list[Any]) -> None:
        ack: dict[str, Any] = {"type": "subscribed", "last_id": proto.gw.bus.last_id}
        if ref is not None:
            ack["ref"] = ref
        proto.send_obj(ack)
        proto.send_replay(backlog)

    ensureDeferred(proto.follow(params)).addCallbacks(
        started, proto.send_failure, errbackArgs=(ref,)
    )


def unsubscribe(proto: GatewayWsProtocol, frame: dict[str, Any], ref: Any) -> None:
    proto._unfollow()
    out: dict[str, Any] = {"type": "unsubscribed"}
    if ref is not None:
        out["ref"] = ref
    proto.send_obj(out)


def ping(proto: GatewayWsProtocol, frame: dict[str, Any], ref: Any) -> None:
    out: dict[str, Any] = {"type": "pong"}
    if ref is not None:
        out["ref"] = ref
    proto.send_obj(out)


HANDLERS: dict[str, Handler] = {
    "chat": chat,
    "abort": _acting("chat.abort"),
    "approve": _acting("approvals.resolve"),
    "subscribe": subscribe,
    "unsubscribe": unsubscribe,
    "history": history,
    "ping": ping,
}


def handle_frame(proto: GatewayWsProtocol, frame: Any) -> None:
    if not isinstance(frame, dict):
        proto.send_error(invalid("a frame must be a JSON object with a type"))
        return
    ref = frame.get("id")
    kind = frame.get("type")
    handler = HANDLERS.get(kind) if isinstance(kind, str) else None
    if handler is None:
        proto.send_error(invalid(f"unknown frame type: {kind!r}"[:200]), ref)
        return
    handler(proto, frame, ref)
