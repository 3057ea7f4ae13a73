"""Chat bridges: Telegram, Slack, Discord, an outbound webhook and IRC (CONTRACT §9).

The :class:`BridgeManager` is one service in the gateway's MultiService with a child service
per configured bridge. It routes ``deliver("<bridge>[:<target>]", text)`` (the ``send``
operation), delivers a finished run's answer to the run's ``channel`` (wake, hooks, cron,
heartbeat and the bridges' own conversations alike), and reports each bridge's state and
counters for ``GET /api/channels``. :func:`manager_for` finds a gateway's manager.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.logger import Logger

from gatewayd.bridges.base import BaseBridge, Handler, answer_text
from gatewayd.bridges.http import BridgeHTTP, DeliveryError
from gatewayd.config import Config
from gatewayd.errors import GatewayError, invalid
from gatewayd.events import Event, Subscription, make_filter
from gatewayd.store.records import Run

if TYPE_CHECKING:
    from gatewayd.core import Gateway

__all__ = [
    "BaseBridge",
    "Bridge",
    "BridgeManager",
    "DeliveryError",
    "install_channels",
    "manager_for",
    "parse_channel",
]

_log = Logger()


class Bridge(Protocol):
    """What the manager needs of a bridge (see :class:`gatewayd.bridges.base.BaseBridge`)."""

    kind: str
    default_target: str

    @property
    def state(self) -> str: ...

    def routes(self) -> dict[str, Handler]: ...

    async def send(self, target: str, text: str, run: Run | None = None) -> str: ...

    async def deliver_run(self, run: Run, target: str, text: str) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def parse_channel(spec: str) -> tuple[str, str]:
    """``"telegram"`` → ("telegram", ""); ``"telegram:123"`` → ("telegram", "123")."""
    name, _, target = spec.strip().partition(":")
    return name, target


def _build(manager: BridgeManager, config: Config) -> list[BaseBridge]:
    """One bridge per configured section; imports only what is configured."""
    b = config.bridges
    out: list[BaseBridge] = []
    if b.telegram is not None:
        from gatewayd.bridges.telegram import TelegramBridge

        out.append(TelegramBridge(manager, b.telegram))
    if b.slack is not None:
        from gatewayd.bridges.slack import SlackBridge

        out.append(SlackBridge(manager, b.slack))
    if b.discord is not None:
        from gatewayd.bridges.discord import DiscordBridge

        out.append(DiscordBridge(manager, b.discord))
    if b.webhook is not None:
        from gatewayd.bridges.outbound import OutboundWebhook

        out.append(OutboundWebhook(manager, b.webhook))
    if b.irc is not None:
        from gatewayd.bridges.irc import IrcBridge

        out.append(IrcBridge(manager, b.irc))
    return out


class BridgeManager(MultiService):
    """The bridges of one gateway, and the way runs and operations reach them."""

    def __init__(self, gw: Gateway) -> None:
        super().__init__()
        self.setName("bridges")
        self.gw = gw
        self.http = BridgeHTTP(gw.reactor)
        self.bridges: dict[str, BaseBridge] = {}
        self._alerts: Subscription | None = None
        for bridge in _build(self, gw.config):
            self.bridges[bridge.kind] = bridge
            bridge.setServiceParent(self)
        gw.run_finished_hooks.append(self.on_run_finished)

    # -- life --------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # the heartbeat publishes its alerts with heartbeat.channel; they are said there
        self._alerts = self.gw.bus.subscribe(self._on_alert, make_filter(["heartbeat_alert"]))

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        if self._alerts is not None:
            self._alerts.cancel()
            self._alerts = None
        bridges = list(self.bridges.values())
        for bridge in bridges:
            bridge.begin_stop()
        self.http.cancel_inflight()
        await DeferredList(
            [maybeDeferred(b.stopService) for b in reversed(bridges)], consumeErrors=True
        )
        await self.http.close()

    # -- lookups -----------------------------------------------------------------------------

    def get(self, name: str) -> BaseBridge:
        bridge = self.bridges.get(name)
        if bridge is None:
            raise invalid(f"channel: no bridge named {name!r} is configured")
        return bridge

    def resolve(self, spec: str) -> tuple[BaseBridge, str]:
        """The bridge and target a channel spec names; 400 when either is missing."""
        name, target = parse_channel(spec)
        bridge = self.get(name)
        target = target or bridge.default_target
        if not target:
            raise invalid(f"channel: the {name} bridge has no default_target; name one")
        return bridge, target

    def check_channel(self, spec: str) -> None:
        """Raise 400 unless ``spec`` names a configured bridge (the target may be implied)."""
        if spec:
            self.resolve(spec)

    def routes(self) -> dict[str, Handler]:
        out: dict[str, Handler] = {}
        for bridge in self.bridges.values():
            out.update(bridge.routes())
        return out

    def describe(self) -> list[dict[str, Any]]:
        return [bridge.describe() for bridge in self.bridges.values()]

    # -- delivering --------------------------------------------------------------------------

    async def deliver(self, spec: str, text: str) -> dict[str, Any]:
        """The ``send`` operation: deliver ``text`` now; 503 when the platform refuses."""
        bridge, target = self.resolve(spec)
        try:
            status = await bridge.send(target, text)
        except DeliveryError as e:
            raise GatewayError("unavailable", f"{bridge.kind}: {e}") from None
        return {"channel": bridge.kind, "target": target, "status": status}

    def on_run_finished(self, run: Run) -> None:
        """A run with a channel ends: its answer goes there (a failure only gets logged)."""
        if not run.channel:
            return
        name, target = parse_channel(run.channel)
        bridge = self.bridges.get(name)
        if bridge is None:
            _log.warn("run {run_id}: no bridge {name} for its answer", run_id=run.id, name=name)
            return
        text = answer_text(run)
        target = target or bridge.default_target
        if text is None or not target:
            bridge.reply_context.pop(run.id, None)
            if text is not None:
                bridge.note_error(f"run {run.id}: no target for its answer")
            return
        bridge.spawn(bridge.deliver_run(run, target, text), f"answer of run {run.id}")

    def _on_alert(self, event: Event) -> None:
        spec = event.payload.get("channel")
        if not isinstance(spec, str) or not spec.strip():
            return
        try:
            bridge, target = self.resolve(spec)
        except GatewayError as e:
            _log.warn("heartbeat alert not delivered: {why}", why=e.message)
            return
        check, message = event.payload.get("check", ""), event.payload.get("message", "")
        bridge.spawn(bridge.send(target, f"Heartbeat alert ({check}): {message}"), "alert")


_MANAGERS: weakref.WeakKeyDictionary[Any, BridgeManager] = weakref.WeakKeyDictionary()


def manager_for(gw: Gateway) -> BridgeManager:
    """The gateway's bridge manager, made (from its config) on first use."""
    manager = _MANAGERS.get(gw)
    if manager is None:
        manager = BridgeManager(gw)
        _MANAGERS[gw] = manager
    return manager


def install_channels(gateway: Gateway, parent: MultiService) -> BridgeManager:
    """Check hooks and bridges against each other and add the bridges to the service tree."""
    from gatewayd.web.hooks import check_hooks

    manager = manager_for(gateway)
    check_hooks(gateway.config, manager)
    if manager.parent is None:
        manager.setServiceParent(parent)
    return manager
