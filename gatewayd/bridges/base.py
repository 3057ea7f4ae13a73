"""What every bridge shares: counters, the allow list, sessions, runs and background work.

A bridge is a Twisted service. Inbound, it authenticates a platform's request by signature,
keeps one session per conversation (``<bridge>:<conversation>``, owned by the bridge's own
principal) and starts a run with ``channel = "<bridge>:<target>"``; the run's answer comes
back through :meth:`BaseBridge.deliver_run`, called by the manager when the run ends — so a
chat message, a wake, a hook, a cron job and a heartbeat all reply the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from gatewayd.auth import Principal, new_id
from gatewayd.bridges.http import DeliveryError, Response, scrub
from gatewayd.errors import GatewayError, invalid
from gatewayd.runs import shielded
from gatewayd.store.records import Run

if TYPE_CHECKING:
    from gatewayd.bridges import BridgeManager
    from gatewayd.runs import LiveRun

_log = Logger()
T = TypeVar("T")

REFUSAL = "Sorry, you are not allowed to talk to this bot."
BUSY = "Sorry, I cannot take this message right now"
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def chunks(text: str, limit: int) -> list[str]:
    """Split ``text`` into pieces of at most ``limit`` characters, at line ends when possible."""
    out: list[str] = []
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit)
        if cut <= 0:
            cut = limit
        out.append(text[:cut])
        text = text[cut:].lstrip("\n")
    if text or not out:
        out.append(text)
    return out


def session_key(bridge: str, conversation: str) -> str:
    """A valid, deterministic session id for one conversation of one bridge."""
    safe = _ID_UNSAFE.sub("_", conversation)
    if safe != conversation or len(safe) > 96:
        digest = hashlib.sha256(conversation.encode("utf-8", "surrogateescape")).hexdigest()
        safe = f"{safe[:80]}-{digest[:12]}"
    return f"{bridge}:{safe}"


def answer_text(run: Run) -> str | None:
    """What a finished run says on its channel; None for aborted runs and empty answers."""
    if run.status == "completed":
        return run.response or None
    if run.status == "failed":
        return f"Sorry, that did not work: {run.error or 'the run failed'}"
    return None


# -- HTTP in -------------------------------------------------------------------------------------


def read_body(request: IRequest) -> bytes:
    """The raw body exactly as received."""
    body = request.content
    if body is None:
        return b""
    body.seek(0)
    data: bytes = body.read()
    return data


def reply_json(request: IRequest, status: int, obj: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def reply_error(request: IRequest, error: GatewayError) -> bytes:
    """The contract's error shape, without a ``WWW-Authenticate: Bearer`` (no token helps)."""
    if error.retry_after is not None or error.status == 429:
        request.setHeader(b"retry-after", str(max(1, error.retry_after or 1)).encode())
    return reply_json(request, error.status, error.to_json())


def json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise invalid("the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise invalid("the body must be a JSON object")
    return doc


# -- the bridge ----------------------------------------------------------------------------------


@attrs.define
class ChannelStats:
    received: int = 0
    sent: int = 0
    errors: int = 0
    last_error: str | None = None


Handler = Callable[[IRequest], Any]


class BaseBridge(Service):
    """A bridge service; subclasses set :attr:`kind` and implement :meth:`_send`."""

    kind: ClassVar[str] = ""
    #: the most characters one platform message may carry
    max_message: ClassVar[int] = 4000
    #: whether people write to it (and ``allowed_users`` applies); not so the outbound webhook
    has_users: ClassVar[bool] = True

    def __init__(
        self,
        manager: BridgeManager,
        *,
        default_target: str = "",
        allowed_users: Sequence[str] = (),
        tools: Sequence[str] = (),
        secrets: Sequence[str] = (),
    ) -> None:
        self.manager = manager
        self.gw = manager.gw
        self.setName(self.kind)
        self.default_target = default_target
        self.allowed_users = frozenset(allowed_users)
        self.tools = tuple(t for t in tools if t and t != "none")
        #: scrubbed from every error text this bridge produces
        self.secrets = tuple(s for s in secrets if s)
        self.stats = ChannelStats()
        self.principal = Principal(
            token_id=f"bridge:{self.kind}", role="operator", name=self.kind, kind="bridge"
        )
        self.stopping = False
        self._tasks: set[Deferred[Any]] = set()
        self._sleeps: set[Deferred[Any]] = set()
        #: conversations whose natural session id was taken by someone else (rare)
        self._sessions: dict[str, str] = {}
        #: per-run reply details (Discord interaction tokens, IRC nicks), by run id
        self.reply_context: dict[str, Any] = {}

    # -- life --------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return "running" if self.running else "stopped"

    def startService(self) -> None:
        self.stopping = False
        super().startService()
        if self.has_users and not self.allowed_users:
            _log.warn(
                "bridge {bridge}: allowed_users is empty, so nobody may talk to it "
                '(use ["*"] for everyone)',
                bridge=self.kind,
            )

    def begin_stop(self) -> None:
        """First phase of stopping: no more retries; pending sleeps end at once."""
        self.stopping = True
        for d in list(self._sleeps):
            d.cancel()

    def stopService(self) -> Deferred[None]:
        self.begin_stop()
        super().stopService()
        tasks = list(self._tasks)
        done: Deferred[None] = DeferredList(tasks, consumeErrors=True).addCallback(lambda _: None)
        return done

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str = "task") -> Deferred[Any]:
        """Run ``coro`` in the background; failures are logged, and stopping waits for it."""
        d: Deferred[Any] = ensureDeferred(coro)
        self._tasks.add(d)

        def done(result: Any) -> None:
            self._tasks.discard(d)
            if isinstance(result, Failure):
                if result.check(DeliveryError, GatewayError):
                    _log.warn(
                        "bridge {bridge}: {what} failed: {error}",
                        bridge=self.kind,
                        what=what,
                        error=str(result.value),
                    )
                else:
                    _log.failure(
                        "bridge {bridge}: {what} failed", result, bridge=self.kind, what=what
                    )

        d.addBoth(done)
        return d

    def sleep(self, seconds: float) -> Deferred[None]:
        """A delay on the gateway's clock that stopping cancels (CancelledError)."""
        d: Deferred[None] = deferLater(self.gw.clock, seconds, lambda: None)
        self._sleeps.add(d)

        def forget(result: Any) -> Any:
            self._sleeps.discard(d)
            return result

        d.addBoth(forget)
        return d

    # -- counters ----------------------------------------------------------------------------

    def count(self, result: str) -> None:
        """One inbound delivery for ``gatewayd_webhooks_total{hook=<bridge>, result}``."""
        metrics = getattr(self.gw, "metrics", None)
        if metrics is not None:
            metrics.webhook(self.kind, result)

    def rejected(self, error: GatewayError) -> None:
        self.note_error(f"inbound: {error.code}")
        self.count(error.code)

    def note_received(self) -> None:
        self.stats.received += 1
        self.gw.bus.publish("channel_event", channel=self.kind, direction="in")

    def note_sent(self) -> None:
        self.stats.sent += 1
        self.gw.bus.publish("channel_event", channel=self.kind, direction="out")

    def note_error(self, message: str) -> None:
        self.stats.errors += 1
        self.stats.last_error = scrub(message, self.secrets)[:300]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.kind,
            "state": self.state,
            "received": self.stats.received,
            "sent": self.stats.sent,
            "errors": self.stats.errors,
            "last_error": self.stats.last_error,
        }

    # -- inbound -----------------------------------------------------------------------------

    #: the public path an inbound bridge answers (POST), authenticated by signature
    path: ClassVar[str] = ""

    def routes(self) -> dict[str, Handler]:
        """Public HTTP paths this bridge answers (POST), authenticated by signature."""
        return {self.path: self.handle} if self.path else {}

    def handle(self, request: IRequest) -> Deferred[bytes]:
        """An inbound delivery; shielded, so a sender that hangs up never cuts a run short."""
        return shielded(ensureDeferred(self._handle(request)))

    async def _handle(self, request: IRequest) -> bytes:
        raise NotImplementedError(f"{self.kind} has no inbound path")

    def is_allowed(self, *user_ids: str | None) -> bool:
        if "*" in self.allowed_users:
            return True
        return any(u and u in self.allowed_users for u in user_ids)

    def refuse(self, target: str) -> None:
        """Tell a user who is not on the allow list, and start nothing."""
        self.spawn(self.send(target, REFUSAL), "refusal")

    async def session_for(self, conversation: str) -> str:
        """The conversation's session: ``<bridge>:<conversation>``, never someone else's.

        Should a token have made a session with that id first, the bridge does not join it
        (its owner could read the chat); it uses a fresh id for the conversation instead.
        """
        sid = self._sessions.get(conversation)
        if sid is not None:
            return sid
        sid = session_key(self.kind, conversation)
        existing = await self.gw.store.get_session(sid)
        if existing is not None and existing.owner != self.principal.token_id:
            _log.warn(
                "bridge {bridge}: session {sid} belongs to another owner; using a new one",
                bridge=self.kind,
                sid=sid,
            )
            sid = self._sessions[conversation] = f"{sid[:100]}:{new_id('b')}"
        return sid

    async def start_run(
        self, conversation: str, text: str, *, target: str, context: Any = None
    ) -> LiveRun:
        """Start a run for one inbound message; its answer goes back to ``target``.

        ``context`` (an interaction token, a nick to address) is filed under the run's id at
        its first event — before the run can end, even when it ends within ``submit``.
        """
        sid = await self.session_for(conversation)
        on_event = None
        if context is not None:

            def on_event(event: Any) -> None:
                if event.run_id and event.type in ("run_started", "run_error", "run_aborted"):
                    self.reply_context.setdefault(event.run_id, context)

        live: LiveRun = await self.gw.runs.submit(
            self.principal,
            text,
            session_id=sid,
            source="bridge",
            channel=f"{self.kind}:{target}",
            allow_tool_commands=False,
            tools_allowed=self.tools,
            on_event=on_event,
        )
        return live

    # -- outbound ----------------------------------------------------------------------------

    async def send(self, target: str, text: str, run: Run | None = None) -> str:
        """Deliver ``text`` to ``target``: "sent", or "queued" when it is being retried."""
        try:
            status = await self._send(target, text, run)
        except DeliveryError as e:
            self.note_error(str(e))
            raise
        if status == "sent":
            self.note_sent()
        return status

    async def _send(self, target: str, text: str, run: Run | None) -> str:
        raise NotImplementedError

    async def deliver_run(self, run: Run, target: str, text: str) -> None:
        await self.send(target, text, run)

    async def post_json(
        self,
        url: str,
        payload: Any,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        secrets: Sequence[str] = (),
    ) -> Response:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        all_headers = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        return await self.manager.http.post(
            url, body, all_headers, what=what, secrets=(*self.secrets, *secrets)
        )
