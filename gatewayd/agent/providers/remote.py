"""What the HTTP providers share: the pooled client, the key kept out of every message, the
streamed turn, the reachability probe."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Protocol

from twisted.internet.defer import Deferred

from gatewayd.agent.base import ProviderTurn
from gatewayd.agent.providers.http import HTTPSettings, UpstreamError, UpstreamHTTP
from gatewayd.agent.sse import SSEDecodeError, SSEDecoder, SSEEvent


class TurnStream(Protocol):
    """An incremental parser of one streamed answer (OpenAIStream, AnthropicStream)."""

    def feed(self, chunk: bytes) -> bool: ...

    def finish(self) -> ProviderTurn: ...


class SSETurnStream:
    """What both wire formats share: body bytes in, SSE events out, one at a time.

    Each event is handled as soon as it is decoded, so the first token of a burst reaches
    the run before the rest of the burst is even split into lines.
    """

    #: prefixes decoding errors ("openai: ...")
    label: ClassVar[str] = "upstream"

    def __init__(self) -> None:
        self._sse = SSEDecoder()
        self.done = False

    def feed(self, chunk: bytes) -> bool:
        """Take raw body bytes; True once the answer's end arrived."""
        try:
            for event in self._sse.iter_feed(chunk):
                self.feed_event(event)
                if self.done:
                    break
        except SSEDecodeError as exc:
            raise UpstreamError(f"{self.label}: {exc}", "upstream_error") from None
        return self.done

    def feed_event(self, event: SSEEvent) -> None:
        raise NotImplementedError


class RemoteProvider:
    """Base of :class:`OpenAIProvider` and :class:`AnthropicProvider`; call :meth:`close`."""

    name: str = ""
    #: where :meth:`check` probes, relative to ``base_url``
    models_path: ClassVar[str] = "/models"

    def __init__(
        self,
        reactor: Any,
        *,
        base_url: str,
        api_key: str,
        model: str,
        connect_timeout_s: float = 10,
        read_timeout_s: float = 120,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self._api_key = api_key
        self._http = UpstreamHTTP(
            reactor,
            label=self.name,
            settings=HTTPSettings(
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=read_timeout_s,
                max_retries=max_retries,
                backoff_base_s=backoff_base_s,
                backoff_max_s=backoff_max_s,
            ),
            secrets=(api_key,),
        )

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    def _headers(self, *, streaming: bool = False) -> dict[str, str]:
        raise NotImplementedError

    def _turn(self, path: str, body: dict[str, Any], stream: TurnStream) -> Deferred[ProviderTurn]:
        """POST ``body`` to ``path`` and feed the streamed answer to ``stream``."""
        d = self._http.stream(
            f"{self.base_url}{path}",
            headers=self._headers(streaming=True),
            body=json.dumps(body).encode("utf-8"),
            on_bytes=stream.feed,
        )
        turn = d.addCallback(lambda _: stream.finish())
        turn.addErrback(self._http.redact_error)
        return turn

    def check(self) -> Deferred[None]:
        """``GET {base_url}{models_path}`` once; see :meth:`UpstreamHTTP.judge_probe`.

        No tokens are spent (unlike a probe request to the model would).
        """
        d = self._http.probe(f"{self.base_url}{self.models_path}", headers=self._headers())
        return d.addCallback(self._http.judge_probe)

    def models(self) -> list[str]:
        return [self.model]

    def close(self) -> Deferred[None]:
        """Close pooled connections (shutdown and tests)."""
        return self._http.close()
