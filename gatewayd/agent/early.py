"""A provider turn started before its run may speak.

A run on a brand-new session needs nothing from the store to ask the provider, so the run
manager starts its first turn while the user message is still being written.  The upstream
round trip then overlaps the store's, which is most of what the gateway adds to the time to
the first token.  Nothing is acknowledged early: the text that arrives before the run starts
is held here and handed over, in order, once the message is durable and the run begins.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gatewayd.agent.base import ProviderTurn


class EarlyTurn:
    def __init__(self) -> None:
        self.deferred: Deferred[ProviderTurn] | None = None
        self._held: list[str] = []
        self._sink: Callable[[str], None] | None = None

    def on_text(self, delta: str) -> None:
        """The provider's text callback: held until :meth:`attach`, then passed through."""
        if self._sink is None:
            self._held.append(delta)
        else:
            self._sink(delta)

    def attach(self, sink: Callable[[str], None]) -> Deferred[ProviderTurn]:
        """Hand the held text to ``sink``, send the rest straight there; the turn's result."""
        assert self.deferred is not None
        self._sink = sink
        held, self._held = self._held, []
        for delta in held:
            sink(delta)
        return self.deferred

    def drop(self) -> None:
        """The run will never take this turn: stop it, and swallow how it ends."""
        d, self.deferred = self.deferred, None
        self._held = []
        if d is not None:
            d.addErrback(_ignore)
            d.cancel()


def _ignore(_: Failure) -> None:
    return None
