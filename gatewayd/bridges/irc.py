"""IRC through ``twisted.words``: join channels, answer messages that address the nick.

The connection is a ``ClientService`` over any client endpoint string (``tcp:host:6667``,
``tls:host:6697``), so it reconnects with back-off on its own. In a channel the bot answers
lines that start with its nick (``gatewayd: hello``), prefixing its answer with the asker's
nick; a private message needs no prefix. The conversation (and session) is the channel, or
the nick for private messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols import irc

from gatewayd.bridges.base import BUSY, REFUSAL, BaseBridge, chunks
from gatewayd.bridges.http import DeliveryError
from gatewayd.config import ConfigError
from gatewayd.config import IrcBridge as IrcConfig
from gatewayd.errors import GatewayError
from gatewayd.store.records import Run

if TYPE_CHECKING:
    from gatewayd.bridges import BridgeManager

_log = Logger()
#: at most this many lines per answer, so one long reply cannot flood a channel
MAX_LINES = 20


class _Client(irc.IRCClient):
    def __init__(self, bridge: IrcBridge) -> None:
        self.bridge = bridge
        self.nickname: str = bridge.config.nick
        self.realname = "gatewayd"  # type: ignore[assignment]
        self.lineRate = None

    def _createHeartbeat(self) -> LoopingCall:
        call = LoopingCall(self._sendHeartbeat)
        call.clock = self.bridge.gw.clock
        return call

    def lineReceived(self, line: bytes | str) -> None:
        # the base class decodes strictly: one bad byte from the server would drop the link
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        super().lineReceived(line)

    def signedOn(self) -> None:
        for channel in self.bridge.config.channels:
            self.join(channel)
        self.bridge.connected(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.bridge.disconnected(self)

    def privmsg(self, user: str, channel: str, message: str) -> None:
        self.bridge.on_privmsg(self, user, channel, message)


class _ClientFactory(Factory):
    def __init__(self, bridge: IrcBridge) -> None:
        self.bridge = bridge

    def buildProtocol(self, addr: Any) -> _Client:
        client = _Client(self.bridge)
        client.factory = self
        return client


class IrcBridge(BaseBridge):
    kind = "irc"
    max_message = 400

    def __init__(self, manager: BridgeManager, config: IrcConfig) -> None:
        super().__init__(
            manager,
            default_target=config.default_target,
            allowed_users=config.allowed_users,
            tools=config.tools,
        )
        self.config = config
        try:
            endpoint = clientFromString(self.gw.reactor, config.endpoint)
        except Exception as e:  # a bad endpoint string is a config error, said in one line
            raise ConfigError(f"bridges.irc.endpoint: {e}") from None
        self._service = ClientService(endpoint, _ClientFactory(self), clock=self.gw.clock)
        self._client: _Client | None = None
        self._state = "stopped"

    @property
    def state(self) -> str:
        return self._state

    def startService(self) -> None:
        super().startService()
        self._state = "connecting"
        self._service.startService()

    def stopService(self) -> Deferred[None]:
        if self._client is not None:
            self._client.quit("gatewayd is stopping")
        waiting = super().stopService()
        stopped: Deferred[None] = self._service.stopService()

        def done(_: Any) -> Deferred[None]:
            self._state = "stopped"
            return waiting

        return stopped.addBoth(done)

    # -- connection --------------------------------------------------------------------------

    def connected(self, client: _Client) -> None:
        self._client = client
        self._state = "connected"
        _log.info("bridge irc: signed on as {nick}", nick=client.nickname)

    def disconnected(self, client: _Client) -> None:
        if self._client is client:
            self._client = None
        if self.running:
            self._state = "connecting"

    # -- inbound -----------------------------------------------------------------------------

    def on_privmsg(self, client: _Client, user: str, channel: str, message: str) -> None:
        nick = user.split("!", 1)[0]
        me = client.nickname
        if channel.lower() == me.lower():  # a private message
            conversation, target, prefix = nick, nick, ""
            text = message
        else:
            addressed = _addressed(message, me)
            if addressed is None:
                return
            text = addressed
            conversation, target, prefix = channel, channel, f"{nick}: "
        if not text.strip():
            return
        self.note_received()
        if not self.is_allowed(nick, user):
            self.spawn(self.send(target, prefix + REFUSAL), "refusal")
            return
        self.spawn(self._start(conversation, text, target, prefix), "irc message")

    async def _start(self, conversation: str, text: str, target: str, prefix: str) -> None:
        try:
            await self.start_run(conversation, text, target=target, context=prefix or None)
        except GatewayError as e:
            await self.send(target, f"{prefix}{BUSY}: {e.message}")

    async def deliver_run(self, run: Run, target: str, text: str) -> None:
        prefix = self.reply_context.pop(run.id, None) or ""
        await self.send(target, prefix + text, run)

    # -- outbound ----------------------------------------------------------------------------

    async def _send(self, target: str, text: str, run: Run | None) -> str:
        client = self._client
        if client is None:
            raise DeliveryError("not connected to the IRC server")
        lines = [line for line in text.splitlines() if line.strip()]
        pieces = [p for line in lines for p in chunks(line, self.max_message)]
        if len(pieces) > MAX_LINES:
            pieces = [*pieces[: MAX_LINES - 1], "[…]"]
        for piece in pieces:
            client.msg(target, piece)
        return "sent"


def _addressed(message: str, nick: str) -> str | None:
    """The text after ``nick:`` / ``nick,`` at the start of a line, or None."""
    head = message[: len(nick)]
    rest = message[len(nick) :]
    if head.lower() != nick.lower() or not rest or rest[0] not in ":, ":
        return None
    return rest[1:].lstrip(" :,")
