"""The event bus: every state change becomes an envelope with an id that never goes backwards.

Subscribers (SSE, WebSocket, WAMP, activity, metrics, bridges) see events synchronously in
publish order.  A bounded replay buffer lets any transport resume after an id the same way;
an id the bus no longer (or never) knew gets ``None`` from :meth:`EventBus.replay`, which
transports turn into ``reset``.  Ids survive restarts: the bus reserves blocks of ids in the
store ahead of use, so a restarted gateway starts above every id it may have handed out, and
it starts with the stored events in its buffer, so a client that saved an id before the
restart resumes from it (what it missed then is the stored events: ``text_delta`` is never
stored, ``run_complete`` carries the whole answer).
"""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger

from gatewayd.schedule import rfc3339

_log = Logger()
_ID_BLOCK = 100_000
_RESERVED_KEY = "event_id_reserved"
#: events too chatty to keep in the activity table
EPHEMERAL = frozenset({"text_delta"})


@attrs.frozen
class Event:
    id: int
    type: str
    ts: float
    payload: dict[str, Any]
    session_id: str | None = None
    run_id: str | None = None
    #: the token that owns the session; used to scope what chat tokens see, never sent
    owner: str | None = None
    _json: list[bytes] = attrs.field(factory=list, eq=False, repr=False)

    def envelope(self) -> dict[str, Any]:
        env: dict[str, Any] = {"id": self.id, "type": self.type, "ts": rfc3339(self.ts)}
        if self.session_id is not None:
            env["session_id"] = self.session_id
        if self.run_id is not None:
            env["run_id"] = self.run_id
        env.update(self.payload)
        return env

    def encoded(self) -> bytes:
        """The envelope as compact JSON, encoded once however many subscribers there are."""
        if not self._json:
            self._json.append(
                json.dumps(self.envelope(), separators=(",", ":"), ensure_ascii=False).encode()
            )
        return self._json[0]


@attrs.frozen
class EventFilter:
    types: frozenset[str] | None = None
    session_id: str | None = None
    #: a chat token sees only its own sessions' events
    owner: str | None = None
    run_id: str | None = None

    def matches(self, event: Event) -> bool:
        if self.types is not None and event.type not in self.types:
            return False
        if self.session_id is not None and event.session_id != self.session_id:
            return False
        if self.run_id is not None and event.run_id != self.run_id:
            return False
        if self.owner is not None and event.owner != self.owner:
            return False
        return True


def make_filter(
    types: Collection[str] | str | None = None,
    session_id: str | None = None,
    owner: str | None = None,
) -> EventFilter:
    if isinstance(types, str):
        types = [t for t in (p.strip() for p in types.split(",")) if t]
    return EventFilter(
        types=frozenset(types) if types else None, session_id=session_id or None, owner=owner
    )


class Subscription:
    def __init__(self, bus: EventBus, callback: Callable[[Event], None], flt: EventFilter) -> None:
        self._bus = bus
        self.callback = callback
        self.filter = flt

    def cancel(self) -> None:
        self._bus._subscribers.pop(id(self), None)


class EventBus:
    def __init__(self, clock: Any, store: Any = None, buffer_size: int = 10000) -> None:
        self._clock = clock
        self._store = store
        self._buffer: deque[Event] = deque(maxlen=buffer_size)
        self._subscribers: dict[int, Subscription] = {}
        self._next_id = 1
        self._reserved = 0
        #: the first id this process handed out; anything below it predates this start
        self.first_id = 1
        self.published = 0
        self._unsaved: list[Event] = []
        self._save_call: Any = None

    @inlineCallbacks
    def start(self) -> Any:
        if self._store is not None:
            value = yield self._store.get_meta(_RESERVED_KEY)
            floor = int(value) if value else 0
            self._next_id = floor + 1
            self.first_id = self._next_id
            kept = yield self._store.kept_events(self._buffer.maxlen)
            for row in kept:
                try:
                    self._buffer.append(_stored_event(row))
                except (ValueError, TypeError, AttributeError):
                    # a damaged row costs its own replay, never the start
                    _log.warn("skipped stored event {id}: it does not parse", id=row[0])
            yield self._reserve()

    def _reserve(self) -> Deferred[None]:
        self._reserved = self._next_id + _ID_BLOCK
        if self._store is None:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        return self._store.set_meta(_RESERVED_KEY, str(self._reserved))  # type: ignore[no-any-return]

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    def publish(
        self,
        type: str,
        *,
        session_id: str | None = None,
        run_id: str | None = None,
        owner: str | None = None,
        **payload: Any,
    ) -> Event:
        event = Event(
            self._next_id, type, self._clock.seconds(), payload, session_id, run_id, owner
        )
        self._next_id += 1
        if self._next_id > self._reserved - _ID_BLOCK // 2:
            self._reserve()
        self._buffer.append(event)
        self.published += 1
        if self._store is not None and type not in EPHEMERAL:
            # recorded in batches: one store call per reactor turn, not one per event
            if self._save_call is None:
                self._save_call = self._clock.callLater(0, self._save)
            self._unsaved.append(event)
        for sub in list(self._subscribers.values()):
            if sub.filter.matches(event):
                try:
                    sub.callback(event)
                except Exception:
                    _log.failure("event subscriber failed on {type}", type=type)
        return event

    def _save(self) -> Deferred[None]:
        if self._save_call is not None and self._save_call.active():
            self._save_call.cancel()
        self._save_call = None
        events, self._unsaved = self._unsaved, []
        d: Deferred[None] = self._store.run(_insert_events, events)
        d.addErrback(lambda f: _log.failure("could not record events", f))
        return d

    def flush(self) -> Deferred[None]:
        """Record what is waiting now (at shutdown, before the store closes)."""
        if self._unsaved and self._store is not None:
            return self._save()
        return succeed(None)

    def subscribe(
        self, callback: Callable[[Event], None], flt: EventFilter | None = None
    ) -> Subscription:
        sub = Subscription(self, callback, flt or EventFilter())
        self._subscribers[id(sub)] = sub
        return sub

    def replay(self, after_id: int, flt: EventFilter | None = None) -> list[Event] | None:
        """Events after ``after_id`` still kept, or ``None`` when that id is unknown."""
        if after_id > self.last_id or after_id < 0:
            return None
        oldest = self._buffer[0].id if self._buffer else self._next_id
        if after_id < oldest - 1:
            return None
        flt = flt or EventFilter()
        return [e for e in self._buffer if e.id > after_id and flt.matches(e)]

    def recent(self, limit: int, flt: EventFilter | None = None) -> list[Event]:
        flt = flt or EventFilter()
        out: list[Event] = []
        for event in reversed(self._buffer):
            if event.type not in EPHEMERAL and flt.matches(event):
                out.append(event)
                if len(out) >= limit:
                    break
        return out

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)


#: envelope keys that are Event fields, not payload
_ENVELOPE_KEYS = frozenset({"id", "type", "ts", "session_id", "run_id"})


def _stored_event(row: tuple[Any, ...]) -> Event:
    """An event as :func:`_insert_events` stored it (its JSON is reused as it is)."""
    id, ts, type, session_id, run_id, owner, body = row
    envelope = json.loads(body)
    payload = {k: v for k, v in envelope.items() if k not in _ENVELOPE_KEYS}
    event = Event(int(id), str(type), float(ts), payload, session_id, run_id, owner)
    event._json.append(body.encode())
    return event


#: one statement for any number of events: ``executemany`` would step (and give up and wait
#: for the GIL) once per row
_INSERT_EVENTS = (
    "INSERT OR REPLACE INTO events (id, ts, type, session_id, run_id, owner, body) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]'), "
    "json_extract(value, '$[5]'), json_extract(value, '$[6]') FROM json_each(?)"
)


def _insert_events(conn: sqlite3.Connection, events: list[Event]) -> None:
    rows = [
        (e.id, e.ts, e.type, e.session_id, e.run_id, e.owner, e.encoded().decode()) for e in events
    ]
    conn.execute(_INSERT_EVENTS, (json.dumps(rows, ensure_ascii=False),))
