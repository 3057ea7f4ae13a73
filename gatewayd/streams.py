"""Open streams (WebSocket and SSE) by token: the per-token cap, and closing on revoke."""

from __future__ import annotations

from collections.abc import Callable

from gatewayd.auth import Principal
from gatewayd.errors import GatewayError


class StreamHandle:
    def __init__(
        self, registry: StreamRegistry, token_id: str, kind: str, close: Callable[[str], None]
    ) -> None:
        self._registry = registry
        self.token_id = token_id
        self.kind = kind
        self.close_stream = close
        self.open = True

    def release(self) -> None:
        """The stream ended (for whatever reason); idempotent."""
        if self.open:
            self.open = False
            self._registry._release(self)


class StreamRegistry:
    def __init__(self, max_per_token: int, counts: dict[str, int]) -> None:
        self.max_per_token = max_per_token
        #: shared with Gateway.connections: {"websocket": n, "sse": n}
        self.counts = counts
        self._by_token: dict[str, set[StreamHandle]] = {}

    def open(self, principal: Principal, kind: str, close: Callable[[str], None]) -> StreamHandle:
        """Register a stream; 429 too_many_streams past the token's cap."""
        streams = self._by_token.setdefault(principal.token_id, set())
        if len(streams) >= self.max_per_token:
            raise GatewayError(
                "too_many_streams",
                f"this token already has {len(streams)} open streams",
                retry_after=1,
            )
        handle = StreamHandle(self, principal.token_id, kind, close)
        streams.add(handle)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return handle

    def _release(self, handle: StreamHandle) -> None:
        streams = self._by_token.get(handle.token_id)
        if streams is not None:
            streams.discard(handle)
            if not streams:
                del self._by_token[handle.token_id]
        self.counts[handle.kind] = max(0, self.counts.get(handle.kind, 0) - 1)

    def revoke(self, token_id: str) -> int:
        """Close every stream of a revoked token at once; returns how many."""
        handles = list(self._by_token.get(token_id, ()))
        for handle in handles:
            handle.close_stream("token revoked")
            handle.release()
        return len(handles)

    def close_all(self, reason: str) -> None:
        for streams in list(self._by_token.values()):
            for handle in list(streams):
                handle.close_stream(reason)
                handle.release()

    def count_for(self, token_id: str) -> int:
        return len(self._by_token.get(token_id, ()))
