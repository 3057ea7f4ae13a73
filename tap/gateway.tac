"""The gatewayd service tree for ``twistd -ny tap/gateway.tac``.

Configure it with the environment: GATEWAYD_CONFIG (a TOML file), GATEWAYD_STATE_DIR, and
GATEWAYD_LISTEN (endpoint strings separated by spaces; default: the config's gateway.listen).
"""

import os
import sys

from twisted.application.service import Application
from twisted.internet import reactor

from gatewayd.config import ConfigError
from gatewayd.process import run_as_daemon
from gatewayd.tap import Options, compose, default_state_dir

options = Options()
argv = []
if os.environ.get("GATEWAYD_LISTEN"):
    for endpoint in os.environ["GATEWAYD_LISTEN"].split():
        argv += ["--listen", endpoint]
options.parseOptions(argv)

application = Application("gatewayd")
try:
    service = compose(
        options["gateway_config"],
        reactor=reactor,
        state_dir=os.environ.get("GATEWAYD_STATE_DIR") or default_state_dir(),
        announce=sys.stdout,
    )
except ConfigError as e:
    sys.stderr.write(f"gatewayd: config error: {e}\n")
    raise SystemExit(1) from None
run_as_daemon(service, reactor)
service.setServiceParent(application)
