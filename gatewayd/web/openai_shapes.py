"""What the OpenAI-compatible API writes: errors in OpenAI's shape, ``chat.completion``
objects and chunks, Responses API objects and events, and the exchange that writes them.

Split from :mod:`gatewayd.web.openai_api` (routing, auth, the handlers): these are the wire
shapes, checked against the official SDKs' types (``openai/types/chat``,
``openai/types/responses``).
"""

from __future__ import annotations

import array
import base64
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from gatewayd.errors import GatewayError, openai_error_body
from gatewayd.events import Event
from gatewayd.ops.chat import outcome
from gatewayd.ops.openai import response_id
from gatewayd.sendnow import send_now
from gatewayd.store.records import Run
from gatewayd.web.common import dumps

_log = Logger()
T = TypeVar("T")

FINGERPRINT = "fp_gatewayd"

# -- errors in OpenAI's shape ---------------------------------------------------------------


def render_openai_error(request: IRequest, error: GatewayError) -> bytes:
    """Render an error under ``/v1/`` (also for the edge limits: 413, 429, 408 …)."""
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    if error.status == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="gatewayd"')
    if error.retry_after is not None or error.status == 429:
        request.setHeader(b"retry-after", str(max(1, error.retry_after or 1)).encode())
    if error.status == 405 and "allow" in error.data:
        request.setHeader(b"allow", str(error.data["allow"]).encode())
    if "run_id" in error.data or error.code == "budget_exceeded":
        # the turn was stored and ran (tools too): the SDKs must not send it again on their own
        request.setHeader(b"x-should-retry", b"false")
    return dumps(openai_error_body(error))


def stream_error(error: GatewayError) -> dict[str, Any]:
    inner: dict[str, Any] = openai_error_body(error)["error"]
    return inner


def run_error(run: Run) -> GatewayError:
    """What a run that did not complete means to a client (as for ``POST /api/chat``)."""
    try:
        outcome(run)
    except GatewayError as e:
        return e
    return GatewayError("internal", "the run did not complete")


# -- one request/response exchange ------------------------------------------------------------


class Exchange:
    """A request that may go away: writes become no-ops and waits are cancelled then."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.gone = False
        self.done = False
        self._on_gone: list[Callable[[], None]] = []
        request.notifyFinish().addCallbacks(self._finished, self._lost)

    def _finished(self, _: object) -> None:
        self.done = True

    def _lost(self, _: Failure) -> None:
        self.gone = True
        callbacks, self._on_gone = self._on_gone, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _log.failure("cleaning up after a lost /v1 client failed")

    @property
    def open(self) -> bool:
        return not (self.gone or self.done)

    def on_gone(self, callback: Callable[[], None]) -> None:
        if self.gone:
            callback()
        else:
            self._on_gone.append(callback)

    def wait(self, d: Deferred[T]) -> Deferred[T]:
        """``d``, cancelled if the client goes first (so give it a Deferred of its own)."""
        self.on_gone(lambda: None if d.called else d.cancel())
        return d

    def write(self, data: bytes) -> None:
        if self.open:
            self.request.write(data)

    def flush(self) -> None:
        """Send what is written so far now, not when the reactor next polls."""
        if self.open:
            send_now(getattr(self.request, "transport", None))

    def finish(self, data: bytes = b"") -> None:
        if self.open:
            if data:
                self.request.write(data)
            self.request.finish()

    def json(self, status: int, body: Any) -> None:
        if not self.open:
            return
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        data = dumps(body)
        request.setHeader(b"content-length", b"%d" % len(data))
        self.finish(data)

    def start_stream(self) -> None:
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        transport = getattr(request, "transport", None)
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:  # each delta is a small write that must not wait for an ACK
                set_no_delay(True)
            except OSError:
                pass


def run_headers(request: IRequest, run: Run) -> None:
    request.setHeader(b"x-session-id", run.session_id.encode())
    request.setHeader(b"x-run-id", run.id.encode())
    request.setHeader(b"x-request-id", run.id.encode())


# -- streams --------------------------------------------------------------------------------


class StreamOut:
    """What a streamed answer does with a run's events."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.started = False
        #: deltas that came before the headers were sent (a fast provider, within submit)
        self.early: list[str] = []
        self.text: list[str] = []

    def on_event(self, event: Event) -> None:
        if event.type != "text_delta":
            return
        content = event.payload.get("content")
        if not content:
            return
        if self.started:
            self.text.append(content)
            self.delta(content)
            if len(self.text) == 1:
                # the first token is what the client is waiting for; the rest of this
                # burst (and the bookkeeping behind it) must not hold it back
                self.ex.flush()
        else:
            self.early.append(content)

    def begin(self, run: Run) -> None:
        self.started = True
        self.head(run)
        early, self.early = self.early, []
        for content in early:
            self.text.append(content)
            self.delta(content)

    def close(self, reason: str) -> None:
        """The stream registry ends this stream (token revoked, shutdown)."""
        error = GatewayError("unavailable", f"The stream was closed: {reason}.")
        if self.started:
            self.error(error)
            self.ex.finish()
        elif self.ex.open:
            self.ex.finish(render_openai_error(self.ex.request, error))

    def head(self, run: Run) -> None:
        raise NotImplementedError

    def delta(self, content: str) -> None:
        raise NotImplementedError

    def end(self, run: Run) -> None:
        raise NotImplementedError

    def error(self, error: GatewayError) -> None:
        raise NotImplementedError


class ChatStream(StreamOut):
    """``chat.completion.chunk`` lines: the role first, a chunk per delta, the finish reason,
    the usage chunk when asked for, then ``[DONE]``."""

    def __init__(self, ex: Exchange, model: str, include_usage: bool) -> None:
        super().__init__(ex)
        self.model = model
        self.include_usage = include_usage
        self._prefix = b""
        self._suffix = b""

    def _chunk(self, choices: list[Any], usage: Any = None) -> bytes:
        body: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return b"data: " + dumps(body) + b"\n\n"

    def head(self, run: Run) -> None:
        self._id = completion_id(run.id)
        self._created = int(run.created_at)
        # deltas are the hot path: everything around the content is encoded once
        one = self._chunk(
            [{"index": 0, "delta": {"content": "\x00"}, "logprobs": None, "finish_reason": None}]
        )
        self._prefix, _, self._suffix = one.partition(b'"\\u0000"')
        role = {"role": "assistant", "content": "", "refusal": None}
        self.ex.write(
            self._chunk([{"index": 0, "delta": role, "logprobs": None, "finish_reason": None}])
        )

    def delta(self, content: str) -> None:
        self.ex.write(self._prefix + dumps(content) + self._suffix)

    def end(self, run: Run) -> None:
        if run.status != "completed":
            self.error(run_error(run))
            self.ex.finish()
            return
        out = self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
        if self.include_usage:
            out += self._chunk([], chat_usage(run))
        self.ex.finish(out + b"data: [DONE]\n\n")

    def error(self, error: GatewayError) -> None:
        self.ex.write(b"data: " + dumps({"error": stream_error(error)}) + b"\n\n")


class ResponseShape:
    """The Responses API objects of one run."""

    def __init__(
        self, *, model: str, instructions: Any, previous: Any, metadata: dict[str, Any]
    ) -> None:
        self.model = model
        self.instructions = instructions if isinstance(instructions, str) else None
        self.previous = previous
        self.metadata = metadata
        self.id = ""
        self.item_id = ""
        self.created = 0

    def start(self, run: Run) -> None:
        self.id = response_id(run.id)
        self.item_id = "msg_" + run.id.removeprefix("run_")
        self.created = int(run.created_at)

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, status: str, text: str | None) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [] if text is None else [self.part(text)],
        }

    def response(
        self,
        status: str,
        text: str | None,
        run: Run | None = None,
        error: GatewayError | None = None,
    ) -> dict[str, Any]:
        done = status in ("completed", "failed")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": int(run.finished_at or run.created_at) if done and run else None,
            "error": None if error is None else {"code": "server_error", "message": error.message},
            "incomplete_details": None,
            "instructions": self.instructions,
            "max_output_tokens": None,
            "model": self.model,
            "output": [] if text is None else [self.item("completed", text)],
            "parallel_tool_calls": True,
            "previous_response_id": self.previous,
            "reasoning": {"effort": None, "summary": None},
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": response_usage(run) if done and run else None,
            "user": None,
            "metadata": self.metadata,
        }


class ResponseStream(StreamOut):
    """Responses API events, each ``event: <type>`` with a ``data`` that carries the type
    and a sequence number, in the order OpenAI sends them."""

    def __init__(self, ex: Exchange, shape: ResponseShape) -> None:
        super().__init__(ex)
        self.shape = shape
        self.seq = 0

    def send(self, kind: str, **fields: Any) -> None:
        data = dumps({"type": kind, "sequence_number": self.seq, **fields})
        self.seq += 1
        self.ex.write(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.shape.item_id, "output_index": 0, "content_index": 0}

    def head(self, run: Run) -> None:
        shape = self.shape
        shape.start(run)
        self.send("response.created", response=shape.response("in_progress", None))
        self.send("response.in_progress", response=shape.response("in_progress", None))
        self.send(
            "response.output_item.added", output_index=0, item=shape.item("in_progress", None)
        )
        self.send("response.content_part.added", part=shape.part(""), **self._at())

    def delta(self, content: str) -> None:
        self.send("response.output_text.delta", delta=content, logprobs=[], **self._at())

    def end(self, run: Run) -> None:
        text = "".join(self.text)
        if run.status != "completed":
            self.error(run_error(run), run)
            self.ex.finish()
            return
        shape = self.shape
        self.send("response.output_text.done", text=text, logprobs=[], **self._at())
        self.send("response.content_part.done", part=shape.part(text), **self._at())
        self.send("response.output_item.done", output_index=0, item=shape.item("completed", text))
        self.send("response.completed", response=shape.response("completed", text, run))
        self.ex.finish()

    def error(self, error: GatewayError, run: Run | None = None) -> None:
        failed = self.shape.response("failed", "".join(self.text) or None, run, error)
        self.send("response.failed", response=failed)


# -- values ---------------------------------------------------------------------------------


def completion_id(run_id: str) -> str:
    return "chatcmpl-" + run_id.removeprefix("run_")


def chat_usage(run: Run) -> dict[str, Any]:
    return {
        "prompt_tokens": run.tokens_in,
        "completion_tokens": run.tokens_out,
        "total_tokens": run.tokens_in + run.tokens_out,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def response_usage(run: Run) -> dict[str, Any]:
    return {
        "input_tokens": run.tokens_in,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": run.tokens_out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": run.tokens_in + run.tokens_out,
    }


def as_base64(result: dict[str, Any]) -> dict[str, Any]:
    """Float vectors as OpenAI's base64 (little-endian float32) when the client asked."""
    data = []
    for item in result.get("data", []):
        vector = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(vector, list):
            packed = array.array("f", vector)
            if sys.byteorder == "big":
                packed.byteswap()
            item = {**item, "embedding": base64.b64encode(packed.tobytes()).decode("ascii")}
        data.append(item)
    return {**result, "data": data}
