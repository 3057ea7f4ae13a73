"""Discord: interactions in (Ed25519), answered by a deferred response and a follow-up.

Discord wants an answer within three seconds, so a slash command gets ``{"type": 5}``
(deferred) at once and the run's answer follows as ``POST
{api_base}/webhooks/<application_id>/<interaction token>``. The interaction token is a
short-lived credential: it is kept in memory only (never in the run's channel, which is
stored) and scrubbed from errors. Answers to other runs with a ``discord`` channel go to a
channel id through the bot API, which needs ``bot_token``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.iweb import IRequest

from gatewayd.bridges.base import (
    REFUSAL,
    BaseBridge,
    chunks,
    json_object,
    read_body,
    reply_error,
    reply_json,
)
from gatewayd.bridges.http import DeliveryError, Response
from gatewayd.config import ConfigError
from gatewayd.config import DiscordBridge as DiscordConfig
from gatewayd.errors import GatewayError, invalid
from gatewayd.store.records import Run
from gatewayd.webhooks import check_discord_public_key, verify_discord

if TYPE_CHECKING:
    from gatewayd.bridges import BridgeManager

PATH = "/bridges/discord/interactions"
PING, APPLICATION_COMMAND = 1, 2
PONG, CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE = 1, 4, 5
STRING_OPTION = 3
EPHEMERAL = 64


class DiscordBridge(BaseBridge):
    kind = "discord"
    path = PATH
    max_message = 2000

    def __init__(self, manager: BridgeManager, config: DiscordConfig) -> None:
        try:
            check_discord_public_key(config.public_key)
        except ValueError as e:
            raise ConfigError(f"bridges.discord.public_key: {e}") from None
        super().__init__(
            manager,
            default_target=config.default_target,
            allowed_users=config.allowed_users,
            tools=config.tools,
            secrets=(config.bot_token,),
        )
        self.config = config
        self._api = config.api_base.rstrip("/")

    async def _handle(self, request: IRequest) -> bytes:
        body = read_body(request)
        try:
            verify_discord(
                self.config.public_key,
                request.requestHeaders,
                body,
                now=self.gw.clock.seconds(),
            )
        except GatewayError as e:
            self.rejected(e)
            return reply_error(request, e)
        try:
            doc = json_object(body)
        except GatewayError as e:
            return reply_error(request, e)
        kind = doc.get("type")
        if kind == PING:
            return reply_json(request, 200, {"type": PONG})
        if kind != APPLICATION_COMMAND:
            return reply_error(request, invalid("unsupported interaction type"))
        data = doc.get("data")
        if not isinstance(data, dict):
            data = {}
        token = doc.get("token")
        if not isinstance(token, str) or not token:
            return reply_error(request, invalid("the interaction has no token"))
        self.note_received()
        text = " ".join(_string_options(data.get("options"))).strip()
        if not text:
            name = data.get("name")
            text = name if isinstance(name, str) else ""
        if not text:
            return _say(request, "Say something after the command.")
        if not self.is_allowed(_user_id(doc)):
            self.count("refused")
            return _say(request, REFUSAL)
        channel = doc.get("channel_id")
        if not isinstance(channel, str) or not channel:
            nested = doc.get("channel")
            channel = nested.get("id") if isinstance(nested, dict) else None
        conversation = channel if isinstance(channel, str) and channel else f"user-{_user_id(doc)}"
        try:
            await self.start_run(conversation, text, target=conversation, context=token)
        except GatewayError as e:
            self.count(e.code)
            return _say(request, f"Sorry, I cannot take this right now: {e.message}")
        self.count("accepted")
        return reply_json(request, 200, {"type": DEFERRED_CHANNEL_MESSAGE})

    async def deliver_run(self, run: Run, target: str, text: str) -> None:
        token = self.reply_context.pop(run.id, None)
        if token is None:
            await self.send(target, text, run)
            return
        url = f"{self._api}/webhooks/{self.config.application_id}/{token}"
        try:
            for piece in chunks(text, self.max_message):
                resp = await self.post_json(
                    url, {"content": piece}, what="interaction follow-up", secrets=(token,)
                )
                _check(resp, "interaction follow-up")
        except DeliveryError as e:
            self.note_error(str(e))
            raise
        self.note_sent()

    async def _send(self, target: str, text: str, run: Run | None) -> str:
        if not self.config.bot_token:
            raise DeliveryError("posting to a Discord channel needs bridges.discord.bot_token")
        url = f"{self._api}/channels/{target}/messages"
        for piece in chunks(text, self.max_message):
            resp = await self.post_json(
                url,
                {"content": piece},
                what="channel message",
                headers={"Authorization": f"Bot {self.config.bot_token}"},
            )
            _check(resp, "channel message")
        return "sent"


def _check(resp: Response, what: str) -> None:
    if not 200 <= resp.code < 300:
        doc = resp.json()
        why = doc.get("message") if isinstance(doc, dict) else None
        detail = f": {str(why)[:100]}" if why else ""
        raise DeliveryError(f"{what} answered HTTP {resp.code}{detail}")


def _say(request: IRequest, text: str) -> bytes:
    """An immediate, ephemeral answer (refusals and errors)."""
    return reply_json(
        request, 200, {"type": CHANNEL_MESSAGE, "data": {"content": text, "flags": EPHEMERAL}}
    )


def _user_id(doc: dict[str, Any]) -> str | None:
    member = doc.get("member")
    user = member.get("user") if isinstance(member, dict) else None
    if not isinstance(user, dict):
        user = doc.get("user")
    uid = user.get("id") if isinstance(user, dict) else None
    return uid if isinstance(uid, str) else None


def _string_options(options: Any, depth: int = 0) -> list[str]:
    """String option values in order, through sub-commands and groups."""
    out: list[str] = []
    if not isinstance(options, list) or depth > 3:
        return out
    for option in options:
        if not isinstance(option, dict):
            continue
        if option.get("type") == STRING_OPTION and isinstance(option.get("value"), str):
            out.append(option["value"])
        out.extend(_string_options(option.get("options"), depth + 1))
    return out
