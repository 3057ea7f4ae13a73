"""twistd and endpoint plugins for gatewayd; deliberately imports nothing heavy."""

from twisted.application.service import ServiceMaker

gateway = ServiceMaker(
    "gatewayd", "gatewayd.tap", "An AI-agent gateway (REST, SSE, WebSocket, OpenAI API)", "gateway"
)

# The `mtls:` server endpoint (gatewayd.endpoints imports OpenSSL only when a string is parsed).
from gatewayd.endpoints import MTLSServerParser  # noqa: E402

mtls = MTLSServerParser()
