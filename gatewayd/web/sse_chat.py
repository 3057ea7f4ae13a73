"""``GET, POST /api/chat/stream``: one chat run as SSE — ``token``s, tools, then ``done``/``error``.

The run is the run manager's, exactly as for ``POST /api/chat`` (same operation, same
validation); this resource only listens to the run's events and waits with a Deferred of
its own, so a client that goes away ends the stream and never the run (DESIGN trap 11).
Everything that can fail before the run starts (credentials, body, full queue, budget) is a
plain JSON error; after the first byte of the stream, the end is an ``error`` event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gatewayd import ops
from gatewayd.auth import Principal
from gatewayd.errors import GatewayError
from gatewayd.events import Event
from gatewayd.ops.chat import outcome
from gatewayd.store.records import Run
from gatewayd.web.common import (
    as_gateway_error,
    authenticate,
    dumps,
    query_args,
    read_json_object,
    render_error,
)
from gatewayd.web.sse import EventHub, SSEStream, method_not_allowed, named_frame

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()
#: run events the chat stream passes on, with the envelope as data
_PASSED = frozenset({"tool_start", "tool_end", "approval_requested"})


def chat_frame(event: Event) -> bytes | None:
    """The chat stream's frame for one of its run's events (None: not streamed)."""
    if event.type == "text_delta":
        return b"event: token\ndata: %s\n\n" % dumps({"content": event.payload.get("content", "")})
    if event.type in _PASSED:
        return named_frame(event.type, event.encoded())
    return None


def final_frame(run: Run) -> bytes:
    """``done`` with the ``POST /api/chat`` body, or ``error`` with the REST error shape."""
    try:
        return named_frame("done", outcome(run))
    except GatewayError as e:
        return named_frame("error", e.to_json())


class ChatStreamResource(Resource):
    isLeaf = True

    def __init__(self, gw: Gateway, hub: EventHub) -> None:
        super().__init__()
        self._gw = gw
        self._hub = hub

    def render(self, request: IRequest) -> bytes | int:
        if request.method not in (b"GET", b"POST"):
            return method_not_allowed(request, "GET, POST")
        gw = self._gw
        op = ops.OPERATIONS["chat.send"]
        try:
            principal = ops.authorize(op, authenticate(gw, request, streaming=True))
            if request.method == b"GET":
                params = op.validate(query_args(request), from_text=True)
            else:
                params = op.validate(read_json_object(request, allow_empty=False))
            stream = SSEStream(request, self._hub)
            stream.handle = gw.streams.open(principal, "sse", stream.close)
        except GatewayError as e:
            return render_error(request, e)
        d = ensureDeferred(self._stream(stream, principal, params))
        d.addErrback(lambda f: _log.failure("chat stream failed", f))
        return NOT_DONE_YET

    async def _stream(self, stream: SSEStream, principal: Principal, p: dict[str, Any]) -> None:
        gw = self._gw

        def on_event(event: Event) -> None:
            frame = chat_frame(event)
            if frame is not None:
                stream.queue(frame)

        try:
            live = await gw.runs.submit(
                principal,
                p["message"],
                session_id=p["session_id"],
                agent_id=p["agent_id"] or "",
                on_event=on_event,
            )
            if live.run.error_code == "budget_exceeded":
                outcome(live.run)  # raises the 429 the REST route would answer
        except Exception:
            error = as_gateway_error(Failure(), "/api/chat/stream")
            if not stream.closed:
                stream.close("rejected", lose_connection=False, error=error)
            return
        if stream.closed:  # the client left (or was revoked) while the run was submitted
            _forget(live.listeners, on_event)
            return
        waiter: Deferred[Run] = gw.runs.wait(live.run.id)

        def ended() -> None:
            _forget(live.listeners, on_event)
            waiter.cancel()  # only this waiter: the run goes on

        stream.on_end(ended)
        stream.begin()
        try:
            run = await waiter
        except CancelledError:
            return
        except Exception:
            error = as_gateway_error(Failure(), "/api/chat/stream")
            stream.flush()
            stream.send(named_frame("error", error.to_json()))
            stream.close("run failed", lose_connection=False)
            return
        stream.flush()
        stream.send(final_frame(run))
        stream.close("done", lose_connection=False)


def _forget(listeners: list[Any], listener: Any) -> None:
    if listener in listeners:
        listeners.remove(listener)
