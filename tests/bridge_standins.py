"""Local stand-ins for the chat platforms the bridges talk to, and a tiny IRC server.

``PlatformStandIn`` is one ``twisted.web`` resource that answers every path and records each
request (method, path, lower-cased headers, raw body, parsed JSON); what it answers depends on
the path, like the real APIs (Telegram ``/bot<token>/sendMessage`` → ``{"ok": true, …}``,
Slack ``/chat.postMessage`` → ``{"ok": true}``, Discord follow-ups → a message object).
``fail_next(n, status)`` makes the next ``n`` requests fail, for retry tests; ``always_fail``
makes every one fail, ``hang`` leaves every one unanswered. ``wait_for(n)`` waits (bounded) until ``n`` requests have arrived::

    api = PlatformStandIn()
    server = listen(api)            # server.url = "http://127.0.0.1:N"
    try:
        ...                         # point a bridge's api_base (or url) at server.url
        [req] = await api.wait_for(1)
    finally:
        await server.stop()         # hangs up every connection, stops listening

``IrcServer`` speaks just enough of the IRC server side (``twisted.words.protocols.irc.IRC``)
for a client to register, join channels and exchange PRIVMSGs; ``say`` injects a message from
a user, ``wait_for_message`` waits for what the bot says.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Factory
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.words.protocols import irc


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def wait_until(check: Callable[[], Any], timeout: float = 5.0, what: str = "it") -> Any:
    """Poll ``check`` on the reactor until it returns something truthy; fail after ``timeout``."""
    from twisted.internet.task import deferLater

    reactor = _reactor()
    deadline = reactor.seconds() + timeout
    while True:
        value = check()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


async def wait_until_async(
    check: Callable[[], Awaitable[Any]], timeout: float = 5.0, what: str = "it"
) -> Any:
    """Like :func:`wait_until` for a check that has to wait (an HTTP call, a store read)."""
    from twisted.internet.task import deferLater

    reactor = _reactor()
    deadline = reactor.seconds() + timeout
    while True:
        value = await check()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


# -- HTTP ----------------------------------------------------------------------------------------


@attrs.define
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class PlatformStandIn(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Recorded] = []
        self._failures: list[int] = []
        self.always_fail: int | None = None
        #: never answer (timeout tests); the connection stays open until :meth:`stop`
        self.hang = False

    def fail_next(self, n: int, status: int = 500) -> None:
        self._failures.extend([status] * n)

    def to(self, fragment: str) -> list[Recorded]:
        return [r for r in self.requests if fragment in r.path]

    async def wait_for(self, n: int, fragment: str = "", timeout: float = 5.0) -> list[Recorded]:
        def enough() -> list[Recorded] | None:
            found = self.to(fragment)
            return found if len(found) >= n else None

        found: list[Recorded] = await wait_until(enough, timeout, f"{n} request(s) to {fragment!r}")
        return found

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        content = request.content
        body = content.read() if content is not None else b""
        headers = {
            k.decode("latin-1").lower(): b", ".join(v).decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        path = request.path.decode("latin-1")
        self.requests.append(Recorded(request.method.decode("ascii"), path, headers, body))
        if self.hang:
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        if self.always_fail is not None or self._failures:
            status = self.always_fail if self.always_fail is not None else self._failures.pop(0)
            request.setResponseCode(status)
            return b'{"ok":false,"error":"scripted failure"}'
        return json.dumps(self.answer(path, body)).encode()

    def answer(self, path: str, body: bytes) -> Any:
        """What the real API says on success."""
        if path.endswith("/sendMessage"):
            return {"ok": True, "result": {"message_id": len(self.requests)}}
        if path.endswith("/chat.postMessage"):
            return {"ok": True, "ts": f"{len(self.requests)}.000100"}
        if "/webhooks/" in path or path.endswith("/messages"):
            return {"id": str(len(self.requests)), "content": json.loads(body).get("content")}
        return {}


class _Channel(HTTPChannel):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.open[self] = Deferred()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        lost = self.site.open.pop(self, None)
        if lost is not None:
            lost.callback(None)


class _Site(Site):
    protocol = _Channel
    noisy = False

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.open: dict[HTTPChannel, Deferred[None]] = {}

    def log(self, request: Any) -> None:
        pass


@attrs.define
class Listening:
    port: Any
    url: str

    def stop(self) -> Deferred[Any]:
        site = self.port.factory
        waits: list[Deferred[Any]] = list(site.open.values())
        for channel in list(site.open):
            if channel.transport is not None:
                channel.transport.abortConnection()
        stopped = self.port.stopListening()
        if isinstance(stopped, Deferred):
            waits.append(stopped)
        return DeferredList(waits, consumeErrors=True)


def listen(resource: Resource) -> Listening:
    port = _reactor().listenTCP(0, _Site(resource), interface="127.0.0.1")
    return Listening(port, f"http://127.0.0.1:{port.getHost().port}")


# -- IRC -----------------------------------------------------------------------------------------


class _IrcServerProtocol(irc.IRC):
    nick = "*"

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self.factory.clients.append(self)

    def connectionLost(self, reason: Any) -> None:
        if self in self.factory.clients:
            self.factory.clients.remove(self)

    def irc_NICK(self, prefix: str, params: list[str]) -> None:
        self.nick = params[0]

    def irc_USER(self, prefix: str, params: list[str]) -> None:
        self.sendLine(f":irc.test 001 {self.nick} :Welcome to the test network")

    def irc_JOIN(self, prefix: str, params: list[str]) -> None:
        for channel in params[0].split(","):
            self.factory.joined.append((self.nick, channel))
            self.sendLine(f":{self.nick}!bot@127.0.0.1 JOIN {channel}")

    def irc_PRIVMSG(self, prefix: str, params: list[str]) -> None:
        self.factory.messages.append((self.nick, params[0], params[-1]))

    def irc_PING(self, prefix: str, params: list[str]) -> None:
        self.sendLine(f":irc.test PONG irc.test :{params[-1] if params else ''}")

    def irc_unknown(self, prefix: str, command: str, params: list[str]) -> None:
        pass


class IrcServer(Factory):
    protocol = _IrcServerProtocol

    def __init__(self) -> None:
        self.clients: list[_IrcServerProtocol] = []
        self.joined: list[tuple[str, str]] = []
        self.messages: list[tuple[str, str, str]] = []
        self.port: Any = None

    def start(self) -> str:
        """Listen on 127.0.0.1:0; the client endpoint string for the bridge."""
        self.port = _reactor().listenTCP(0, self, interface="127.0.0.1")
        return f"tcp:127.0.0.1:{self.port.getHost().port}"

    def say(self, mask: str, target: str, text: str) -> None:
        """Deliver ``PRIVMSG target :text`` from ``mask`` (``alice!a@host``) to every client."""
        for client in self.clients:
            client.sendLine(f":{mask} PRIVMSG {target} :{text}")

    async def wait_for_message(self, fragment: str, timeout: float = 5.0) -> tuple[str, str, str]:
        def find() -> tuple[str, str, str] | None:
            return next((m for m in self.messages if fragment in m[2]), None)

        found: tuple[str, str, str] = await wait_until(find, timeout, f"IRC message {fragment!r}")
        return found

    async def stop(self) -> None:
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abortConnection()
        if self.port is not None:
            await self.port.stopListening()
