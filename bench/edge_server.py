"""A gatewayd service tree for the edge benchmark, with a second, limiter-free site.

    python bench/edge_server.py STATE_DIR CONFIG BARE_PORT

The same ``gatewayd.tap.compose`` as ``twistd gateway`` (its listeners come from CONFIG);
then one more site over the same resources and gateway, without the rate limiter, listens on
BARE_PORT, so the benchmark prices the limiter inside one process.  Prints ``ready``.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from gatewayd.config import load_config
from gatewayd.tap import compose
from gatewayd.web.site import GatewaySite


async def main(state_dir: str, config_path: str, bare_port: int) -> None:
    service = compose(load_config(config_path), reactor=reactor, state_dir=state_dir)
    service.startService()
    await service.ready
    shipped = service.sites[0]
    bare = GatewaySite(shipped.resource, service.gateway)
    bare.limiter = None
    bare.request_finished = shipped.request_finished  # metrics, as on the shipped site
    service.sites.append(bare)
    reactor.listenTCP(bare_port, bare, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    print("ready", flush=True)


if __name__ == "__main__":
    ensureDeferred(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))).addErrback(
        lambda f: (f.printTraceback(), reactor.stop())  # type: ignore[attr-defined]
    )
    reactor.run()  # type: ignore[attr-defined]
