"""Slack: the Events API in (v0 signatures), answers out with ``chat.postMessage``.

Slack re-sends an event it thinks we missed; the ``event_id`` goes through the same replay
cache as webhook deliveries, so a retry never starts a second run. The bot's own messages
(and every message with a subtype: edits, joins, bot posts) are ignored, or the bot would
answer itself. A message in a thread is its own conversation, answered in that thread; the
target is then ``<channel>/<thread_ts>``.
"""

from __future__ import annotations

import re
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
from gatewayd.bridges.records import claim_delivery, delivery_key
from gatewayd.config import SlackBridge as SlackConfig
from gatewayd.errors import GatewayError
from gatewayd.store.records import Run
from gatewayd.webhooks import verify

if TYPE_CHECKING:
    from gatewayd.bridges import BridgeManager

PATH = "/bridges/slack/events"
_LEADING_MENTIONS = re.compile(r"^\s*(?:<@[A-Za-z0-9]+>[\s,:]*)+")


class SlackBridge(BaseBridge):
    kind = "slack"
    path = PATH
    max_message = 3500

    def __init__(self, manager: BridgeManager, config: SlackConfig) -> None:
        super().__init__(
            manager,
            default_target=config.default_target,
            allowed_users=config.allowed_users,
            tools=config.tools,
            secrets=(config.bot_token, config.signing_secret),
        )
        self.config = config
        self._api = config.api_base.rstrip("/")

    async def _handle(self, request: IRequest) -> bytes:
        body = read_body(request)
        try:
            verify(
                "slack",
                self.config.signing_secret,
                request.requestHeaders,
                body,
                now=self.gw.clock.seconds(),
                max_age_s=self.config.max_age_s,
            )
        except GatewayError as e:
            self.rejected(e)
            return reply_error(request, e)
        try:
            doc = json_object(body)
        except GatewayError as e:
            return reply_error(request, e)
        kind = doc.get("type")
        if kind == "url_verification":
            challenge = doc.get("challenge")
            return reply_json(
                request, 200, {"challenge": challenge if isinstance(challenge, str) else ""}
            )
        event = doc.get("event")
        if kind != "event_callback" or not isinstance(event, dict):
            return reply_json(request, 200, {})
        if self._ignored(event, doc):
            return reply_json(request, 200, {})
        text, channel, user = event.get("text"), event.get("channel"), event.get("user")
        if not (isinstance(text, str) and isinstance(channel, str) and channel):
            return reply_json(request, 200, {})
        text = _LEADING_MENTIONS.sub("", text)
        if not text.strip():
            return reply_json(request, 200, {})
        event_id = doc.get("event_id")
        if isinstance(event_id, str) and event_id:
            fresh = await claim_delivery(
                self.gw.store, "bridge:slack", delivery_key(event_id), self.gw.clock.seconds()
            )
            if not fresh:
                self.count("duplicate")
                return reply_json(request, 200, {})
        self.note_received()
        thread = event.get("thread_ts")
        target = f"{channel}/{thread}" if isinstance(thread, str) and thread else channel
        if not self.is_allowed(user if isinstance(user, str) else None):
            self.count("refused")
            self.refuse(target)
            return reply_json(request, 200, {})
        try:
            await self.start_run(target, text, target=target)
            self.count("accepted")
        except GatewayError as e:
            self.count(e.code)
            self.spawn(self.send(target, f"{BUSY}: {e.message}"), "busy reply")
        return reply_json(request, 200, {})

    @staticmethod
    def _ignored(event: dict[str, Any], doc: dict[str, Any]) -> bool:
        if event.get("type") not in ("message", "app_mention"):
            return True
        if event.get("bot_id") or event.get("subtype") or event.get("bot_profile"):
            return True
        auths = doc.get("authorizations")
        bots = {
            a.get("user_id")
            for a in (auths if isinstance(auths, list) else ())
            if isinstance(a, dict) and a.get("is_bot")
        }
        return bool(event.get("user")) and event.get("user") in bots

    async def _send(self, target: str, text: str, run: Run | None) -> str:
        channel, _, thread = target.partition("/")
        for piece in chunks(text, self.max_message):
            payload: dict[str, Any] = {"channel": channel, "text": piece}
            if thread:
                payload["thread_ts"] = thread
            resp = await self.post_json(
                f"{self._api}/chat.postMessage",
                payload,
                what="chat.postMessage",
                headers={"Authorization": f"Bearer {self.config.bot_token}"},
            )
            doc = resp.json()
            if resp.code != 200 or not (isinstance(doc, dict) and doc.get("ok") is True):
                why = doc.get("error") if isinstance(doc, dict) else None
                detail = f": {str(why)[:100]}" if why else ""
                raise DeliveryError(f"chat.postMessage answered HTTP {resp.code}{detail}")
        return "sent"
