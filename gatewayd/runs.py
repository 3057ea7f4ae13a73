"""The run manager: one run per session at a time, in arrival order, apart from any client.

``submit`` stores the user message (and the queued run) before the run can start, then
queues it behind the session's earlier runs; a global cap bounds how many run at once.
Each run belongs to the manager, never to the connection that asked for it: waiters get
their own Deferreds (DESIGN trap 11), so a client that goes away stops only its own wait.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.logger import Logger

from gatewayd.agent.base import ChatMessage, ProviderError, ProviderRequest, ToolCall, ToolResult
from gatewayd.agent.early import EarlyTurn
from gatewayd.agent.tools import run_tool
from gatewayd.auth import Principal, new_id
from gatewayd.errors import GatewayError, not_found
from gatewayd.store.records import Run, Session

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()
T = TypeVar("T")


@attrs.define(eq=False)
class LiveRun:
    run: Run
    session: Session
    allow_tool_commands: bool = False
    #: tools this run may use; None means every registered tool (subject to policy)
    tools_allowed: tuple[str, ...] | None = None
    partial: list[str] = attrs.field(factory=list)
    waiters: list[Deferred[Run]] = attrs.field(factory=list)
    current: Deferred[Any] | None = None
    #: per-run listeners (streaming transports), called for each of this run's events
    listeners: list[Any] = attrs.field(factory=list)
    aborted: bool = False
    abort_reason: str = "aborted"
    #: the id of the run's own user message: later messages of the session are not its context
    message_id: int = 0
    message: str = ""
    fresh_session: bool = False
    #: extra system text for this run only (an OpenAI client's system messages); never stored
    instructions: str = ""
    #: a direct tool invocation (``tools.invoke``): this one call runs, no provider turn
    direct: ToolCall | None = None
    #: the direct invocation's result, once it has one
    tool_result: ToolResult | None = None
    #: a first provider turn started while the user message was being stored
    early: EarlyTurn | None = None


def shielded(inner: Deferred[T]) -> Deferred[T]:
    """A Deferred that follows ``inner`` but whose cancellation leaves ``inner`` alone."""
    outer: Deferred[T] = Deferred()

    def forward(result: Any) -> None:
        if not outer.called:
            outer.callback(result)

    inner.addBoth(forward)
    return outer


class RunManager:
    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._queues: dict[str, deque[LiveRun]] = {}
        self._running: dict[str, LiveRun] = {}
        self._ready: deque[str] = deque()
        self._live: dict[str, LiveRun] = {}
        self._submitting: dict[str, int] = {}
        self._creating: dict[str, str] = {}
        #: run slots held by early turns whose message is still being stored
        self._reserved = 0
        self._idle: list[Deferred[None]] = []
        self.accepting = True
        self._spend_day = ""
        self._spent = 0.0
        self._warned_day = ""

    # -- asking ----------------------------------------------------------------------------

    @property
    def active_count(self) -> int:
        return len(self._running)

    def live(self, run_id: str) -> LiveRun | None:
        return self._live.get(run_id)

    async def resolve_session(
        self, principal: Principal, session_id: str | None, agent_id: str = "", channel: str = ""
    ) -> tuple[Session, bool]:
        """The session to run in, and whether it must be created with the run."""
        gw = self._gw
        now = gw.clock.seconds()
        if session_id:
            existing = None
            if session_id not in self._creating:
                existing = await gw.store.get_session(session_id)
            # a concurrent submit may have started creating it while we looked
            owner = existing.owner if existing is not None else self._creating.get(session_id)
            if owner is not None:
                if not principal.owns(owner):
                    raise not_found("no such session")
                if existing is not None:
                    return existing, False
                return Session(session_id, owner, "", now, now, 0, agent_id, channel), False
        sid = session_id or new_id("ses")
        return Session(sid, principal.token_id, "", now, now, 0, agent_id, channel), True

    def submit(self, principal: Principal, message: str, **kw: Any) -> Deferred[LiveRun]:
        """Store the user message and queue a run; see :meth:`_submit` for the options.

        Cancelling the returned Deferred (a client that went away) stops only the caller's
        wait: the submission, once begun, completes and its run goes on (DESIGN trap 11).
        """
        return shielded(ensureDeferred(self._submit(principal, message, **kw)))

    async def _submit(
        self,
        principal: Principal,
        message: str,
        *,
        session_id: str | None = None,
        agent_id: str = "",
        source: str = "api",
        channel: str = "",
        allow_tool_commands: bool = True,
        tools_allowed: tuple[str, ...] | None = None,
        on_event: Any = None,
        context: Sequence[tuple[str, str]] = (),
        instructions: str = "",
        direct: ToolCall | None = None,
    ) -> LiveRun:
        """Queue a run of ``message``.

        ``context`` holds earlier ``(role, content)`` turns from clients that send the whole
        conversation (the OpenAI layer): they are stored before the user message when the
        session is new or empty, and ignored otherwise (its history is then the context).
        ``instructions`` is extra system text for this run only.  ``direct`` makes the run
        one tool call under its policy (``tools.invoke``) instead of an agent loop; it costs
        nothing, so the daily budget does not refuse it.
        """
        gw = self._gw
        if not self.accepting:
            raise GatewayError("unavailable", "the gateway is shutting down")
        session, create = await self.resolve_session(principal, session_id, agent_id, channel)
        sid = session.id
        if create:
            self._creating[sid] = session.owner
        queued = (
            self._submitting.get(sid, 0)
            + len(self._queues.get(sid, ()))
            + (1 if sid in self._running else 0)
        )
        if queued >= gw.config.agent.max_queue_per_session:
            if create:
                self._creating.pop(sid, None)
            raise GatewayError(
                "queue_full", "this session's queue is full; try again later", retry_after=1
            )
        now = gw.clock.seconds()
        run = Run(
            id=new_id("run"),
            session_id=sid,
            owner=session.owner,
            status="queued",
            created_at=now,
            source=source,
            channel=channel,
        )
        empty = create or (session.message_count == 0 and queued == 0)
        seed = tuple(context) if empty else ()
        self._submitting[sid] = self._submitting.get(sid, 0) + 1
        early = None
        if create and direct is None:
            convo = [ChatMessage(r, c) for r, c in seed if r in ("user", "assistant")]
            convo.append(ChatMessage("user", message))
            early = self._start_early(
                self._provider_request(convo, instructions, tools_allowed, allow_tool_commands)
            )
        try:
            stored = await gw.store.begin_run(
                run,
                message,
                now,
                create_session=session if create else None,
                context=seed,
            )
        except BaseException:
            if early is not None:
                early.drop()
            raise
        finally:
            if early is not None:
                self._reserved -= 1
            self._submitting[sid] -= 1
            if not self._submitting[sid]:
                del self._submitting[sid]
            if create:
                self._creating.pop(sid, None)
            self._check_idle()
        if create:
            gw.bus.publish("session_created", session_id=sid, owner=session.owner, title="")
        live = LiveRun(
            run,
            session,
            allow_tool_commands,
            tools_allowed,
            message_id=stored.id,
            message=message,
            fresh_session=create and not seed,
            instructions=instructions,
            direct=direct,
            early=early,
        )
        if on_event is not None:
            live.listeners.append(on_event)
        self._live[run.id] = live
        if direct is None and self._over_budget():
            await self._finish(
                live, "failed", error="the daily budget is spent", code="budget_exceeded"
            )
            return live
        self._queues.setdefault(sid, deque()).append(live)
        if sid not in self._running and sid not in self._ready:
            if early is not None:
                self._ready.appendleft(sid)  # its slot was held for it: it starts now
            else:
                self._ready.append(sid)
        self._pump()
        return live

    def _start_early(self, request: ProviderRequest) -> EarlyTurn | None:
        """Start a new session's first turn now, if a run slot is free to hold for it."""
        if (
            len(self._running) + self._reserved >= self._gw.config.agent.max_concurrent_runs
            or self._over_budget()
        ):
            return None
        early = EarlyTurn()
        try:
            early.deferred = self._gw.provider.turn(request, early.on_text)
        except Exception:  # a provider that raises instead of failing its Deferred
            _log.failure("could not start a turn early; the run will ask again")
            return None
        self._reserved += 1
        return early

    def _provider_request(
        self,
        convo: Sequence[ChatMessage],
        instructions: str,
        tools_allowed: tuple[str, ...] | None,
        allow_tool_commands: bool,
    ) -> ProviderRequest:
        agent = self._gw.config.agent
        return ProviderRequest(
            model=agent.effective_model,
            system=_join(agent.system_prompt, instructions),
            messages=tuple(convo),
            tools=self._gw.tools.specs(tools_allowed),
            allow_tool_commands=allow_tool_commands,
        )

    def wait(self, run_id: str) -> Deferred[Run]:
        """A Deferred of this waiter's own: cancelling it never touches the run."""
        live = self._live.get(run_id)
        if live is None:
            d: Deferred[Run] = ensureDeferred(self._stored(run_id))
            return d

        def forget(d: Deferred[Run]) -> None:
            if d in live.waiters:
                live.waiters.remove(d)

        waiter: Deferred[Run] = Deferred(forget)
        live.waiters.append(waiter)
        return waiter

    async def _stored(self, run_id: str) -> Run:
        run = await self._gw.store.get_run(run_id)
        if run is None:
            raise not_found("no such run")
        return run

    def abort(self, run_id: str, reason: str = "aborted by request") -> bool:
        live = self._live.get(run_id)
        if live is None or live.aborted:
            return False
        live.aborted = True
        live.abort_reason = reason
        queue = self._queues.get(live.run.session_id)
        if queue is not None and live in queue:
            queue.remove(live)
            if not queue:
                del self._queues[live.run.session_id]
                if live.run.session_id in self._ready:
                    self._ready.remove(live.run.session_id)
            ensureDeferred(self._finish(live, "aborted", error=reason))
            return True
        self._gw.approvals.cancel_for_run(run_id)
        if live.current is not None and not live.current.called:
            live.current.cancel()
        return True

    def abort_session(self, session_id: str, reason: str = "aborted by request") -> list[str]:
        ids = [r.run.id for r in self._live.values() if r.run.session_id == session_id]
        for run_id in reversed(ids):  # queued ones first, so none starts in between
            self.abort(run_id, reason)
        return ids

    # -- running ---------------------------------------------------------------------------

    def _pump(self) -> None:
        limit = self._gw.config.agent.max_concurrent_runs
        while self._ready and len(self._running) + self._reserved < limit:
            sid = self._ready.popleft()
            queue = self._queues.get(sid)
            if not queue:
                self._queues.pop(sid, None)
                continue
            live = queue.popleft()
            if not queue:
                del self._queues[sid]
            self._running[sid] = live
            d = ensureDeferred(self._execute(live))
            d.addErrback(lambda f: _log.failure("run loop crashed", f))

    async def _execute(self, live: LiveRun) -> None:
        gw = self._gw
        now = gw.clock.seconds()
        # "running" is not written: after a crash queued and running runs are both
        # unfinished (failed at the next start), and live runs are read from memory
        live.run = attrs.evolve(live.run, status="running", started_at=now)
        gw.publish_run_event(live, "run_started")
        try:
            if live.direct is not None:
                reply = await self._invoke(live, live.direct)
            else:
                reply = await self._agent_loop(live)
        except CancelledError:
            await self._finish(live, "aborted", error=live.abort_reason)
        except ProviderError as e:
            await self._finish(live, "failed", error=e.message, code=e.code)
        except GatewayError as e:
            await self._finish(live, "failed", error=e.message, code=e.code)
        except Exception:
            _log.failure("run {run_id} failed", run_id=live.run.id)
            await self._finish(live, "failed", error="internal error", code="internal")
        else:
            if live.aborted:
                await self._finish(live, "aborted", error=live.abort_reason)
            else:
                await self._finish(live, "completed", reply=reply)

    def _guard(self, live: LiveRun, d: Deferred[T]) -> Deferred[T]:
        live.current = d
        if live.aborted:
            d.cancel()
        return d

    async def _agent_loop(self, live: LiveRun) -> str:
        gw = self._gw
        agent = gw.config.agent
        if live.fresh_session:
            # a session created with this run holds just this run's message
            convo = [ChatMessage("user", live.message)]
        else:
            history = await gw.store.history(live.run.session_id)
            convo = [
                ChatMessage(m.role, m.content)
                for m in history
                if m.role in ("user", "assistant") and m.id <= live.message_id
            ]
        tokens_in = tokens_out = 0
        used: list[str] = []

        def on_text(delta: str) -> None:
            if delta and not live.aborted:
                live.partial.append(delta)
                gw.publish_run_event(live, "text_delta", content=delta)

        try:
            for _ in range(agent.max_tool_rounds):
                early, live.early = live.early, None
                if early is not None:
                    turn = await self._guard(live, early.attach(on_text))
                else:
                    request = self._provider_request(
                        convo, live.instructions, live.tools_allowed, live.allow_tool_commands
                    )
                    turn = await self._guard(live, gw.provider.turn(request, on_text))
                tokens_in += turn.usage.input
                tokens_out += turn.usage.output
                if not turn.tool_calls:
                    gw.publish_run_event(live, "turn_complete")
                    return turn.text
                convo.append(ChatMessage("assistant", turn.text, tool_calls=turn.tool_calls))
                for call in turn.tool_calls:
                    if call.name not in used:
                        used.append(call.name)
                    result = await self._run_tool(live, call)
                    convo.append(
                        ChatMessage(
                            "tool",
                            result.content,
                            tool_call_id=call.id,
                            name=call.name,
                            is_error=result.is_error,
                        )
                    )
                gw.publish_run_event(live, "turn_complete")
            raise GatewayError("internal", "the agent did not finish within max_tool_rounds")
        finally:
            live.run = attrs.evolve(
                live.run, tokens_in=tokens_in, tokens_out=tokens_out, tools_used=tuple(used)
            )

    async def _invoke(self, live: LiveRun, call: ToolCall) -> str:
        """A direct invocation: the call alone, with its policy; the reply is its result."""
        live.run = attrs.evolve(live.run, tools_used=(call.name,))
        result = await self._run_tool(live, call)
        live.tool_result = result
        return result.content

    async def _run_tool(self, live: LiveRun, call: ToolCall) -> ToolResult:
        gw = self._gw
        gw.publish_run_event(live, "tool_start", call_id=call.id, tool=call.name, input=call.input)
        result = await self._decide_and_run(live, call)
        gw.publish_run_event(
            live,
            "tool_end",
            call_id=call.id,
            tool=call.name,
            result=result.content,
            is_error=result.is_error,
        )
        await gw.store.add_message(
            live.run.session_id,
            "tool",
            result.content,
            gw.clock.seconds(),
            live.run.id,
            call.name,
            result.is_error,
        )
        return result

    async def _decide_and_run(self, live: LiveRun, call: ToolCall) -> ToolResult:
        gw = self._gw
        tool = gw.tools.get(call.name)
        if tool is None:
            return ToolResult(f"unknown tool: {call.name}", True)
        if live.tools_allowed is not None and call.name not in live.tools_allowed:
            return ToolResult(f"the tool {call.name} is not allowed for this run", True)
        policy = gw.tools.policy_for(call.name, gw.tool_policies)
        if policy == "deny":
            return ToolResult(f"the tool {call.name} is denied by policy", True)
        if policy == "ask":
            live.run = attrs.evolve(live.run, status="awaiting_approval")
            gw.store.update_run(live.run.id, status="awaiting_approval")
            status, reason = await self._guard(
                live, ensureDeferred(gw.approvals.request(live, call))
            )
            live.run = attrs.evolve(live.run, status="running")
            gw.store.update_run(live.run.id, status="running")
            if status != "approved":
                why = f": {reason}" if reason else ""
                return ToolResult(f"the tool call was {status}{why}", True)
        return await self._guard(live, run_tool(tool, call.input, gw.tool_context()))

    async def _finish(
        self,
        live: LiveRun,
        status: str,
        *,
        reply: str | None = None,
        error: str | None = None,
        code: str | None = None,
    ) -> None:
        gw = self._gw
        if live.early is not None:  # finished before it began: it never takes the turn
            live.early.drop()
            live.early = None
        now = gw.clock.seconds()
        text = reply if reply is not None else "".join(live.partial)
        cost = self._cost(live.run.tokens_in, live.run.tokens_out)
        run = attrs.evolve(
            live.run,
            status=status,
            response=text if (text or status == "completed") else None,
            error=error,
            error_code=code,
            cost_cents=cost,
            finished_at=now,
        )
        stored_reply = text if (text or status == "completed") else None
        try:
            await gw.store.finish_run(run, stored_reply, now)
        except Exception:
            _log.failure("could not store the end of run {run_id}", run_id=run.id)
        if cost:
            await self._add_spend(cost)
        # only now may a reader see the outcome: its event goes out in the same turn, so a
        # client that sees "failed" in GET /api/runs/{id} also finds the run_error event
        live.run = run
        if status == "completed":
            gw.publish_run_event(
                live,
                "run_complete",
                response=run.response,
                tokens={"input": run.tokens_in, "output": run.tokens_out},
                cost_cents=cost,
            )
        elif status == "aborted":
            gw.publish_run_event(live, "run_aborted", reason=error)
        else:
            gw.publish_run_event(live, "run_error", error=error, code=code)
        gw.metrics_run_finished(run)
        self._live.pop(run.id, None)
        sid = run.session_id
        if self._running.get(sid) is live:
            del self._running[sid]
            if self._queues.get(sid) and sid not in self._ready:
                self._ready.append(sid)
        waiters, live.waiters = live.waiters, []
        for waiter in waiters:
            waiter.callback(run)
        self._pump()
        self._check_idle()

    def _check_idle(self) -> None:
        """Wake the drain once no run is live and no submit is half-way through."""
        if self._idle and not self._live and not self._submitting:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    # -- money -----------------------------------------------------------------------------

    def _cost(self, tokens_in: int, tokens_out: int) -> float:
        pricing = self._gw.config.agent.pricing
        cents = (
            tokens_in * pricing.input_cents_per_mtok + tokens_out * pricing.output_cents_per_mtok
        ) / 1_000_000
        return round(cents, 6)

    def _today(self) -> str:
        return datetime.datetime.fromtimestamp(self._gw.clock.seconds(), datetime.UTC).strftime(
            "%Y-%m-%d"
        )

    async def load_spend(self) -> None:
        self._spend_day = self._today()
        self._spent = await self._gw.store.get_spend(self._spend_day)

    def _over_budget(self) -> bool:
        limit = self._gw.config.agent.budget_cents_per_day
        if limit <= 0:
            return False
        if self._today() != self._spend_day:
            self._spend_day, self._spent = self._today(), 0.0
        return self._spent >= limit

    async def _add_spend(self, cents: float) -> None:
        gw = self._gw
        day = self._today()
        if day != self._spend_day:
            self._spend_day, self._spent = day, 0.0
        self._spent += cents
        await gw.store.add_spend(day, cents)
        limit = gw.config.agent.budget_cents_per_day
        if limit > 0 and self._spent >= 0.8 * limit and self._warned_day != day:
            self._warned_day = day
            gw.bus.publish("budget_warning", spent_cents=self._spent, limit_cents=limit)

    @property
    def spent_today(self) -> float:
        return self._spent

    # -- stopping --------------------------------------------------------------------------

    def drain(self, grace_s: float) -> Deferred[None]:
        """Refuse new runs, give the running ones ``grace_s``, then abort what is left."""
        self.accepting = False
        if not self._live and not self._submitting:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._idle.append(done)
        timer = self._gw.clock.callLater(grace_s, self._abort_all)

        def stop_timer(result: None) -> None:
            if timer.active():
                timer.cancel()

        done.addCallback(stop_timer)
        return done

    def _abort_all(self) -> None:
        for run_id in list(self._live):
            self.abort(run_id, "the gateway shut down")


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)
