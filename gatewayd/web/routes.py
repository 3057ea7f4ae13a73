"""The REST route table: each row maps a method and a path onto one core operation.

Kept apart from the Klein wiring so the OpenAPI document, the body-limit table and the
metrics' route templates all read the same rows.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Route:
    method: str
    path: str  # Klein syntax: /api/runs/<run_id>
    op: str
    #: public routes need no credentials
    public: bool = False
    #: the body cap for this route; None = gateway.body_limits by prefix
    body_limit: int | None = None
    summary: str = ""

    @property
    def template(self) -> str:
        """The OpenAPI / metrics form: /api/runs/{run_id}."""
        return self.path.replace("<", "{").replace(">", "}")


ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/health", "health", public=True),
    Route("GET", "/api/status", "status"),
    Route("POST", "/api/token/validate", "token.validate"),
    Route("POST", "/api/tickets", "tickets.create"),
    Route("POST", "/api/chat", "chat.send"),
    Route("POST", "/api/message", "chat.send"),
    Route("POST", "/api/agent/wait", "agent.wait"),
    Route("POST", "/api/agent", "agent"),
    Route("GET", "/api/runs/<run_id>", "runs.get"),
    Route("POST", "/api/runs/<run_id>/abort", "runs.abort"),
    Route("GET", "/api/sessions", "sessions.list"),
    Route("POST", "/api/sessions", "sessions.create"),
    Route("GET", "/api/sessions/<session_id>", "sessions.get"),
    Route("PATCH", "/api/sessions/<session_id>", "sessions.patch"),
    Route("DELETE", "/api/sessions/<session_id>", "sessions.delete"),
    Route("POST", "/api/sessions/<session_id>/reset", "sessions.reset"),
    Route("POST", "/api/sessions/<session_id>/abort", "sessions.abort"),
    Route("GET", "/api/sessions/<session_id>/history", "sessions.history"),
    Route("GET", "/api/chat/history", "chat.history"),
    Route("GET", "/api/memory/search", "memory.search"),
    Route("GET", "/api/models", "models.list"),
    Route("GET", "/api/agents", "agents.list"),
    Route("GET", "/api/tools", "tools.list"),
    # tools and approvals (CONTRACT §5, §14)
    Route("POST", "/tools/invoke", "tools.invoke"),
    Route("GET", "/api/approvals", "approvals.list"),
    Route("POST", "/api/approvals/<approval_id>/approve", "approvals.approve"),
    Route("POST", "/api/approvals/<approval_id>/deny", "approvals.deny"),
    Route("POST", "/api/exec/approval/<approval_id>/approve", "approvals.approve"),
    Route("POST", "/api/exec/approval/<approval_id>/deny", "approvals.deny"),
    # tokens, devices, pairing, activity (CONTRACT §3, §5, §15)
    Route("GET", "/api/tokens", "tokens.list"),
    Route("POST", "/api/tokens", "tokens.create"),
    Route("DELETE", "/api/tokens/<token_id>", "tokens.revoke"),
    Route("GET", "/api/devices", "devices.list"),
    Route("POST", "/api/devices/pair", "devices.pair"),
    Route("DELETE", "/api/devices/<device_id>", "devices.revoke"),
    Route("POST", "/pair", "pair", public=True),
    Route("GET", "/api/activity", "activity"),
    # channels, wake and dead letters (CONTRACT §9); /hooks/<name> and /bridges/* are mounted
    # by gatewayd.web.hooks.mount (public: they authenticate by signature)
    Route("POST", "/api/hooks/wake", "wake"),
    Route("GET", "/api/channels", "channels.list"),
    Route("POST", "/api/send", "send"),
    Route("GET", "/api/dead-letters", "dead_letters.list"),
    Route("POST", "/api/dead-letters/<id>/replay", "dead_letters.replay"),
    # cron (CONTRACT §10)
    Route("GET", "/api/cron", "cron.list"),
    Route("POST", "/api/cron", "cron.add"),
    Route("GET", "/api/cron/<job_id>", "cron.get"),
    Route("PATCH", "/api/cron/<job_id>", "cron.update"),
    Route("DELETE", "/api/cron/<job_id>", "cron.remove"),
    Route("POST", "/api/cron/<job_id>/run", "cron.run"),
    Route("GET", "/api/cron/<job_id>/runs", "cron.runs"),
    # operations (CONTRACT §5, §16); the /api/config rows are served by
    # gatewayd.web.operations (ETag, If-Match, a TOML body), these rows document them
    Route("GET", "/api/config", "config.get"),
    Route("PUT", "/api/config", "config.set", body_limit=1048576),
    Route("POST", "/api/config/patch", "config.patch", body_limit=1048576),
    Route("POST", "/api/config/apply", "config.apply"),
    Route("POST", "/api/backup", "backup"),
)
