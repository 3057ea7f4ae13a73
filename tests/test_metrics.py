"""Prometheus metrics: scrape after real traffic, parse with prometheus_client's parser."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred

from gatewayd.events import make_filter
from gatewayd.metrics import MAX_LABEL_VALUES, RouteTable
from tests.harness import ADMIN, CHAT, TOKENS_TOML, VIEWER, Running, auth, start_gateway

CONTRACT_NAMES = {
    "gatewayd_http_requests",
    "gatewayd_http_request_duration_seconds",
    "gatewayd_http_requests_in_flight",
    "gatewayd_http_rejections",
    "gatewayd_websocket_connections",
    "gatewayd_websocket_closes",
    "gatewayd_sse_clients",
    "gatewayd_runs",
    "gatewayd_run_duration_seconds",
    "gatewayd_tokens",
    "gatewayd_cost_cents",
    "gatewayd_webhooks",
    "gatewayd_cron_runs",
    "gatewayd_events_published",
}


async def scrape(g: Running, token: str | None = VIEWER) -> tuple[int, str, bytes]:
    resp = await treq.get(g.url + "/metrics", headers=auth(token) if token else None)
    body = await resp.content()
    ctype = (resp.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
    return resp.code, ctype, body


def samples(text: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(
        v for lab, v in found.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


async def post(g: Running, path: str, body: Any, token: str = ADMIN) -> tuple[int, Any]:
    resp = await treq.post(g.url + path, json.dumps(body).encode(), headers=auth(token))
    raw = await resp.content()
    return resp.code, json.loads(raw) if raw else None


async def get(g: Running, path: str, token: str = ADMIN) -> int:
    resp = await treq.get(g.url + path, headers=auth(token))
    await resp.content()
    return resp.code


@pytest_twisted.ensureDeferred
async def test_series_move_with_traffic(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        code, _, first = await scrape(g)
        assert code == 200
        before = samples(first)
        code, chat = await post(g, "/api/chat", {"message": "one two three"})
        assert code == 200
        run_id, sid = chat["run_id"], chat["session_id"]
        assert await get(g, f"/api/runs/{run_id}") == 200
        assert await get(g, "/api/runs/run_doesnotexist") == 404
        assert await get(g, f"/api/sessions/{sid}/history") == 200
        assert await get(g, "/no/such/path/at/all") == 404
        assert await get(g, "/health") == 200
        gw = g.gateway
        gw.metrics.rejection("payload_too_large")
        gw.metrics.ws_closed(1001)
        gw.metrics.ws_closed(None)
        gw.metrics.ws_message("in")
        gw.metrics.webhook("not-configured", "invalid_signature")
        gw.metrics.cron_run("completed")
        code, ctype, text = await scrape(g)
        assert code == 200 and ctype.startswith("text/plain")
        found = samples(text)
        names = {
            n.removesuffix("_total")
            .removesuffix("_count")
            .removesuffix("_bucket")
            .removesuffix("_sum")
            for n in found
        }
        assert CONTRACT_NAMES <= names, CONTRACT_NAMES - names

        req = "gatewayd_http_requests_total"
        assert value(found, req, method="POST", route="/api/chat", status="200") == 1
        assert value(found, req, method="GET", route="/api/runs/{run_id}", status="200") == 1
        assert value(found, req, method="GET", route="/api/runs/{run_id}", status="404") == 1
        assert (
            value(
                found, req, method="GET", route="/api/sessions/{session_id}/history", status="200"
            )
            == 1
        )
        assert value(found, req, method="GET", route="other", status="404") == 1
        assert value(found, req, route="/health") == 1
        # the first scrape is counted once it finished; route templates only, never raw ids
        assert value(found, req, route="/metrics", status="200") == 1
        routes = {lab["route"] for lab, _ in found[req]}
        assert not any(run_id in r or sid in r or "doesnotexist" in r for r in routes)
        assert (
            value(
                found,
                "gatewayd_http_request_duration_seconds_count",
                method="POST",
                route="/api/chat",
            )
            == 1
        )
        assert value(found, "gatewayd_http_requests_in_flight") >= 1  # this scrape

        assert value(found, "gatewayd_runs_total", status="completed") == 1
        assert value(found, "gatewayd_run_duration_seconds_count") == 1
        assert value(found, "gatewayd_tokens_total", direction="input") == 3
        assert value(found, "gatewayd_tokens_total", direction="output") == 3
        assert value(found, "gatewayd_cost_cents_total") == 0
        published = value(found, "gatewayd_events_published_total")
        assert published > value(before, "gatewayd_events_published_total")
        assert published == gw.bus.published
        assert value(found, "gatewayd_http_rejections_total", reason="payload_too_large") == 1
        assert value(found, "gatewayd_websocket_closes_total", code="1001") == 1
        assert value(found, "gatewayd_websocket_closes_total", code="1006") == 1
        assert value(found, "gatewayd_websocket_messages_total", direction="in") == 1
        assert (
            value(found, "gatewayd_webhooks_total", hook="other", result="invalid_signature") == 1
        )
        assert value(found, "gatewayd_cron_runs_total", result="completed") == 1
        assert value(found, "gatewayd_build_info", version=gw.version) == 1
        assert "gatewayd_event_bus_lag_seconds" in found
        assert "process_resident_memory_bytes" in found or "process_cpu_seconds_total" in found

        # gauges are read from the gateway at scrape time
        gw.connections["sse"] += 2
        gw.connections["websocket"] += 1
        try:
            _, _, text = await scrape(g)
        finally:
            gw.connections["sse"] -= 2
            gw.connections["websocket"] -= 1
        found = samples(text)
        assert value(found, "gatewayd_sse_clients") == 2 + gw.connections["sse"]
        assert value(found, "gatewayd_websocket_connections") == 1 + gw.connections["websocket"]
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_approvals_are_counted(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        gw = g.gateway
        asked: Deferred[Any] = Deferred()
        sub = gw.bus.subscribe(
            lambda e: asked.called or asked.callback(e), make_filter(["approval_requested"])
        )
        message = '/tool write_file {"path": "x.txt", "content": "y"}'
        code, started = await post(g, "/api/agent", {"message": message})
        assert code == 202
        event = await asked
        sub.cancel()
        approval = event.payload["approval_id"]
        code, _ = await post(g, f"/api/approvals/{approval}/deny", {"reason": "no"}, ADMIN)
        assert code == 200
        await gw.runs.wait(started["run_id"])
        _, _, text = await scrape(g)
        found = samples(text)
        assert value(found, "gatewayd_approvals_requested_total") == 1
        assert value(found, "gatewayd_approvals_resolved_total", status="denied") == 1
        assert value(found, "gatewayd_approvals_pending") == 0
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_metrics_need_read_unless_public(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path / "a"))
    try:
        code, _, body = await scrape(g, None)
        assert code == 401 and json.loads(body)["error"]["code"] == "unauthorized"
        code, _, body = await scrape(g, CHAT)
        assert code == 403 and json.loads(body)["error"]["code"] == "forbidden"
        code, _, _ = await scrape(g, VIEWER)
        assert code == 200
        resp = await treq.post(g.url + "/metrics", b"", headers=auth(ADMIN))
        assert resp.code == 405
        await resp.content()
    finally:
        await g.stop()
    public = '[gateway]\nlisten = ["tcp:0:interface=127.0.0.1"]\nmetrics_public = true\n'
    g = await start_gateway(str(tmp_path / "b"), public + TOKENS_TOML)
    try:
        code, ctype, body = await scrape(g, None)
        assert code == 200 and b"gatewayd_http_requests_in_flight" in body
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_two_gateways_keep_separate_registries(tmp_path: Any) -> None:
    a = await start_gateway(str(tmp_path / "a"))
    b = await start_gateway(str(tmp_path / "b"))
    try:
        assert await get(a, "/api/status") == 200
        assert await get(a, "/api/status") == 200
        _, _, text_a = await scrape(a)
        _, _, text_b = await scrape(b)
        route = {"method": "GET", "route": "/api/status", "status": "200"}
        assert value(samples(text_a), "gatewayd_http_requests_total", **route) == 2
        assert value(samples(text_b), "gatewayd_http_requests_total", **route) == 0
    finally:
        await a.stop()
        await b.stop()


def test_route_table_resolves_templates() -> None:
    table = RouteTable(
        [
            "/api/runs/<run_id>",
            "/api/runs/<run_id>/abort",
            "/api/status",
            "/hooks/{name}",
            "/static/<path:rest>",
        ]
    )
    assert table.resolve(b"/api/runs/run_123") == "/api/runs/{run_id}"
    assert table.resolve(b"/api/runs/run_123/abort") == "/api/runs/{run_id}/abort"
    assert table.resolve(b"/api/runs/a/b/c") == "other"
    assert table.resolve(b"/api/status") == "/api/status"
    assert table.resolve(b"/hooks/github") == "/hooks/{name}"
    assert table.resolve(b"/static/a/b.js") == "/static/{rest}"
    assert table.resolve(b"/app/index.html") == "/app/*"
    assert table.resolve(b"/\xff") == "other"
    assert table.resolve(b"/nope") == "other"


def test_free_form_labels_are_capped() -> None:
    from gatewayd.metrics import Metrics

    class _Bus:
        published = 0

        def subscribe(self, *a: Any) -> Any:
            return type("S", (), {"cancel": lambda self: None})()

    class _GW:
        run_finished_hooks: list[Any] = []
        bus = _Bus()
        config = None

    m = Metrics(_GW(), process=False)  # type: ignore[arg-type]
    for i in range(MAX_LABEL_VALUES + 40):
        m.rejection(f"reason-{i}")
    (family,) = m._rejections.collect()
    reasons = {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert len(reasons) == MAX_LABEL_VALUES + 1
    assert reasons["other"] == 40
