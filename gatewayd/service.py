"""The core service: the gateway starts before any listener accepts, and drains on stop."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger

from gatewayd.core import Gateway

_log = Logger()


class GatewayService(MultiService):
    """Starts the core, then its listener children; stops listeners, then drains runs.

    Children (the listeners and timers) are started only once the store is open and the
    event ids are reserved, so no request ever meets a half-started gateway.
    """

    def __init__(self, gateway: Gateway, *, log_dir: str | None = None) -> None:
        super().__init__()
        self.gateway = gateway
        self.log_dir = log_dir
        self.ready: Deferred[None] = Deferred()
        self.stopping_hooks: list[Any] = []
        #: the HTTP sites, whose connections are closed once the runs have drained
        self.sites: list[Any] = []

    def privilegedStartService(self) -> None:
        """Listeners bind in startService, after the core is up (not here, before it).

        Ports below 1024 therefore need systemd socket activation (``systemd:`` endpoints)
        or CAP_NET_BIND_SERVICE rather than twistd's start-as-root-then-drop.
        """
        from twisted.application.service import Service

        Service.privilegedStartService(self)

    def startService(self) -> None:
        from twisted.application.service import Service

        Service.startService(self)
        self._start_log()
        d = self.gateway.start()

        def started(_: None) -> None:
            for child in self:
                child.startService()
            _log.info("gatewayd {version} ready", version=self.gateway.version)
            self.ready.callback(None)

        def failed(f: Any) -> None:
            _log.failure("gatewayd could not start", f)
            self.ready.errback(f)
            reactor = self.gateway.reactor
            if hasattr(reactor, "stop") and getattr(reactor, "running", False):
                os.environ["GATEWAYD_EXIT_CODE"] = "1"
                reactor.stop()

        d.addCallbacks(started, failed)

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        from twisted.application.service import Service

        # the shutdown event goes out first, while every stream can still carry it (§1)
        self.gateway.announce_shutdown()
        for hook in list(self.stopping_hooks):
            try:
                hook()
            except Exception:
                _log.failure("shutdown hook failed")
        # stop accepting first (listeners, timers), in reverse order of start
        await DeferredList(
            [d for d in (_maybe(c.stopService()) for c in reversed(list(self))) if d is not None]
        )
        await self.gateway.stop()
        await DeferredList([site.close_connections(self.gateway.reactor) for site in self.sites])
        Service.stopService(self)
        self._stop_log()

    def _start_log(self) -> None:
        """JSON lines in the state dir (gatewayd.logs), with the config's secrets scrubbed."""
        if self.log_dir is None:
            return
        from gatewayd.config_api import log_secrets
        from gatewayd.logs import FileLog

        config = self.gateway.config
        file_log = FileLog(self.log_dir, config.gateway.log_max_bytes, reactor=self.gateway.reactor)
        file_log.set_secrets(log_secrets(self.gateway, config))
        file_log.start()
        self.gateway.file_log = file_log

    def _stop_log(self) -> None:
        file_log, self.gateway.file_log = self.gateway.file_log, None
        if file_log is not None:
            file_log.stop()


def _maybe(result: Any) -> Deferred[Any] | None:
    return result if isinstance(result, Deferred) else None
