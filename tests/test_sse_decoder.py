"""The incremental SSE decoder: the spec's parsing rules, and any split of the bytes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.agent.sse import SSEDecodeError, SSEDecoder, SSEEvent


def feed_all(chunks: list[bytes], decoder: SSEDecoder | None = None) -> list[SSEEvent]:
    decoder = decoder or SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


def test_fields_multiline_data_and_defaults() -> None:
    stream = (
        b"event: add\ndata: first\ndata: second\nid: 7\n\n"
        b"data: plain\n\n"
        b"data\n\n"  # a field with no colon: data is ""
        b"data:no-space\n\n"
        b"data:  two spaces\n\n"
    )
    assert feed_all([stream]) == [
        SSEEvent("add", "first\nsecond", "7"),
        SSEEvent("message", "plain", "7"),  # the last event id persists
        SSEEvent("message", "", "7"),
        SSEEvent("message", "no-space", "7"),
        SSEEvent("message", " two spaces", "7"),
    ]


def test_comments_unknown_fields_and_events_without_data() -> None:
    stream = (
        b": keep-alive\n\n"
        b"event: lonely\n\n"  # no data: not dispatched, and the type does not leak
        b"foo: bar\ndata: x\n\n"
        b"id: a\x00b\ndata: nul-id\n\n"  # an id containing NUL is ignored
        b"retry: 1500\ndata: r\n\n"
        b"retry: soon\ndata: r2\n\n"
    )
    assert feed_all([stream]) == [
        SSEEvent("message", "x", None),
        SSEEvent("message", "nul-id", None),
        SSEEvent("message", "r", None, 1500),
        SSEEvent("message", "r2", None, 1500),
    ]


def test_line_endings_cr_lf_crlf() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"
    assert feed_all([stream]) == [SSEEvent("message", "a\nb\nc"), SSEEvent("message", "d")]


def test_cr_at_chunk_end_then_lf_is_one_line_ending() -> None:
    # Were the "\n" taken as a blank line, "a" would be dispatched alone.
    assert feed_all([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [SSEEvent("message", "a\nb")]
    # ...but a lone "\r" then a real blank line still dispatches.
    assert feed_all([b"data: a\r", b"\r"]) == [SSEEvent("message", "a")]


def test_bom_only_at_start_even_when_split() -> None:
    assert feed_all([b"\xef", b"\xbb", b"\xbfdata: x\n\n"]) == [SSEEvent("message", "x")]
    # A BOM later in the stream is just bytes: this line's field name is not "data".
    assert feed_all([b"data: x\n\n\xef\xbb\xbfdata: y\n\n"]) == [SSEEvent("message", "x")]
    # Something that merely starts like a BOM is kept.
    assert feed_all([b"\xef"]) == []


def test_utf8_split_inside_a_character() -> None:
    data = "data: héllo €𝄞\n\n".encode()
    assert feed_all([data[i : i + 1] for i in range(len(data))]) == [
        SSEEvent("message", "héllo €𝄞")
    ]


def test_incomplete_event_at_close_is_dropped() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: done\n\ndata: partial") == [SSEEvent("message", "done")]
    assert decoder.close() == []


def test_events_come_one_at_a_time_and_unread_ones_wait() -> None:
    d = SSEDecoder()
    it = d.iter_feed(b"data: a\n\ndata: b\n\ndata: c\n")
    assert next(it).data == "a"  # the rest of the chunk is not decoded yet
    it.close()  # the caller stops early (say, the stream said it was done)
    # what was not read waits in the buffer for the next bytes
    assert [e.data for e in d.feed(b"\n")] == ["b", "c"]


def test_limits_bound_memory() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    with pytest.raises(SSEDecodeError):
        decoder.feed(b"data: " + b"x" * 100)  # a line that never ends
    decoder = SSEDecoder(max_event_bytes=64)
    with pytest.raises(SSEDecodeError):
        decoder.feed(b"data: xxxxxxxxxx\n" * 10)  # an event that never ends


# -- any split of any stream yields the same events -----------------------------------------

_line_text = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), max_size=12
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    """A serialised stream with random line endings, comments and BOM, and its events."""
    lines: list[str] = []
    expected: list[SSEEvent] = []
    last_id: str | None = None
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            lines.append(":" + draw(_line_text))
        event = draw(st.one_of(st.just(""), _line_text))
        if event:
            lines.append("event: " + event)
        new_id = draw(st.one_of(st.none(), _line_text.filter(lambda s: "\0" not in s)))
        if new_id is not None:
            lines.append("id: " + new_id)
            last_id = new_id
        data = draw(st.lists(_line_text, min_size=1, max_size=3))
        lines += ["data: " + d for d in data]
        lines.append("")
        expected.append(SSEEvent(event or "message", "\n".join(data), last_id))
    out = "\ufeff" if draw(st.booleans()) else ""
    previous = ""
    for line in lines:
        choices = ["\n", "\r\n", "\r"]
        if line == "" and previous == "\r":
            choices = ["\r\n", "\r"]  # "\r" + "\n" would read as one CRLF, eating the blank
        ending = draw(st.sampled_from(choices))
        out += line + ending
        previous = ending
    return out.encode("utf-8"), expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.data())
def test_any_split_yields_the_same_events(
    stream: tuple[bytes, list[SSEEvent]], data: st.DataObject
) -> None:
    raw, expected = stream
    assert feed_all([raw]) == expected
    cuts = data.draw(st.lists(st.integers(0, max(0, len(raw))), max_size=20))
    assert feed_all(split_at(raw, cuts)) == expected
    assert feed_all([raw[i : i + 1] for i in range(len(raw))]) == expected
