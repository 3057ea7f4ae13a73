"""An incremental Server-Sent-Events decoder (the WHATWG ``text/event-stream`` rules).

Model APIs stream their answers as SSE over a plain HTTP body, and TCP cuts that body
wherever it likes: inside a line, between ``\\r`` and ``\\n``, inside a multi-byte UTF-8
character, inside the leading BOM.  :class:`SSEDecoder` takes the bytes as they come and
hands back only complete events, so the assemblers above it never see a partial line.
Lines are split on bytes (the three line endings are ASCII) and decoded only once whole,
which is what makes any split point safe.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import attrs

_BOM = b"\xef\xbb\xbf"
_EOL = re.compile(rb"\r\n|\r|\n")


@attrs.frozen
class SSEEvent:
    """One dispatched event: its type, its data (lines joined by ``\\n``), the last event id."""

    event: str
    data: str
    id: str | None = None
    #: the reconnection time the stream asked for (``retry:``), if it was ever set
    retry_ms: int | None = None


class SSEDecodeError(ValueError):
    """The stream broke a limit we keep to bound memory (an endless line or event)."""


class SSEDecoder:
    """Feed byte chunks, get whole events.  One decoder per stream.

    ``max_event_bytes`` bounds the memory a hostile or broken upstream can make us hold:
    a single line or a single event's data longer than that raises :class:`SSEDecodeError`.
    """

    def __init__(self, max_event_bytes: int = 8 * 1024 * 1024) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()
        self._started = False  # past the (optional) BOM
        self._skip_lf = False  # the last chunk ended in "\r": a leading "\n" belongs to it
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Take the next bytes of the stream; return the events they completed, in order."""
        return list(self.iter_feed(chunk))

    def iter_feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        """:meth:`feed`, an event at a time: each is yielded as soon as its blank line is
        read, so a burst's first token need not wait for the rest of the burst to be decoded.

        A caller that stops early leaves the unread lines buffered for the next call.
        """
        if not chunk:
            return
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        self._buf += chunk
        if not self._started:
            # A BOM may itself arrive split; wait until we can tell.
            if len(self._buf) < len(_BOM) and _BOM.startswith(bytes(self._buf)):
                return
            if self._buf.startswith(_BOM):
                del self._buf[: len(_BOM)]
            self._started = True
        pos = 0
        buf = self._buf
        end = len(buf)
        try:
            while pos < end:
                m = _EOL.search(buf, pos)
                if m is None:
                    break
                line = bytes(buf[pos : m.start()])
                if m.end() == end and m.group() == b"\r":
                    self._skip_lf = True
                pos = m.end()
                event = self._line(line)
                if event is not None:
                    yield event
        finally:
            del buf[:pos]
        if len(buf) > self._max:
            raise SSEDecodeError(f"an event-stream line is longer than {self._max} bytes")

    def close(self) -> list[SSEEvent]:
        """The stream ended.  Per the spec an event without its blank line is dropped."""
        self._buf.clear()
        self._reset_event()
        return []

    def _reset_event(self) -> None:
        self._data = []
        self._data_size = 0
        self._event = ""

    def _line(self, raw: bytes) -> SSEEvent | None:
        if not raw:
            return self._dispatch()
        if raw[:1] == b":":
            return None  # a comment (keep-alives look like this)
        line = raw.decode("utf-8", errors="replace")
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self._max:
                raise SSEDecodeError(f"an event's data is longer than {self._max} bytes")
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(
            event=self._event or "message",
            data="\n".join(self._data),
            id=self._last_id,
            retry_ms=self._retry,
        )
        self._reset_event()
        return event
