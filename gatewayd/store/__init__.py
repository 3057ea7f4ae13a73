"""The store seam: the core talks to :class:`Store`; SQLite (and later PostgreSQL) implement it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from gatewayd.store.records import Interrupted, Message, Run, Session


class StoreError(Exception):
    """The store refused an operation (e.g. a schema newer than the code)."""


class Store(Protocol):
    def start(self) -> Deferred[None]: ...

    def stop(self) -> Deferred[None]: ...

    # sessions
    def create_session(
        self, id: str, owner: str, title: str, now: float, agent_id: str = "", channel: str = ""
    ) -> Deferred[Session]: ...

    def get_session(self, id: str) -> Deferred[Session | None]: ...

    def list_sessions(
        self, owner: str | None, limit: int, offset: int
    ) -> Deferred[list[Session]]: ...

    def update_session(self, id: str, title: str, now: float) -> Deferred[Session | None]: ...

    def delete_session(self, id: str) -> Deferred[bool]: ...

    def reset_session(self, id: str, now: float) -> Deferred[bool]: ...

    def prune_sessions(self, idle_before: float) -> Deferred[list[str]]: ...

    # messages
    def begin_run(
        self,
        run: Run,
        message: str,
        now: float,
        *,
        create_session: Session | None,
        context: Sequence[tuple[str, str]] = (),
    ) -> Deferred[Message]: ...

    def add_message(
        self,
        session_id: str,
        role: str,
        content: str,
        now: float,
        run_id: str | None = None,
        tool: str | None = None,
        is_error: bool = False,
    ) -> Deferred[Message]: ...

    def history(self, session_id: str, limit: int | None = None) -> Deferred[list[Message]]: ...

    def search_messages(
        self, query: str, owner: str | None, limit: int
    ) -> Deferred[list[Message]]: ...

    # runs
    def get_run(self, id: str) -> Deferred[Run | None]: ...

    def update_run(self, id: str, **fields: Any) -> Deferred[None]: ...

    def finish_run(self, run: Run, reply: str | None, now: float) -> Deferred[None]: ...

    def fail_unfinished_runs(
        self, status: str, error: str, code: str, now: float
    ) -> Deferred[Interrupted]: ...

    def count_sessions(self) -> Deferred[int]: ...

    # meta
    def get_meta(self, key: str) -> Deferred[str | None]: ...

    def set_meta(self, key: str, value: str) -> Deferred[None]: ...

    # the raw seam: ``fn(connection, *args)`` on the store's writer, in order with every call
    # (domain modules keep their queries next to their logic: cron, bridges, events, audit);
    # ``fn`` may run twice (a batch is retried call by call after a failure), so it must not
    # touch anything but the connection, and its arguments must not be one-shot iterators
    url: str

    def run(self, fn: Any, *args: Any) -> Deferred[Any]: ...

    # approvals
    def create_approval(self, approval: dict[str, Any]) -> Deferred[None]: ...

    def resolve_approval(
        self, id: str, status: str, reason: str | None, by: str | None, now: float
    ) -> Deferred[bool]: ...

    def get_approval(self, id: str) -> Deferred[dict[str, Any] | None]: ...

    def list_approvals(
        self, status: str | None, owner: str | None, limit: int = 200
    ) -> Deferred[list[dict[str, Any]]]: ...

    # spend (the daily budget)
    def add_spend(self, day: str, cents: float) -> Deferred[float]: ...

    def get_spend(self, day: str) -> Deferred[float]: ...

    # tokens and devices (SHA-256 digests only)
    def insert_token(
        self, token: dict[str, Any], device: dict[str, Any] | None = None
    ) -> Deferred[None]: ...

    def list_tokens(self) -> Deferred[list[dict[str, Any]]]: ...

    def live_tokens(self, now: float) -> Deferred[list[dict[str, Any]]]: ...

    def revoke_token(self, token_id: str, now: float) -> Deferred[dict[str, Any] | None]: ...

    def list_devices(self) -> Deferred[list[dict[str, Any]]]: ...

    def revoke_device(self, device_id: str, now: float) -> Deferred[dict[str, Any] | None]: ...

    # activity
    def recent_events(self, before_id: int, limit: int) -> Deferred[list[str]]: ...

    def kept_events(self, limit: int) -> Deferred[list[tuple[Any, ...]]]: ...

    def recent_audit(self, limit: int) -> Deferred[list[tuple[Any, ...]]]: ...
