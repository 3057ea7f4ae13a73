"""gatewayd: an AI-agent gateway on Twisted."""

__version__ = "0.1.0"
