"""The gateway core: one object holding the store, the bus, the runs and the agent.

It knows nothing of HTTP or WebSocket; every transport reaches it through the operations
table (:mod:`gatewayd.ops`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from gatewayd import __version__
from gatewayd.agent.base import Provider, ToolContext
from gatewayd.approvals import Approvals
from gatewayd.auth import ANONYMOUS, Principal, TokenRegistry
from gatewayd.config import Config
from gatewayd.events import Event, EventBus
from gatewayd.metrics import Metrics
from gatewayd.runs import LiveRun, RunManager
from gatewayd.store import Store
from gatewayd.store.records import Run
from gatewayd.streams import StreamRegistry

if TYPE_CHECKING:
    from gatewayd.logs import FileLog
    from gatewayd.scheduler import CronService

_log = Logger()


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        reactor: Any,
        store: Store,
        provider: Provider,
        tools: Any,
        tokens: TokenRegistry,
        state_dir: str,
        workspace: str,
        clock: Any = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.store = store
        self.provider = provider
        self.tools = tools
        self.tokens = tokens
        self.state_dir = state_dir
        self.workspace = workspace
        self.bus = EventBus(self.clock, store, config.events.replay_buffer)
        self.runs = RunManager(self)
        self.approvals = Approvals(self)
        self.started_at = self.clock.seconds()
        self.listeners: list[str] = []
        #: open streams by kind, for /api/status and metrics
        self.connections: dict[str, int] = {"websocket": 0, "sse": 0}
        #: open WebSocket and SSE streams by token (cap, and closing them on revoke)
        self.streams = StreamRegistry(config.gateway.max_streams_per_token, self.connections)
        tokens.on_revoke(self._close_streams_of)
        self.run_finished_hooks: list[Callable[[Run], None]] = []
        self.version = __version__
        self.anonymous = ANONYMOUS
        # -- operations (gatewayd.metrics, gatewayd.config_api) --------------------------------
        #: the TOML file the config came from (None: built-in defaults); set by build_gateway
        self.config_path: str | None = None
        #: re-applies the command line over a config re-read from the file (--listen, …)
        self.config_overrides: Callable[[Config], Config] = lambda c: c
        #: the config the process started with: restart-only keys still run with these values
        self.boot_config = config
        #: called as (old, new) after a config change is swapped in; raising rolls it back
        self.config_listeners: list[Callable[[Config, Config], None]] = []
        #: the static tokens a config gives (api_keys, --token, admin-token); set by build_gateway
        self.static_tokens: Callable[[Config], list[tuple[str, str, str, str]]] | None = None
        #: the JSON-lines log in the state dir, while the service runs (gatewayd.logs)
        self.file_log: FileLog | None = None
        #: stops the whole process gracefully (twistd: reactor.stop); see request_shutdown
        self.stop_process: Callable[[], None] | None = None
        #: set once the shutdown event went out (readiness answers 503 from then on)
        self.shutting_down = False
        self.metrics = Metrics(self)
        #: the cron service once it runs (gatewayd.scheduler.cron_service reads it)
        self.cron: CronService | None = None

    # -- life ------------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        await self.store.start()
        await self.bus.start()
        await self._settle_interrupted()
        await self.runs.load_spend()
        from gatewayd.ops.tokens import load_stored_tokens

        await load_stored_tokens(self)  # tokens made over the API, kept as SHA-256

    async def _settle_interrupted(self) -> None:
        """Fail what the last process left unfinished, and say so on the bus (a client that
        resumes from an id it saved before the stop sees these events)."""
        error = "the gateway stopped before this run finished"
        gone = await self.store.fail_unfinished_runs(
            "failed", error, "unavailable", self.clock.seconds()
        )
        for approval_id, run_id, session_id, owner in gone.approvals:
            self.bus.publish(
                "approval_resolved",
                session_id=session_id,
                run_id=run_id,
                owner=owner,
                approval_id=approval_id,
                decision="deny",
                reason="the gateway stopped before a decision",
                status="expired",
            )
        for run_id, session_id, owner in gone.runs:
            self.bus.publish(
                "run_error",
                session_id=session_id,
                run_id=run_id,
                owner=owner,
                error=error,
                code="unavailable",
            )
        if gone.runs:
            _log.warn("marked {count} unfinished runs failed after a restart", count=len(gone.runs))

    def stop(self, grace_s: float | None = None) -> Deferred[None]:
        return ensureDeferred(self._stop(grace_s))

    async def _stop(self, grace_s: float | None) -> None:
        grace = self.config.gateway.shutdown_grace_s if grace_s is None else grace_s
        self.announce_shutdown(grace)
        await self.runs.drain(grace)
        close = getattr(self.provider, "close", None)  # remote providers pool connections
        if close is not None:
            try:
                await close()
            except Exception:
                _log.failure("could not close the provider's connections")
        await self.bus.flush()
        await self.store.stop()

    def announce_shutdown(self, grace_s: float | None = None) -> None:
        """Publish ``shutdown`` once, before any stream is closed (CONTRACT §1)."""
        if self.shutting_down:
            return
        self.shutting_down = True
        grace = self.config.gateway.shutdown_grace_s if grace_s is None else grace_s
        self.bus.publish("shutdown", grace_s=grace)

    # -- helpers the operations share --------------------------------------------------------

    def _close_streams_of(self, token_id: str) -> None:
        self.streams.revoke(token_id)

    @property
    def tool_policies(self) -> dict[str, str]:
        return {name: t.policy for name, t in self.config.agent.tools.items()}

    def tool_context(self) -> ToolContext:
        return ToolContext(workspace=self.workspace, reactor=self.reactor)

    def publish_run_event(self, live: LiveRun, type: str, **payload: Any) -> Event:
        event = self.bus.publish(
            type,
            session_id=live.run.session_id,
            run_id=live.run.id,
            owner=live.run.owner,
            **payload,
        )
        for listener in list(live.listeners):
            try:
                listener(event)
            except Exception:
                _log.failure("run listener failed")
        return event

    def metrics_run_finished(self, run: Run) -> None:
        for hook in self.run_finished_hooks:
            try:
                hook(run)
            except Exception:
                _log.failure("run hook failed")

    def audit(
        self, principal: Principal | None, action: str, target: str = "", **detail: Any
    ) -> None:
        actor = principal.token_id if principal is not None else "anonymous"
        now = self.clock.seconds()

        def q(conn: Any) -> None:
            conn.execute(
                "INSERT INTO audit (ts, actor, action, target, detail) VALUES (?,?,?,?,?)",
                (now, actor, action, target, json.dumps(detail)),
            )

        self.store.run(q).addErrback(lambda f: _log.failure("audit write failed", f))
