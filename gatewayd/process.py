"""What only the daemon's own process does, however it was started (plugin or ``.tac``).

An embedded gateway (the tests, another program) leaves signals, the reactor and the garbage
collector to its host; ``twistd gateway`` and ``tap/gateway.tac`` hand all three over here.
"""

from __future__ import annotations

import gc
from typing import Any

#: The collector's thresholds once the gateway runs.  With the default first threshold (700)
#: a collection falls while requests are in flight, so their objects age into the older
#: generations and the whole heap was collected every second or two under load: 35-80 ms
#: each, about 7% of the reactor's time and most of a chat's p99.  At 10,000, a request's
#: objects are gone before the next collection, and full collections become rare.
GC_THRESHOLDS = (10_000, 10, 10)


def settle_gc(_: object = None) -> None:
    """Once started, what is alive lives as long as the process: freeze it out of every
    collection (modules, the service tree), then raise the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_as_daemon(service: Any, reactor: Any) -> None:
    """The shutdown path, SIGHUP and the collector, for the process that runs ``service``."""
    from gatewayd.config_api import install_sighup

    service.gateway.stop_process = reactor.stop  # /admin/shutdown: the same path as SIGTERM
    install_sighup(service.gateway)  # reload config, TLS and api_keys
    service.ready.addCallback(settle_gc)
