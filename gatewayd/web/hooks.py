"""``POST /hooks/<name>``: signed deliveries from other systems become agent runs (CONTRACT §9).

The raw body is verified exactly as received (:mod:`gatewayd.webhooks`), then the delivery
id is claimed in the store's replay cache in one atomic call — so a replay is answered 200
``duplicate`` and starts nothing, before and after a restart. The prompt comes from a
template that only substitutes (``{{body}}`` and ``{{a.b}}`` JSON fields, in one pass), so
nothing a sender writes is ever evaluated. Hook runs belong to the hook's own principal,
may use only the hook's listed tools and never honour ``/tool`` commands.

This module also mounts the bridges' public routes (``/bridges/...``) on the Klein app.
"""

from __future__ import annotations

import json
import re
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from gatewayd.auth import Principal, new_id
from gatewayd.bridges.base import read_body, reply_error, reply_json
from gatewayd.bridges.records import (
    claim_delivery,
    delivery_key,
    release_delivery,
    set_delivery_run,
)
from gatewayd.config import Config, ConfigError, WebhookConfig, body_limit_for
from gatewayd.errors import GatewayError, not_found
from gatewayd.runs import shielded
from gatewayd.webhooks import check_scheme, verify

if TYPE_CHECKING:
    from gatewayd.bridges import BridgeManager
    from gatewayd.core import Gateway

__all__ = [
    "HookReceiver",
    "check_hooks",
    "hook_body_limit",
    "mount",
    "receiver_for",
    "render_prompt",
]

_log = Logger()
PREFIX = "/hooks/"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)\s*\}\}")
_NO_JSON = object()


# -- configuration -------------------------------------------------------------------------------


def hook_body_limit(config: Config, path: str) -> int | None:
    """A hook's own ``body_limit_bytes`` for a request path, or None to use the prefix table.

    For the edge limits: ``hook_body_limit(config, "/hooks/github")`` → 5242880 when
    ``[webhooks.github] body_limit_bytes = 5242880``; any other path, or a hook without its
    own limit, → None.
    """
    if not path.startswith(PREFIX):
        return None
    name = path[len(PREFIX) :].split("/", 1)[0].split("?", 1)[0]
    hook = config.webhooks.get(name)
    if hook is None or not hook.body_limit_bytes:
        return None
    return hook.body_limit_bytes


def check_hooks(config: Config, manager: BridgeManager) -> None:
    """Refuse hooks that could never work: bad scheme settings, unknown channels."""
    for name, hook in config.webhooks.items():
        try:
            check_scheme(hook.scheme, hook.secret, hook.algorithm)
        except ValueError as e:
            raise ConfigError(f"webhooks.{name}: {e}") from None
        if hook.channel:
            try:
                manager.check_channel(hook.channel)
            except GatewayError as e:
                raise ConfigError(f"webhooks.{name}.channel: {e.message}") from None


# -- the prompt template -------------------------------------------------------------------------


def render_prompt(template: str, body: bytes) -> str:
    """Fill ``{{body}}`` (the raw body as UTF-8) and ``{{a.b}}`` (JSON fields, "" if absent).

    One pass of plain substitution: text that comes from the body is never looked at again,
    and nothing but those two forms is recognised.
    """
    text: str | None = None
    doc: Any = _NO_JSON

    def fill(m: re.Match[str]) -> str:
        nonlocal text, doc
        path = m.group(1)
        if path == "body":
            if text is None:
                text = body.decode("utf-8", "replace")
            return text
        if doc is _NO_JSON:
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):
                doc = None
        return _field(doc, path.split("."))

    return _PLACEHOLDER.sub(fill, template)


def _field(doc: Any, path: list[str]) -> str:
    for key in path:
        if isinstance(doc, dict):
            doc = doc.get(key)
        elif isinstance(doc, list) and key.isdigit() and int(key) < len(doc):
            doc = doc[int(key)]
        else:
            return ""
    if doc is None:
        return ""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, bool):
        return "true" if doc else "false"
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


# -- the route -----------------------------------------------------------------------------------


class HookReceiver:
    """Handles ``POST /hooks/<name>`` for one gateway and counts what happened.

    :attr:`results` counts deliveries by ``(hook, result)``, result being ``accepted``,
    ``duplicate``, ``missing_signature``, ``invalid_signature``, ``stale_signature``,
    ``payload_too_large`` or the code of an error that kept the run from starting — the
    ``gatewayd_webhooks_total{hook,result}`` metric reads it.
    """

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.results: Counter[tuple[str, str]] = Counter()

    def _count(self, hook: str, result: str) -> None:
        self.results[(hook, result)] += 1
        metrics = getattr(self.gw, "metrics", None)
        if metrics is not None:
            metrics.webhook(hook, result)

    def principal(self, name: str) -> Principal:
        return Principal(token_id=f"hook:{name}", role="operator", name=name, kind="hook")

    def handle(self, request: IRequest, name: str) -> Deferred[bytes]:
        return shielded(ensureDeferred(self._handle(request, name)))

    async def _handle(self, request: IRequest, name: str) -> bytes:
        hook = self.gw.config.webhooks.get(name)
        if hook is None:
            return reply_error(request, not_found("no such hook"))
        body = read_body(request)
        limit = hook.body_limit_bytes or body_limit_for(self.gw.config.gateway, PREFIX)
        if len(body) > limit:
            self._count(name, "payload_too_large")
            return reply_error(
                request, GatewayError("payload_too_large", f"the body is over {limit} bytes")
            )
        try:
            verified = verify(
                hook.scheme,
                hook.secret,
                request.requestHeaders,
                body,
                now=self.gw.clock.seconds(),
                max_age_s=hook.max_age_s,
                algorithm=hook.algorithm,
            )
        except GatewayError as e:
            self._count(name, e.code)
            return reply_error(request, e)
        except ValueError as e:  # a configuration that check_hooks would have refused
            _log.error("hook {hook} is misconfigured: {why}", hook=name, why=str(e))
            self._count(name, "internal")
            return reply_error(request, GatewayError("internal", "the hook is misconfigured"))
        delivery_id = delivery_key(verified.delivery_id) if verified.delivery_id else new_id("dlv")
        store = self.gw.store
        if not await claim_delivery(store, name, delivery_id, self.gw.clock.seconds()):
            self._count(name, "duplicate")
            return reply_json(request, 200, {"status": "duplicate", "delivery_id": delivery_id})
        try:
            live = await self._start(name, hook, render_prompt(self._template(name, hook), body))
        except Exception as e:
            await release_delivery(store, name, delivery_id)
            error = e if isinstance(e, GatewayError) else GatewayError("internal", "internal error")
            if not isinstance(e, GatewayError):
                _log.failure("hook {hook}: could not start its run", hook=name)
            self._count(name, error.code)
            return reply_error(request, error)
        run = live.run
        await set_delivery_run(store, name, delivery_id, run.id)
        self.gw.bus.publish(
            "webhook_received",
            session_id=run.session_id,
            run_id=run.id,
            owner=run.owner,
            hook=name,
            delivery_id=delivery_id,
        )
        self._count(name, "accepted")
        return reply_json(
            request,
            202,
            {
                "status": "accepted",
                "run_id": run.id,
                "session_id": run.session_id,
                "delivery_id": delivery_id,
            },
        )

    @staticmethod
    def _template(name: str, hook: WebhookConfig) -> str:
        return hook.prompt or f"Webhook {name}:\n" + "{{body}}"

    async def _start(self, name: str, hook: WebhookConfig, prompt: str) -> Any:
        principal = self.principal(name)
        session_id = hook.session_id or None
        if session_id:
            existing = await self.gw.store.get_session(session_id)
            if existing is not None and existing.owner != principal.token_id:
                _log.warn(
                    "hook {hook}: session {sid} belongs to another owner; using a new one",
                    hook=name,
                    sid=session_id,
                )
                session_id = None
        if not prompt.strip():
            prompt = f"Webhook {name}: (empty body)"
        return await self.gw.runs.submit(
            principal,
            prompt,
            session_id=session_id,
            source="hook",
            channel=hook.channel,
            allow_tool_commands=False,
            tools_allowed=tuple(t for t in hook.tools if t != "none"),
        )


_RECEIVERS: weakref.WeakKeyDictionary[Any, HookReceiver] = weakref.WeakKeyDictionary()


def receiver_for(gw: Gateway) -> HookReceiver:
    """The gateway's hook receiver (its :attr:`HookReceiver.results` feed the metrics)."""
    receiver = _RECEIVERS.get(gw)
    if receiver is None:
        receiver = _RECEIVERS[gw] = HookReceiver(gw)
    return receiver


def mount(gw: Gateway, app: Klein) -> None:
    """Add ``POST /hooks/<name>`` and the configured bridges' routes (all public)."""
    from gatewayd.bridges import manager_for

    receiver = receiver_for(gw)

    @app.route("/hooks/<name>", methods=["POST"], branch=False, endpoint="POST /hooks/<name>")
    def hook(request: IRequest, name: str) -> Deferred[bytes]:
        return receiver.handle(request, name)

    for path, handler in manager_for(gw).routes().items():
        app.route(path, methods=["POST"], branch=False, endpoint=f"POST {path}")(
            lambda request, _handler=handler: _handler(request)
        )
