"""Who is asking: bearer tokens, roles and scopes, one-time tickets.

Every token is looked up by its SHA-256 (the only form kept for tokens made over the API),
then the digests are compared with ``hmac.compare_digest`` so the comparison itself never
depends on how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Any

import attrs

ROLE_SCOPES: dict[str, frozenset[str]] = {
    "viewer": frozenset({"read"}),
    "chat": frozenset({"chat"}),
    "operator": frozenset({"read", "chat", "operate"}),
    "admin": frozenset({"read", "chat", "operate", "admin"}),
    #: the caller of a public route: it may call only operations of scope "any"
    "anonymous": frozenset(),
}
TICKET_TTL_S = 60.0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    """A URL-safe token of 256 bits."""
    return secrets.token_urlsafe(32)


class _RandomIds:
    """64 random bits per id from ``os.urandom``, read 4 KiB at a time: two ids per
    request otherwise cost two system calls.  A forked child starts a fresh block."""

    def __init__(self, block: int = 4096) -> None:
        self._block = block
        self._lock = threading.Lock()
        self._forget()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._hex, self._at = "", 0

    def __call__(self, prefix: str) -> str:
        with self._lock:
            at = self._at
            if at + 16 > len(self._hex):
                self._hex, at = os.urandom(self._block).hex(), 0
            self._at = at + 16
            return f"{prefix}_{self._hex[at : at + 16]}"


#: a new, unguessable id: ``new_id("run")`` is ``run_`` and 16 hex digits
new_id = _RandomIds()


@attrs.frozen
class Principal:
    token_id: str
    role: str
    name: str = ""
    kind: str = "token"
    expires_at: float | None = None

    @property
    def scopes(self) -> frozenset[str]:
        return ROLE_SCOPES[self.role]

    def can(self, scope: str) -> bool:
        """``own`` is ``read`` that chat tokens may use too, over their own things only."""
        if scope == "any":
            return True
        if scope == "own":
            return "read" in self.scopes or "chat" in self.scopes
        return scope in self.scopes

    @property
    def own_only(self) -> bool:
        """Chat tokens see only the sessions, runs and events they own."""
        return self.role == "chat"

    @property
    def owner_filter(self) -> str | None:
        return self.token_id if self.own_only else None

    def owns(self, owner: str) -> bool:
        return not self.own_only or hmac.compare_digest(owner.encode(), self.token_id.encode())


ANONYMOUS = Principal(token_id="anonymous", role="anonymous", name="anonymous", kind="anonymous")


@attrs.define
class _Entry:
    digest: bytes
    principal: Principal


class TokenRegistry:
    """Static tokens (config, ``--token``, the generated admin token) and stored ones."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._static: dict[str, _Entry] = {}
        self._stored: dict[str, _Entry] = {}
        self._tickets: dict[str, tuple[float, Principal]] = {}
        self._revoke_listeners: list[Callable[[str], None]] = []

    def add_static(self, token: str, role: str, name: str, kind: str = "static") -> Principal:
        digest = hash_token(token)
        principal = Principal(token_id=f"{kind}:{digest[:16]}", role=role, name=name, kind=kind)
        self._static[digest] = _Entry(bytes.fromhex(digest), principal)
        return principal

    def replace_static(self, tokens: Iterable[tuple[str, str, str, str]]) -> None:
        """Swap the static set (config reload); tokens that vanished are revoked at once."""
        old = {e.principal.token_id for e in self._static.values()}
        self._static.clear()
        for token, role, name, kind in tokens:
            self.add_static(token, role, name, kind)
        new = {e.principal.token_id for e in self._static.values()}
        for token_id in old - new:
            self._notify_revoked(token_id)

    def add_stored(self, digest: str, principal: Principal) -> None:
        self._stored[digest] = _Entry(bytes.fromhex(digest), principal)

    def remove_stored(self, token_id: str) -> None:
        for digest, entry in list(self._stored.items()):
            if entry.principal.token_id == token_id:
                del self._stored[digest]
        self._notify_revoked(token_id)

    def on_revoke(self, listener: Callable[[str], None]) -> None:
        self._revoke_listeners.append(listener)

    def _notify_revoked(self, token_id: str) -> None:
        for listener in list(self._revoke_listeners):
            listener(token_id)

    def authenticate(self, token: str | bytes | None) -> Principal | None:
        if not token:
            return None
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                return None
        digest = hash_token(token)
        entry = self._static.get(digest) or self._stored.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, bytes.fromhex(digest)):
            return None
        expires = entry.principal.expires_at
        if expires is not None and expires <= self._clock.seconds():
            return None
        return entry.principal

    def is_live(self, token_id: str) -> bool:
        return any(
            e.principal.token_id == token_id
            for e in (*self._static.values(), *self._stored.values())
        )

    # -- one-time tickets -------------------------------------------------------------------

    def issue_ticket(self, principal: Principal) -> tuple[str, float]:
        now = self._clock.seconds()
        for ticket, (expires, _) in list(self._tickets.items()):
            if expires <= now:
                del self._tickets[ticket]
        ticket = secrets.token_urlsafe(24)
        expires_at = now + TICKET_TTL_S
        self._tickets[hash_token(ticket)] = (expires_at, principal)
        return ticket, expires_at

    def redeem_ticket(self, ticket: str | bytes | None) -> Principal | None:
        if not ticket:
            return None
        if isinstance(ticket, bytes):
            ticket = ticket.decode("ascii", "replace")
        found = self._tickets.pop(hash_token(ticket), None)
        if found is None:
            return None
        expires, principal = found
        if expires <= self._clock.seconds() or not self.is_live(principal.token_id):
            return None
        return principal
