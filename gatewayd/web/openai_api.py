"""The OpenAI-compatible API under ``/v1/`` (CONTRACT §7), for the official SDKs unchanged.

A thin adapter, like every transport: the bearer token is the API key, a request's
conversation becomes one run of the core run manager (:mod:`gatewayd.ops.openai`), and the
run's events come back as ``chat.completion`` objects, ``chat.completion.chunk`` lines or
Responses API events.  A plain leaf resource in front of Klein: it owns the whole ``/v1``
prefix so that every answer under it, 404s included, is in OpenAI's error shape, and it
writes streams itself.

Runs belong to the run manager, never to the connection (DESIGN trap 11): a client that
goes away loses its own waiter and its own event listener, and the run goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from gatewayd import jsontext
from gatewayd.agent.base import ProviderError
from gatewayd.auth import Principal
from gatewayd.config import body_limit_for
from gatewayd.errors import GatewayError, openai_error_body
from gatewayd.events import Event
from gatewayd.ops.openai import (
    Conversation,
    bad,
    chat_conversation,
    check_session_id,
    model_ids,
    resolve_model,
    responses_conversation,
    session_of_response,
    start_run,
)
from gatewayd.runs import LiveRun
from gatewayd.store.records import FINAL_RUN_STATES
from gatewayd.streams import StreamHandle
from gatewayd.web.common import authenticate, bearer
from gatewayd.web.openai_shapes import (
    FINGERPRINT,
    ChatStream,
    Exchange,
    ResponseShape,
    ResponseStream,
    StreamOut,
    as_base64,
    chat_usage,
    completion_id,
    render_openai_error,
    run_error,
    run_headers,
)

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()
__all__ = ["OpenAIResource", "mount", "openai_error_body", "render_openai_error", "waits_for_run"]

PREFIX = b"/v1/"
MAX_EMBEDDING_INPUTS = 2048
#: method and path template of every route, for the OpenAPI document and metrics labels
ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
)


def waits_for_run(method: bytes, path: bytes) -> bool:
    """Whether ``request_timeout_s`` must spare this request (CONTRACT §5, §8).

    Every POST under ``/v1/`` either streams or waits for a run (or the provider), bounded
    by the run's own limits; whether a body says ``stream`` is only known once it is read.
    """
    return method == b"POST" and path.startswith(PREFIX)


def route_template(path: bytes) -> str | None:
    """The route template a ``/v1`` path belongs to (None when it is no route)."""
    if path.startswith(b"/v1/models/") and len(path) > len(b"/v1/models/"):
        return "/v1/models/{model}"
    text = path.decode("latin-1")
    return text if any(text == t for _, t in ROUTES) else None


# -- the resource ----------------------------------------------------------------------------

Handler = Callable[["Exchange", Principal, dict[str, Any], str], Coroutine[Any, Any, None]]


class OpenAIResource(Resource):
    """``/v1/*``; every other path goes to ``fallback`` (the Klein app)."""

    isLeaf = True

    def __init__(self, gw: Gateway, fallback: IResource) -> None:
        super().__init__()
        self._gw = gw
        self._fallback = fallback
        self._posts: dict[bytes, Handler] = {
            b"/v1/chat/completions": self._chat_completions,
            b"/v1/responses": self._responses,
            b"/v1/embeddings": self._embeddings,
        }

    def render(self, request: IRequest) -> bytes | int:
        path = request.path
        if not (path.startswith(PREFIX) or path == b"/v1"):
            return self._fallback.render(request)  # type: ignore[no-any-return]
        ex = Exchange(cast(Request, request))
        d = ensureDeferred(self._handle(ex))
        d.addErrback(self._failed, ex)
        return NOT_DONE_YET

    async def _handle(self, ex: Exchange) -> None:
        request = ex.request
        method, path = request.method, request.path
        handler: Handler | None = None
        arg = ""
        if path in self._posts:
            allowed, handler = "POST", self._posts[path]
        elif path == b"/v1/models":
            allowed, handler = "GET, HEAD", self._list_models
        elif path.startswith(b"/v1/models/") and len(path) > len(b"/v1/models/"):
            allowed, handler = "GET, HEAD", self._retrieve_model
            arg = unquote(path[len(b"/v1/models/") :].decode("latin-1"))
        else:
            shown = path.decode("utf-8", "replace")
            raise GatewayError("not_found", f"Invalid URL ({method.decode('latin-1')} {shown})")
        if method.decode("latin-1") not in allowed.split(", "):
            raise GatewayError(
                "method_not_allowed",
                f"{path.decode('latin-1')} does not serve {method.decode('latin-1')}",
                data={"allow": allowed},
            )
        principal = self._principal(request)
        body = self._body(request) if method == b"POST" else {}
        await handler(ex, principal, body, arg)

    def _failed(self, failure: Failure, ex: Exchange) -> None:
        if failure.check(CancelledError) or not ex.open:
            return  # the client went away; nothing to write
        if failure.check(GatewayError):
            error: GatewayError = failure.value  # type: ignore[assignment]
        elif failure.check(ProviderError):
            error = _provider_error(failure.value)  # type: ignore[arg-type]
        else:
            _log.failure("unexpected error in the OpenAI-compatible API", failure)
            error = GatewayError("internal", "The server had an error processing your request.")
        request = ex.request
        if request.startedWriting:
            ex.finish()  # a stream that already began ends; its handler wrote the error
            return
        ex.finish(render_openai_error(request, error))

    def _principal(self, request: IRequest) -> Principal:
        principal = authenticate(self._gw, request)
        if principal is None:
            if bearer(request) is None:
                message = (
                    "You didn't provide an API key. You need to provide your API key in an "
                    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                )
            else:
                message = "Incorrect API key provided."
            raise GatewayError("unauthorized", message)
        if not principal.can("chat"):
            raise GatewayError(
                "forbidden",
                "You have insufficient permissions for this operation: the chat scope is needed.",
            )
        return principal

    def _body(self, request: IRequest) -> dict[str, Any]:
        content = request.content
        raw = content.read() if content is not None else b""
        limit = body_limit_for(self._gw.config.gateway, request.path.decode("latin-1"))
        if len(raw) > limit:
            raise GatewayError("payload_too_large", f"The request body is over {limit} bytes.")
        try:
            body = jsontext.loads(raw)
        except jsontext.InvalidJSON as e:
            raise bad(f"We could not parse the JSON body of your request: {e.msg}") from None
        if not isinstance(body, dict):
            raise bad("The request body must be a JSON object.")
        return body

    # -- models ----------------------------------------------------------------------------

    def _model(self, model_id: str) -> dict[str, Any]:
        gw = self._gw
        owner = gw.provider.name if model_id == gw.config.agent.effective_model else "gatewayd"
        return {
            "id": model_id,
            "object": "model",
            "created": int(gw.started_at),
            "owned_by": owner,
        }

    async def _list_models(self, ex: Exchange, p: Principal, b: dict[str, Any], _: str) -> None:
        ex.json(200, {"object": "list", "data": [self._model(m) for m in model_ids(self._gw)]})

    async def _retrieve_model(
        self, ex: Exchange, p: Principal, b: dict[str, Any], model: str
    ) -> None:
        resolve_model(self._gw, model)
        ex.json(200, self._model(model))

    # -- embeddings ------------------------------------------------------------------------

    async def _embeddings(
        self, ex: Exchange, principal: Principal, body: dict[str, Any], _: str
    ) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad("model: a model id (string) is required", "model")
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(i, str) and i for i in inputs)
        ):
            raise bad(
                "input: expected a non-empty string or array of non-empty strings "
                "(token arrays are not supported)",
                "input",
            )
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise bad(f"input: at most {MAX_EMBEDDING_INPUTS} inputs", "input")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64", None):
            raise bad("encoding_format: must be float or base64", "encoding_format")
        try:
            result = await ex.wait(self._gw.provider.embeddings(model, inputs))
        except ProviderError as e:
            raise _provider_error(e) from None
        if encoding == "base64":
            result = as_base64(result)
        ex.json(200, result)

    # -- chat completions ------------------------------------------------------------------

    async def _chat_completions(
        self, ex: Exchange, principal: Principal, body: dict[str, Any], _: str
    ) -> None:
        gw = self._gw
        agent_id = resolve_model(gw, body.get("model"))
        model: str = body["model"]
        convo = chat_conversation(body.get("messages"))
        n = body.get("n")
        if n is not None and n != 1:
            raise bad("n: only n = 1 is supported", "n")
        stream = _flag(body, "stream")
        include_usage = stream and _include_usage(body)
        session_id = check_session_id(_header(ex.request, b"x-session-id"))
        if stream:
            chat = ChatStream(ex, model, include_usage)
            await self._stream(ex, principal, convo, session_id, agent_id, chat)
            return
        live = await start_run(gw, principal, convo, session_id=session_id, agent_id=agent_id)
        run = await ex.wait(gw.runs.wait(live.run.id))
        if run.status != "completed":
            raise run_error(run)
        run_headers(ex.request, run)
        ex.json(
            200,
            {
                "id": completion_id(run.id),
                "object": "chat.completion",
                "created": int(run.created_at),
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": run.response or "",
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": chat_usage(run),
                "service_tier": "default",
            },
        )

    # -- responses -------------------------------------------------------------------------

    async def _responses(
        self, ex: Exchange, principal: Principal, body: dict[str, Any], _: str
    ) -> None:
        gw = self._gw
        agent_id = resolve_model(gw, body.get("model"))
        model: str = body["model"]
        convo = responses_conversation(body.get("input"), body.get("instructions"))
        stream = _flag(body, "stream")
        session_id = check_session_id(_header(ex.request, b"x-session-id"))
        previous = body.get("previous_response_id")
        if previous is not None:
            session_id = await session_of_response(gw, principal, previous)
        metadata = body.get("metadata")
        shape = ResponseShape(
            model=model,
            instructions=body.get("instructions"),
            previous=previous,
            metadata=metadata if isinstance(metadata, dict) else {},
        )
        if stream:
            await self._stream(
                ex, principal, convo, session_id, agent_id, ResponseStream(ex, shape)
            )
            return
        live = await start_run(gw, principal, convo, session_id=session_id, agent_id=agent_id)
        run = await ex.wait(gw.runs.wait(live.run.id))
        if run.status != "completed":
            raise run_error(run)
        run_headers(ex.request, run)
        shape.start(run)
        ex.json(200, shape.response("completed", run.response or "", run))

    # -- streaming, for both -----------------------------------------------------------------

    async def _stream(
        self,
        ex: Exchange,
        principal: Principal,
        convo: Conversation,
        session_id: str | None,
        agent_id: str,
        out: StreamOut,
    ) -> None:
        """Run the turn and stream it: headers once the run is queued, deltas as they come,
        the end when the run's own waiter fires (after its last delta)."""
        gw = self._gw
        keepalive: Any = None

        def release() -> None:
            nonlocal keepalive
            handle.release()
            if keepalive is not None and keepalive.active():
                keepalive.cancel()
            keepalive = None

        def closed_by_gateway(reason: str) -> None:
            """Token revoked or shutdown: end this stream now (the run goes on)."""
            out.close(reason)
            release()

        handle: StreamHandle = gw.streams.open(principal, "sse", close=closed_by_gateway)

        ex.on_gone(release)
        try:
            live = await start_run(
                gw,
                principal,
                convo,
                session_id=session_id,
                agent_id=agent_id,
                on_event=out.on_event,
            )
            if not ex.open:  # gone, or closed by the gateway, while the run was queued
                _unlisten(live, out.on_event)
                return
            waiter = ex.wait(gw.runs.wait(live.run.id))
            run = live.run
            if run.status in FINAL_RUN_STATES and run.status != "completed":
                waiter.cancel()
                raise run_error(run)  # e.g. budget_exceeded: still a plain 429
            ex.on_gone(lambda: _unlisten(live, out.on_event))
            run_headers(ex.request, run)
            ex.start_stream()
            out.begin(run)
            interval = gw.config.gateway.sse_keepalive_s

            def keep_alive() -> None:
                nonlocal keepalive
                ex.write(b": keep-alive\n\n")
                keepalive = gw.clock.callLater(interval, keep_alive) if ex.open else None

            keepalive = gw.clock.callLater(interval, keep_alive)
            run = await waiter
            _unlisten(live, out.on_event)
            out.end(run)
        finally:
            release()


def _unlisten(live: LiveRun, listener: Callable[[Event], None]) -> None:
    if listener in live.listeners:
        live.listeners.remove(listener)


# -- small helpers --------------------------------------------------------------------------


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name}: expected a boolean", name)
    return value


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad("stream_options: expected an object", "stream_options")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise bad("stream_options.include_usage: expected a boolean", "stream_options")
    return value


def _provider_error(e: ProviderError) -> GatewayError:
    """Provider failures outside a run (embeddings) in the gateway's terms."""
    if e.code == "unsupported":
        return GatewayError(
            "invalid_request",
            f"Embeddings are not available: {e.message}",
            data={"openai_code": "unsupported"},
        )
    status = getattr(e, "status", None)
    if status in (400, 404, 429):
        code = {400: "invalid_request", 404: "model_not_found", 429: "rate_limited"}[status]
        return GatewayError(code, e.message)
    return GatewayError("upstream_error", e.message, 502)


def mount(gw: Gateway, app: IResource) -> IResource:
    """The resource that serves ``/v1/*`` and hands every other path to ``app``."""
    return OpenAIResource(gw, app)
