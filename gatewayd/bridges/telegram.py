"""Telegram: updates in by webhook (secret token header), answers out with ``sendMessage``.

The bot token is part of every Bot API URL, so it is scrubbed from every error and never
logged; the webhook's secret token is compared in constant time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.iweb import IRequest

from gatewayd.bridges.base import (
    BUSY,
    BaseBridge,
    chunks,
    json_object,
    read_body,
    reply_error,
    reply_json,
)
from gatewayd.bridges.http import DeliveryError
from gatewayd.bridges.records import claim_delivery
from gatewayd.config import TelegramBridge as TelegramConfig
from gatewayd.errors import GatewayError
from gatewayd.store.records import Run
from gatewayd.webhooks import verify_telegram

if TYPE_CHECKING:
    from gatewayd.bridges import BridgeManager

PATH = "/bridges/telegram"


class TelegramBridge(BaseBridge):
    kind = "telegram"
    path = PATH
    max_message = 4096

    def __init__(self, manager: BridgeManager, config: TelegramConfig) -> None:
        super().__init__(
            manager,
            default_target=config.default_target,
            allowed_users=config.allowed_users,
            tools=config.tools,
            secrets=(config.bot_token, config.webhook_secret_token),
        )
        self.config = config
        self._api = config.api_base.rstrip("/")

    async def _handle(self, request: IRequest) -> bytes:
        try:
            verify_telegram(self.config.webhook_secret_token, request.requestHeaders)
        except GatewayError as e:
            self.rejected(e)
            return reply_error(request, e)
        try:
            update = json_object(read_body(request))
        except GatewayError as e:
            return reply_error(request, e)
        message = update.get("message")
        if not isinstance(message, dict):
            return reply_json(request, 200, {})  # edits, joins, callbacks: nothing to say
        text = message.get("text")
        chat = message.get("chat")
        if not isinstance(text, str) or not text.strip() or not isinstance(chat, dict):
            return reply_json(request, 200, {})
        chat_id = _ident(chat.get("id"))
        if chat_id is None:
            return reply_json(request, 200, {})
        update_id = update.get("update_id")
        if isinstance(update_id, int) and not isinstance(update_id, bool):
            fresh = await claim_delivery(
                self.gw.store, "bridge:telegram", str(update_id), self.gw.clock.seconds()
            )
            if not fresh:  # Telegram retries an update it thinks we missed
                self.count("duplicate")
                return reply_json(request, 200, {})
        self.note_received()
        sender = message.get("from")
        sender = sender if isinstance(sender, dict) else {}
        user_id = _ident(sender.get("id"))
        username = sender.get("username") if isinstance(sender.get("username"), str) else None
        if not self.is_allowed(user_id, username, f"@{username}" if username else None):
            self.count("refused")
            self.refuse(chat_id)
            return reply_json(request, 200, {})
        try:
            await self.start_run(chat_id, text, target=chat_id)
            self.count("accepted")
        except GatewayError as e:
            self.count(e.code)
            self.spawn(self.send(chat_id, f"{BUSY}: {e.message}"), "busy reply")
        return reply_json(request, 200, {})

    async def _send(self, target: str, text: str, run: Run | None) -> str:
        url = f"{self._api}/bot{self.config.bot_token}/sendMessage"
        chat_id: int | str = int(target) if _is_int(target) else target
        for piece in chunks(text, self.max_message):
            resp = await self.post_json(
                url, {"chat_id": chat_id, "text": piece}, what="sendMessage"
            )
            doc = resp.json()
            ok = isinstance(doc, dict) and doc.get("ok") is True
            if resp.code != 200 or not ok:
                why = doc.get("description") if isinstance(doc, dict) else None
                detail = f": {str(why)[:200]}" if why else ""
                raise DeliveryError(f"sendMessage answered HTTP {resp.code}{detail}")
        return "sent"


def _ident(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value:
        return value
    return None


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit() and len(text) < 30
