"""Tool calls that wait for a person: stored, announced, resolved once, or expired."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from gatewayd.agent.base import ToolCall
from gatewayd.auth import Principal, new_id
from gatewayd.errors import GatewayError

if TYPE_CHECKING:
    from gatewayd.core import Gateway
    from gatewayd.runs import LiveRun

_log = Logger()


class Approvals:
    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        #: approval id -> (the run's waiter, the expiry timer, the live run)
        self._pending: dict[str, tuple[Deferred[tuple[str, str | None]], Any, LiveRun]] = {}

    async def request(self, live: LiveRun, call: ToolCall) -> tuple[str, str | None]:
        """Ask and wait; returns ``(status, reason)``: approved, denied, expired or cancelled."""
        gw = self._gw
        now = gw.clock.seconds()
        approval_id = new_id("apr")
        try:
            await gw.store.create_approval(
                {
                    "id": approval_id,
                    "run_id": live.run.id,
                    "session_id": live.run.session_id,
                    "owner": live.run.owner,
                    "tool": call.name,
                    "input": call.input,
                    "status": "pending",
                    "created_at": now,
                }
            )
        except CancelledError:
            # aborted while the row was being written: the (serial) writer stores it anyway,
            # so close it at once rather than leave it pending until the next restart
            gw.store.resolve_approval(
                approval_id, "cancelled", "run aborted", None, gw.clock.seconds()
            )
            raise

        def cancelled(d: Deferred[tuple[str, str | None]]) -> None:
            self._settle(approval_id, "cancelled", "run aborted", None)

        waiter: Deferred[tuple[str, str | None]] = Deferred(cancelled)
        timer = gw.clock.callLater(
            gw.config.agent.approval_timeout_s,
            self._settle,
            approval_id,
            "expired",
            "no decision in time",
            None,
        )
        self._pending[approval_id] = (waiter, timer, live)
        gw.publish_run_event(
            live, "approval_requested", approval_id=approval_id, tool=call.name, input=call.input
        )
        return await waiter

    def _settle(
        self, approval_id: str, status: str, reason: str | None, by: str | None
    ) -> Deferred[bool]:
        """Record the outcome once; the in-memory entry makes the first resolve win."""
        entry = self._pending.pop(approval_id, None)
        gw = self._gw
        d = gw.store.resolve_approval(approval_id, status, reason, by, gw.clock.seconds())
        if entry is None:
            return d
        waiter, timer, live = entry
        if timer.active():
            timer.cancel()
        decision = "approve" if status == "approved" else "deny"
        gw.publish_run_event(
            live,
            "approval_resolved",
            approval_id=approval_id,
            decision=decision,
            reason=reason,
            status=status,
        )
        if not waiter.called and status != "cancelled":
            # a cancelled waiter is being cancelled by its run: Deferred.cancel errbacks it
            waiter.callback((status, reason))
        return d

    async def resolve(
        self, principal: Principal, approval_id: str, decision: str, reason: str | None
    ) -> dict[str, Any]:
        gw = self._gw
        approval = await gw.store.get_approval(approval_id)
        if approval is None or not principal.owns(approval["owner"]):
            raise GatewayError("not_found", "no such approval")
        if approval["status"] != "pending" or approval_id not in self._pending:
            state = approval["status"]
            why = f"already {state}" if state != "pending" else "no longer awaiting a decision"
            raise GatewayError("conflict", f"approval {why}")
        status = "approved" if decision == "approve" else "denied"
        changed = await self._settle(approval_id, status, reason, principal.token_id)
        if not changed:
            raise GatewayError("conflict", "approval already resolved")
        gw.audit(principal, f"approval.{decision}", approval_id)
        result = await gw.store.get_approval(approval_id)
        assert result is not None
        return result

    def cancel_for_run(self, run_id: str) -> None:
        for approval_id, (_, _, live) in list(self._pending.items()):
            if live.run.id == run_id:
                self._pending[approval_id][0].cancel()
