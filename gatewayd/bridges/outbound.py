"""The outbound webhook: Standard-Webhooks-signed POSTs, retried, then dead-lettered.

Each message gets one id (``webhook-id``) kept across its retries, so a receiver can drop
duplicates, and is signed afresh for each attempt (the timestamp moves). Attempt ``n`` that
fails waits ``backoff_base_s * 2**(n-1)`` on the gateway's clock; after ``max_attempts``
the message goes to the store's ``dead_letters`` table, where operators can list and replay
it. A message still waiting when the gateway stops is dead-lettered too, so none is lost.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from gatewayd.auth import new_id
from gatewayd.bridges.base import BaseBridge
from gatewayd.bridges.http import DeliveryError
from gatewayd.bridges.records import (
    DeadLetter,
    add_dead_letter,
    delete_dead_letter,
    get_dead_letter,
    update_dead_letter,
)
from gatewayd.config import ConfigError, http_url
from gatewayd.config import OutboundWebhookBridge as OutboundConfig
from gatewayd.errors import GatewayError, not_found
from gatewayd.schedule import rfc3339
from gatewayd.store.records import Run
from gatewayd.webhooks import check_scheme, standard_webhook_headers

if TYPE_CHECKING:
    from gatewayd.bridges import BridgeManager

_log = Logger()


class OutboundWebhook(BaseBridge):
    kind = "webhook"
    has_users = False

    def __init__(self, manager: BridgeManager, config: OutboundConfig) -> None:
        try:
            check_scheme("standard", config.secret)
        except ValueError as e:
            raise ConfigError(f"bridges.webhook.secret: {e}") from None
        if not _is_http(config.url):
            raise ConfigError("bridges.webhook.url: must be an http:// or https:// URL")
        super().__init__(
            manager,
            default_target=config.default_target or config.url,
            secrets=(config.secret,),
        )
        self.config = config

    # -- sending -----------------------------------------------------------------------------

    async def _send(self, target: str, text: str, run: Run | None) -> str:
        if not _is_http(target):
            raise DeliveryError("the webhook target must be an http:// or https:// URL")
        payload: dict[str, Any] = {
            "type": "message",
            "channel": self.kind,
            "text": text,
            "timestamp": rfc3339(self.gw.clock.seconds()),
        }
        if run is not None:
            payload.update(run_id=run.id, session_id=run.session_id, source=run.source)
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        msg_id = new_id("msg")
        error = await self._attempt(target, msg_id, body)
        if error is None:
            return "sent"
        if self.config.max_attempts <= 1 or self.stopping:
            await self._dead_letter(target, msg_id, body, 1, error)
            raise DeliveryError(f"{error} (dead-lettered as {msg_id})")
        self.note_error(error)
        self.spawn(self._retry(target, msg_id, body, error), f"delivery {msg_id}")
        return "queued"

    async def _attempt(self, url: str, msg_id: str, body: str) -> str | None:
        """One signed POST; None on a 2xx answer, else why it failed."""
        raw = body.encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            **standard_webhook_headers(
                self.config.secret, msg_id, int(self.gw.clock.seconds()), raw
            ),
        }
        try:
            resp = await self.manager.http.post(
                url, raw, headers, what="webhook", secrets=self.secrets
            )
        except DeliveryError as e:
            return str(e)
        if 200 <= resp.code < 300:
            return None
        return f"webhook answered HTTP {resp.code}"

    async def _retry(self, url: str, msg_id: str, body: str, error: str) -> None:
        attempt = 1
        while attempt < self.config.max_attempts:
            try:
                await self.sleep(self.config.backoff_base_s * 2 ** (attempt - 1))
            except CancelledError:
                error = f"{error}; the gateway stopped before the next try"
                break
            attempt += 1
            failed = await self._attempt(url, msg_id, body)
            if failed is None:
                self.note_sent()
                return
            error = failed
            self.note_error(error)
            if self.stopping:
                break
        await self._dead_letter(url, msg_id, body, attempt, error)

    async def _dead_letter(
        self, url: str, msg_id: str, body: str, attempts: int, error: str
    ) -> None:
        _log.warn(
            "bridge webhook: message {id} dead-lettered after {n} attempts", id=msg_id, n=attempts
        )
        letter = DeadLetter(msg_id, url, body, attempts, error[:300], self.gw.clock.seconds())
        await add_dead_letter(self.gw.store, letter)

    # -- dead letters ------------------------------------------------------------------------

    async def replay(self, letter_id: str) -> dict[str, Any]:
        """Try a dead letter once more now; it leaves the list when it is delivered."""
        letter = await get_dead_letter(self.gw.store, letter_id)
        if letter is None:
            raise not_found("no such dead letter")
        error = await self._attempt(letter.target, letter.id, letter.body)
        if error is None:
            await delete_dead_letter(self.gw.store, letter.id)
            self.note_sent()
            return {"id": letter.id, "status": "delivered", "attempts": letter.attempts + 1}
        self.note_error(error)
        await update_dead_letter(self.gw.store, letter.id, letter.attempts + 1, error[:300])
        raise GatewayError("unavailable", f"the replay failed too: {error}", data={"id": letter.id})


def _is_http(url: str) -> bool:
    """The same rule as the config's URLs (scheme, ASCII host, a valid port)."""
    return bool(url) and http_url(url) is None


def dead_letter_view(letter: DeadLetter) -> dict[str, Any]:
    try:
        payload: Any = json.loads(letter.body)
    except ValueError:
        payload = letter.body
    return {
        "id": letter.id,
        "channel": "webhook",
        "target": letter.target,
        "attempts": letter.attempts,
        "last_error": letter.last_error,
        "created_at": rfc3339(letter.created_at),
        "payload": payload,
    }
