"""Local stand-ins for the model APIs, speaking their real wire formats over loopback.

Reusable by any test that needs an OpenAI-compatible or Anthropic upstream::

    standin = OpenAIStandIn(api_key="sk-test")
    standin.script.append(Stream(openai_text_chunks("Hello there", Usage(3, 2))))
    port, base_url = listen_standin(standin)        # base_url = "http://127.0.0.1:N/v1"
    try:
        ...  # point a provider (or the gateway's config) at base_url
        assert standin.requests[0].json["stream"] is True
    finally:
        yield stop_standin(port)                    # hangs up every connection, stops listening

Each stand-in is a ``twisted.web`` resource that records every request
(:class:`RecordedRequest`: method, path, lower-cased headers, raw body and parsed JSON, and an
``outcome`` Deferred that fires "finished" or "lost") and answers from a script per route:
:class:`Stream` (chunks written as given — the real SSE bytes — optionally held open),
:class:`Status` (any status, headers and body, e.g. a 429 with ``Retry-After: 0``) or
:class:`Hang` (never answers).  A route with an empty script gets a canned answer: the model
list, deterministic embeddings, or a 500 saying the script ran dry.

The ``*_chunks`` / ``*_events`` helpers build realistic streams from text and tool calls.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from gatewayd.agent.base import Usage

#: the usage the stream helpers report unless told otherwise
DEFAULT_USAGE = Usage(5, 7)

# -- what a stand-in answers ----------------------------------------------------------------


@attrs.define
class Stream:
    """A streamed 2xx answer: each chunk written as given (separate writes).

    ``gap_s`` > 0 spaces the writes out on the reactor (separate TCP segments, usually);
    ``hold_open`` leaves the response unfinished after the last chunk (for cancellation
    and idle-timeout tests: the connection stays open until the client hangs up).
    """

    chunks: list[bytes]
    status: int = 200
    headers: dict[str, str] = attrs.Factory(
        lambda: {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    hold_open: bool = False
    gap_s: float = 0.0


@attrs.define
class Status:
    """A plain answer: status, headers, and a body (dict/list → JSON, bytes as is)."""

    code: int
    body: Any = None
    headers: dict[str, str] = attrs.Factory(dict)


@attrs.define
class Hang:
    """Never answer (the connection stays open until the client gives up)."""


Reply = Stream | Status | Hang


@attrs.define(eq=False)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    #: fires "finished" when the response was completed, "lost" if the client hung up first
    outcome: Deferred[str] = attrs.Factory(Deferred)


# -- the resources --------------------------------------------------------------------------


class ScriptedStandIn(Resource):
    """Common machinery: record, authenticate, answer from the per-route script."""

    isLeaf = True
    #: what :func:`listen_standin` appends to the root URL to make the base URL
    base_path = ""
    #: the route :attr:`script` feeds
    main_route = ""

    def __init__(self, *, api_key: str | None = None, reactor: Any = None) -> None:
        super().__init__()
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.scripts: dict[str, list[Reply]] = {}
        self._reactor = reactor
        self._waiters: list[Deferred[RecordedRequest]] = []

    @property
    def script(self) -> list[Reply]:
        """The replies for the main (streaming) route, consumed in order."""
        return self.scripts.setdefault(self.main_route, [])

    @script.setter
    def script(self, replies: list[Reply]) -> None:  # so that ``standin.script += [...]`` works
        self.scripts[self.main_route] = replies

    def script_for(self, path: str) -> list[Reply]:
        return self.scripts.setdefault(path, [])

    def next_request(self) -> Deferred[RecordedRequest]:
        """Fires with the next request the stand-in records (to wait without polling)."""
        d: Deferred[RecordedRequest] = Deferred()
        self._waiters.append(d)
        return d

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # subclass hooks
    def routes(self) -> dict[str, str]:
        """path → allowed method."""
        raise NotImplementedError

    def refuse_auth(self, rec: RecordedRequest) -> Status | None:
        raise NotImplementedError

    def canned(self, rec: RecordedRequest) -> Reply:
        raise NotImplementedError

    def error(self, status: int, message: str) -> Status:
        raise NotImplementedError

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        body = request.content.read() if request.content is not None else b""
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        headers = {
            k.decode("latin-1").lower(): v[-1].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        rec = RecordedRequest(
            method=request.method.decode("ascii"),
            path=request.path.decode("utf-8"),
            headers=headers,
            body=body,
            json=parsed,
        )
        self.requests.append(rec)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(rec)
        request.notifyFinish().addCallbacks(
            lambda _: rec.outcome.callback("finished"), lambda _: rec.outcome.callback("lost")
        )
        method = self.routes().get(rec.path)
        if method is None:
            reply: Reply = self.error(404, f"no route {rec.path}")
        elif method != rec.method:
            reply = self.error(405, f"{rec.path} takes {method}")
        else:
            denied = self.refuse_auth(rec)
            script = self.scripts.get(rec.path)
            if denied is not None:
                reply = denied
            elif script:
                reply = script.pop(0)
            else:
                reply = self.canned(rec)
        return self._answer(request, rec, reply)

    def _answer(self, request: Request, rec: RecordedRequest, reply: Reply) -> bytes | int:
        if isinstance(reply, Hang):
            return NOT_DONE_YET
        request.setResponseCode(reply.status if isinstance(reply, Stream) else reply.code)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        if isinstance(reply, Status):
            if reply.body is None:
                return b""
            if isinstance(reply.body, bytes):
                return reply.body
            request.setHeader("Content-Type", "application/json")
            return json.dumps(reply.body, ensure_ascii=False).encode("utf-8")
        chunks = list(reply.chunks)
        if reply.gap_s <= 0:
            for chunk in chunks:
                request.write(chunk)
            if not reply.hold_open:
                request.finish()
            return NOT_DONE_YET
        pending: list[Any] = []

        def next_chunk() -> None:
            pending.clear()
            if rec.outcome.called:
                return
            if chunks:
                request.write(chunks.pop(0))
                pending.append(self.reactor.callLater(reply.gap_s, next_chunk))
            elif not reply.hold_open:
                request.finish()

        def stop(result: str) -> str:
            for call in pending:
                if call.active():
                    call.cancel()
            return result

        rec.outcome.addCallback(stop)
        next_chunk()
        return NOT_DONE_YET


class OpenAIStandIn(ScriptedStandIn):
    """An OpenAI-compatible server: ``/v1/chat/completions``, ``/v1/models``, ``/v1/embeddings``.

    With ``api_key`` set, a wrong bearer gets OpenAI's 401 — whose message quotes the key it
    was given (real OpenAI masks it; quoting it whole tests that providers scrub it).
    """

    base_path = "/v1"
    main_route = "/v1/chat/completions"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        model_ids: Sequence[str] = ("gpt-standin",),
        reactor: Any = None,
    ) -> None:
        super().__init__(api_key=api_key, reactor=reactor)
        self.model_ids = list(model_ids)

    def routes(self) -> dict[str, str]:
        return {
            "/v1/chat/completions": "POST",
            "/v1/models": "GET",
            "/v1/embeddings": "POST",
        }

    def error(self, status: int, message: str, kind: str = "invalid_request_error") -> Status:
        return openai_error(status, message, kind=kind)

    def refuse_auth(self, rec: RecordedRequest) -> Status | None:
        if self.api_key is None:
            return None
        given = rec.headers.get("authorization", "")
        if given == f"Bearer {self.api_key}":
            return None
        shown = given.removeprefix("Bearer ")
        return openai_error(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")

    def canned(self, rec: RecordedRequest) -> Reply:
        if rec.path == "/v1/models":
            return Status(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "standin"}
                        for m in self.model_ids
                    ],
                },
            )
        if rec.path == "/v1/embeddings":
            doc = rec.json if isinstance(rec.json, dict) else {}
            inputs = doc.get("input", [])
            if isinstance(inputs, str):
                inputs = [inputs]
            tokens = sum(len(str(t).split()) for t in inputs)
            return Status(
                200,
                {
                    "object": "list",
                    "data": [
                        {"object": "embedding", "index": i, "embedding": fake_embedding(str(t))}
                        for i, t in enumerate(inputs)
                    ],
                    "model": doc.get("model", ""),
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
            )
        return openai_error(500, "the stand-in's script is empty", kind="server_error")


class AnthropicStandIn(ScriptedStandIn):
    """An Anthropic Messages API: ``/v1/messages`` and ``/v1/models``.

    Requires ``anthropic-version``; with ``api_key`` set, a wrong ``x-api-key`` gets a 401
    whose message quotes the key it was given (to test that providers scrub it).
    """

    base_path = ""
    main_route = "/v1/messages"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        model_ids: Sequence[str] = ("claude-standin",),
        reactor: Any = None,
    ) -> None:
        super().__init__(api_key=api_key, reactor=reactor)
        self.model_ids = list(model_ids)

    def routes(self) -> dict[str, str]:
        return {"/v1/messages": "POST", "/v1/models": "GET"}

    def error(self, status: int, message: str, kind: str = "invalid_request_error") -> Status:
        return anthropic_error(status, message, kind=kind)

    def refuse_auth(self, rec: RecordedRequest) -> Status | None:
        if "anthropic-version" not in rec.headers:
            return anthropic_error(400, "anthropic-version: header is required")
        if self.api_key is None or rec.headers.get("x-api-key") == self.api_key:
            return None
        given = rec.headers.get("x-api-key", "")
        return anthropic_error(401, f"invalid x-api-key {given}", kind="authentication_error")

    def canned(self, rec: RecordedRequest) -> Reply:
        if rec.path == "/v1/models":
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in self.model_ids
            ]
            return Status(
                200,
                {
                    "data": data,
                    "has_more": False,
                    "first_id": self.model_ids[0] if self.model_ids else None,
                    "last_id": self.model_ids[-1] if self.model_ids else None,
                },
            )
        return anthropic_error(500, "the stand-in's script is empty", kind="api_error")


# -- listening ------------------------------------------------------------------------------


class _TrackedChannel(HTTPChannel):
    """An HTTPChannel its site can find and hang up at teardown."""

    def connectionMade(self) -> None:
        super().connectionMade()
        site = self.factory
        if isinstance(site, StandInSite):
            site.channels[self] = Deferred()
            site.connections_made += 1

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        site = self.factory
        if isinstance(site, StandInSite):
            lost = site.channels.pop(self, None)
            if lost is not None:
                lost.callback(None)


class StandInSite(Site):
    """A Site with no idle timer (no stray DelayedCalls) that tracks its connections."""

    protocol = _TrackedChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource, reactor: Any) -> None:
        super().__init__(resource, timeout=None, reactor=reactor)
        self.channels: dict[_TrackedChannel, Deferred[None]] = {}
        #: how many TCP connections were ever accepted (to see pooling at work)
        self.connections_made = 0
        self.noisy = False

    def log(self, request: Request) -> None:
        pass  # keep test output quiet


def listen_standin(resource: ScriptedStandIn, reactor: Any = None) -> tuple[Any, str]:
    """Serve ``resource`` on 127.0.0.1:0; return the listening port and the base URL."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if resource._reactor is None:
        resource._reactor = reactor
    site = StandInSite(resource, reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}{resource.base_path}"


def stop_standin(port: Any) -> Deferred[Any]:
    """Hang up every open connection, wait until they are gone, stop listening."""
    site = port.factory
    waits: list[Deferred[Any]] = []
    if isinstance(site, StandInSite):
        for channel, lost in list(site.channels.items()):
            waits.append(lost)
            if channel.transport is not None:
                channel.transport.abortConnection()
    stopped = port.stopListening()
    if isinstance(stopped, Deferred):
        waits.append(stopped)
    return DeferredList(waits, consumeErrors=True)


# -- OpenAI wire helpers --------------------------------------------------------------------

_OPENAI_ID = "chatcmpl-standin0001"


def words(text: str) -> list[str]:
    """``text`` cut into words that keep their trailing whitespace (as echo streams)."""
    out: list[str] = []
    current = ""
    for ch in text:
        if current and not ch.isspace() and current[-1].isspace():
            out.append(current)
            current = ""
        current += ch
    if current:
        out.append(current)
    return out


def sse_data(payload: Any) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def openai_chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    model: str = "gpt-standin",
    no_choices: bool = False,
) -> bytes:
    """One ``chat.completion.chunk`` SSE event, as OpenAI writes it."""
    chunk: dict[str, Any] = {
        "id": _OPENAI_ID,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "system_fingerprint": "fp_standin",
        "choices": []
        if no_choices
        else [
            {
                "index": 0,
                "delta": delta or {},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": None,
    }
    if usage is not None:
        chunk["usage"] = {
            "prompt_tokens": usage.input,
            "completion_tokens": usage.output,
            "total_tokens": usage.input + usage.output,
        }
    return sse_data(chunk)


def _openai_tail(finish_reason: str, usage: Usage | None, model: str) -> list[bytes]:
    tail = [openai_chunk({}, finish_reason=finish_reason, model=model)]
    if usage is not None:
        tail.append(openai_chunk(usage=usage, model=model, no_choices=True))
    tail.append(b"data: [DONE]\n\n")
    return tail


def openai_text_chunks(
    text: str,
    usage: Usage | None = DEFAULT_USAGE,
    *,
    model: str = "gpt-standin",
    pieces: Sequence[str] | None = None,
    finish_reason: str = "stop",
) -> list[bytes]:
    """A streamed text answer: role chunk, one chunk per piece (words by default), the
    finish chunk, the usage chunk (``include_usage``), ``[DONE]``."""
    parts = list(pieces) if pieces is not None else words(text)
    out = [openai_chunk({"role": "assistant", "content": "", "refusal": None}, model=model)]
    out += [openai_chunk({"content": p}, model=model) for p in parts]
    return out + _openai_tail(finish_reason, usage, model)


def split_evenly(text: str, n: int) -> list[str]:
    """``text`` cut into ``n`` roughly equal pieces (mid-token, mid-string: on purpose)."""
    n = max(1, min(n, len(text) or 1))
    step = math.ceil(len(text) / n) if text else 1
    return [text[i : i + step] for i in range(0, len(text), step)] or [""]


def openai_tool_call_chunks(
    calls: Sequence[tuple[str, str, str]],
    *,
    text: str = "",
    usage: Usage | None = DEFAULT_USAGE,
    model: str = "gpt-standin",
    arg_pieces: int = 4,
) -> list[bytes]:
    """Tool calls streamed the hard way: per call ``(id, name, arguments_json_text)``, the
    id arrives alone in the first chunk, the name in the next, then the arguments cut into
    ``arg_pieces`` pieces (mid-JSON-string).  Optional ``text`` streams first."""
    out = [openai_chunk({"role": "assistant", "content": None}, model=model)]
    out += [openai_chunk({"content": p}, model=model) for p in words(text)]
    for index, (call_id, name, arguments) in enumerate(calls):
        out.append(
            openai_chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call_id,
                            "type": "function",
                            "function": {"arguments": ""},
                        }
                    ]
                },
                model=model,
            )
        )
        out.append(
            openai_chunk(
                {"tool_calls": [{"index": index, "function": {"name": name}}]}, model=model
            )
        )
        for piece in split_evenly(arguments, arg_pieces):
            out.append(
                openai_chunk(
                    {"tool_calls": [{"index": index, "function": {"arguments": piece}}]},
                    model=model,
                )
            )
    return out + _openai_tail("tool_calls", usage, model)


def openai_error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    code: str | None = None,
    retry_after: str | None = None,
) -> Status:
    """An OpenAI error answer (``{"error": {message, type, param, code}}``)."""
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return Status(status, body, headers)


def fake_embedding(text: str, dims: int = 4) -> list[float]:
    """A deterministic unit-ish vector for ``text``."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [round((digest[i] - 127.5) / 127.5, 6) for i in range(dims)]


# -- Anthropic wire helpers -----------------------------------------------------------------


def anthropic_event(kind: str, payload: dict[str, Any]) -> bytes:
    """One Messages-API SSE event: ``event: <kind>`` then its JSON ``data``."""
    data = json.dumps({"type": kind, **payload}, ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


def _anthropic_head(usage: Usage | None, model: str) -> list[bytes]:
    return [
        anthropic_event(
            "message_start",
            {
                "message": {
                    "id": "msg_standin0001",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": usage.input if usage else 0, "output_tokens": 1},
                }
            },
        ),
        anthropic_event("ping", {}),
    ]


def _anthropic_text_block(index: int, text: str) -> list[bytes]:
    out = [
        anthropic_event(
            "content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}}
        )
    ]
    out += [
        anthropic_event(
            "content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": w}}
        )
        for w in words(text)
    ]
    out.append(anthropic_event("content_block_stop", {"index": index}))
    return out


def _anthropic_tail(stop_reason: str, usage: Usage | None) -> list[bytes]:
    return [
        anthropic_event(
            "message_delta",
            {
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": usage.output if usage else 0},
            },
        ),
        anthropic_event("message_stop", {}),
    ]


def anthropic_text_events(
    text: str,
    usage: Usage | None = DEFAULT_USAGE,
    *,
    model: str = "claude-standin",
    stop_reason: str = "end_turn",
) -> list[bytes]:
    """A streamed text answer: message_start, ping, one text block (a delta per word),
    message_delta with the stop reason and output tokens, message_stop."""
    return (
        _anthropic_head(usage, model)
        + _anthropic_text_block(0, text)
        + _anthropic_tail(stop_reason, usage)
    )


def anthropic_tool_use_events(
    calls: Sequence[tuple[str, str, str]],
    *,
    text: str = "",
    usage: Usage | None = DEFAULT_USAGE,
    model: str = "claude-standin",
    json_pieces: int = 4,
) -> list[bytes]:
    """Tool use streamed as the API does: per call ``(id, name, input_json_text)`` a
    tool_use block whose input arrives as ``input_json_delta`` pieces; optional text first."""
    out = _anthropic_head(usage, model)
    index = 0
    if text:
        out += _anthropic_text_block(0, text)
        index = 1
    for call_id, name, arguments in calls:
        out.append(
            anthropic_event(
                "content_block_start",
                {
                    "index": index,
                    "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
                },
            )
        )
        for piece in [""] + split_evenly(arguments, json_pieces):
            out.append(
                anthropic_event(
                    "content_block_delta",
                    {"index": index, "delta": {"type": "input_json_delta", "partial_json": piece}},
                )
            )
        out.append(anthropic_event("content_block_stop", {"index": index}))
        index += 1
    return out + _anthropic_tail("tool_use", usage)


def anthropic_error_event(kind: str, message: str) -> bytes:
    """The ``error`` event the API sends mid-stream (e.g. ``overloaded_error``)."""
    return anthropic_event("error", {"error": {"type": kind, "message": message}})


def anthropic_error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    retry_after: str | None = None,
) -> Status:
    """An Anthropic error answer (``{"type": "error", "error": {type, message}}``)."""
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return Status(status, {"type": "error", "error": {"type": kind, "message": message}}, headers)
