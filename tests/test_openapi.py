"""The published contract: OpenAPI and AsyncAPI documents, generated from the tables, and a
schemathesis run against a real ``twistd gateway`` process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest
import pytest_twisted
import treq

from gatewayd import ops
from gatewayd.web.openapi import EVENT_TYPES, asyncapi_document, openapi_document
from gatewayd.web.routes import ROUTES
from tests.harness import TOKENS_TOML, start_gateway

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_openapi_covers_every_route() -> None:
    doc = openapi_document()
    assert doc["openapi"] == "3.1.0"
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "a gatewayd token (CONTRACT §3)",
    }
    paths = doc["paths"]
    for route in ROUTES:
        assert route.template in paths, route
        entry = paths[route.template][route.method.lower()]
        assert entry["x-operation"] == route.op
        assert entry["security"] == ([] if route.public else [{"bearerAuth": []}])
        responses = entry["responses"]
        assert {"400", "404", "429"} <= set(responses)
        if not route.public:
            assert {"401", "403"} <= set(responses)
    op_ids = [
        e["operationId"]
        for methods in paths.values()
        for m, e in methods.items()
        if m in HTTP_METHODS
    ]
    assert len(op_ids) == len(set(op_ids))
    for template, methods in paths.items():
        names = set(re.findall(r"\{([^}]+)\}", template))
        for method, entry in methods.items():
            assert method in HTTP_METHODS, (template, method)
            declared = {p["name"] for p in entry.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (template, method)
            assert entry["responses"], (template, method)
    for ref in _refs(doc):
        _resolve(doc, ref)
    # fixed resources and the contract's other paths are there too
    for template in (
        "/health",
        "/ready",
        "/metrics",
        "/api/openapi.json",
        "/api/events",
        "/api/chat/stream",
        "/api/daemon/logs",
        "/rpc",
        "/hooks/{name}",
        "/v1/chat/completions",
        "/api/config",
        "/api/backup",
    ):
        assert template in paths, template
    # parameters come from the operations' own Params
    chat = paths["/api/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["required"] == ["message"]
    assert chat["properties"]["session_id"]["pattern"] == "^[A-Za-z0-9._:-]{1,128}$"
    listing = {p["name"]: p for p in paths["/api/sessions"]["get"]["parameters"]}
    assert listing["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000}
    patch = paths["/api/config/patch"]["post"]
    assert set(patch["requestBody"]["content"]) == {
        "application/merge-patch+json",
        "application/json",
    }
    assert "412" in patch["responses"]
    assert "ETag" in paths["/api/config"]["get"]["responses"]["200"]["headers"]
    assert set(paths["/api/config"]["put"]["requestBody"]["content"]) == {
        "application/toml",
        "text/plain",
    }
    error = doc["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["code", "message"]


def test_asyncapi_lists_frames_methods_and_events() -> None:
    doc = asyncapi_document()
    assert doc["asyncapi"].startswith("3.")
    messages = doc["components"]["messages"]
    for name in ops.load_all():
        assert f"rpc.{name}" in messages
        assert messages[f"rpc.{name}"]["payload"]["properties"]["method"] == {"const": name}
    for frame in ("chat", "abort", "approve", "subscribe", "unsubscribe", "history", "ping"):
        assert f"client.{frame}" in messages
    for frame in ("delta", "run_complete", "event", "error", "pong", "subscribed"):
        assert f"server.{frame}" in messages
    for event in ("run_started", "text_delta", "config_patched", "approval_requested"):
        assert event in EVENT_TYPES and f"event.{event}" in messages
    for ref in _refs(doc):
        _resolve(doc, ref)
    assert {c["address"] for c in doc["channels"].values()} >= {
        "/ws",
        "/ws/chat",
        "/rpc",
        "/api/events",
    }


@pytest_twisted.ensureDeferred
async def test_documents_are_served_publicly(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        for path, key in (("/api/openapi.json", "openapi"), ("/api/asyncapi.json", "asyncapi")):
            resp = await treq.get(g.url + path)
            assert resp.code == 200
            assert resp.headers.getRawHeaders(b"content-type") == [b"application/json"]
            body = json.loads(await resp.content())
            assert key in body
        resp = await treq.post(g.url + "/api/openapi.json", b"")
        assert resp.code == 405
        await resp.content()
        resp = await treq.get(g.url + "/ready")
        body = json.loads(await resp.content())
        assert resp.code == 200
        assert body == {
            "status": "ready",
            "checks": {"store": "ok", "events": "ok", "provider": "ok"},
        }
        # a provider that is down makes the gateway unready, naming it
        from twisted.internet.defer import fail

        g.gateway.provider.check = lambda: fail(ConnectionRefusedError())
        resp = await treq.get(g.url + "/ready")
        body = json.loads(await resp.content())
        assert resp.code == 503 and body["failing"] == ["provider"]
        assert body["checks"]["provider"] == "unreachable"
        assert body["status"] == "unavailable"
        del g.gateway.provider.check
    finally:
        await g.stop()


FUZZ_TOKEN = "fuzz-admin-token-0123456789abcdef"
FUZZ_CONFIG = (
    """
[gateway.rate_limit]
rate_per_s = 100000
burst = 100000
[agent.tools.bash]
policy = "deny"
[agent.tools.write_file]
policy = "deny"
"""
    + TOKENS_TOML
)


def test_schemathesis_finds_no_5xx_and_no_schema_violation(tmp_path: Any) -> None:
    """At least 500 generated requests against the real process; bounded by --max-time.

    Left out: streams that never end (``/api/events``, ``/api/daemon/logs``), the loopback
    ``/admin/*`` paths (one of them stops the server) and ``PUT /api/config``, which replaces
    the whole file by design (its cases are in test_config_api).  Tool calls are denied by
    policy so no generated request waits for an approval.
    """
    cli = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    if cli is None:
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    from tests.harness import spawn

    proc = spawn(str(tmp_path / "state"), "--token", FUZZ_TOKEN, config_text=FUZZ_CONFIG)
    report = str(tmp_path / "report.json")
    try:
        result = subprocess.run(
            [
                cli,
                "run",
                proc.url + "/api/openapi.json",
                "-H",
                f"Authorization: Bearer {FUZZ_TOKEN}",
                "--checks",
                "not_a_server_error,response_schema_conformance",
                "--max-examples",
                "12",
                "--seed",
                "20240601",
                "--exclude-path-regex",
                r"^/(api/events|api/daemon/logs|admin/.*)$",
                "--exclude-operation-id",
                "config.set",
                "--request-timeout",
                "10",
                "--workers",
                "1",
                "--report",
                "json",
                "--report-json-path",
                report,
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=str(tmp_path),
            env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"},
        )
        assert proc.proc.poll() is None, "the gateway died under the fuzzer"
        with open(report, encoding="utf-8") as f:
            summary = json.load(f)
        detail = result.stdout[-6000:] + "\n--- gateway output ---\n" + proc.output()[-4000:]
        assert summary["failures"] == [], detail
        assert summary["errors"] == [], detail
        assert result.returncode == 0, detail
        assert summary["test_cases"]["generated"] >= 500, summary["test_cases"]
        # and no handler crashed quietly behind an answer
        assert "Traceback" not in proc.output(), proc.output()[-4000:]
    finally:
        proc.terminate()
        proc.kill()
