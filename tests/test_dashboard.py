"""The static dashboard: served from memory with a strict CSP; ``/`` redirects to it."""

from __future__ import annotations

from typing import Any

import pytest_twisted
import treq

from tests.harness import start_gateway


@pytest_twisted.ensureDeferred
async def test_dashboard_files_and_redirect(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path))
    try:
        resp = await treq.get(g.url + "/", allow_redirects=False)
        assert resp.code == 302 and resp.headers.getRawHeaders(b"location") == [b"/app/"]
        await resp.content()
        resp = await treq.get(g.url + "/app/")
        body = await resp.text()
        assert resp.code == 200 and "<title>gatewayd</title>" in body
        assert b"default-src 'none'" in resp.headers.getRawHeaders(b"content-security-policy")[0]
        resp = await treq.get(g.url + "/app/app.js")
        assert resp.code == 200 and "EventSource" in await resp.text()
        for path in ("/app/../gatewayd.sqlite3", "/app/nope.js", "/app/%2e%2e/admin-token"):
            resp = await treq.get(g.url + path)
            assert resp.code == 404, path
            assert (await resp.json())["error"]["code"] == "not_found"
    finally:
        await g.stop()
