"""``POST /hooks/<name>`` against the real service tree: every scheme, replays, templates."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import pytest_twisted
import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import DeferredList

from gatewayd.config import ConfigError, parse_config
from gatewayd.web.hooks import hook_body_limit, receiver_for, render_prompt
from gatewayd.webhooks import sign
from tests.bridge_standins import wait_until
from tests.harness import ADMIN, TOKENS_TOML, Running, auth, start_gateway

STANDARD_SECRET = "whsec_" + base64.b64encode(b"standard-webhooks-test-key").decode()
SECRETS = {
    "hm": "hmac-secret",
    "gh": "github-secret",
    "std": STANDARD_SECRET,
    "sl": "slack-signing-secret",
    "st": "stripe-secret",
}
HOOKS_TOML = f"""
[webhooks.hm]
scheme = "hmac"
algorithm = "sha512"
secret = "{SECRETS["hm"]}"
prompt = "Event {{{{action}}}} on {{{{repo.name}}}} [{{{{missing.field}}}}]: {{{{body}}}}"
[webhooks.gh]
scheme = "github"
secret = "{SECRETS["gh"]}"
body_limit_bytes = 2000
[webhooks.std]
scheme = "standard"
secret = "{SECRETS["std"]}"
[webhooks.sl]
scheme = "slack"
secret = "{SECRETS["sl"]}"
max_age_s = 60
[webhooks.st]
scheme = "stripe"
secret = "{SECRETS["st"]}"
[webhooks.raw]
scheme = "hmac"
secret = "raw-secret"
prompt = "{{{{body}}}}"
"""
#: many quick deliveries from one IP must not meet the per-IP rate limit
FAST = """
[gateway.rate_limit]
rate_per_s = 1000
burst = 1000
"""
CONFIG = TOKENS_TOML + FAST + HOOKS_TOML


async def post_hook(g: Running, name: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    resp = await treq.post(g.url + f"/hooks/{name}", body, headers=headers)
    raw = await resp.content()
    return resp.code, json.loads(raw) if raw else None


async def count(g: Running, sql: str, *args: Any) -> int:
    def q(conn: Any) -> int:
        return int(conn.execute(sql, args).fetchone()[0])

    return int(await g.gateway.store.run(q))


def body_for(scheme: str, n: int) -> bytes:
    """A delivery body; Stripe and Slack carry their replay id in it."""
    if scheme == "stripe":
        return json.dumps({"id": f"evt_{n}", "type": "charge.succeeded"}).encode()
    if scheme == "slack":
        return json.dumps({"type": "event_callback", "event_id": f"Ev{n}"}).encode()
    return json.dumps({"action": "opened", "repo": {"name": "gatewayd"}, "n": n}).encode()


HOOK_SCHEMES = {"hm": "hmac", "gh": "github", "std": "standard", "sl": "slack", "st": "stripe"}
TIMESTAMPED = {"hm", "std", "sl", "st"}


def signed(name: str, body: bytes, delivery: str, ts: int | None = None) -> dict[str, str]:
    scheme = HOOK_SCHEMES[name]
    return sign(
        scheme,
        SECRETS[name],
        body,
        timestamp=int(time.time()) if ts is None else ts,
        delivery_id=delivery if scheme in ("hmac", "github", "standard") else None,
        algorithm="sha512" if name == "hm" else "sha256",
        timestamped=name == "hm",
    )


@pytest_twisted.ensureDeferred
async def test_every_scheme_valid_tampered_stale_missing_and_replayed(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), CONFIG)
    try:
        accepted: list[dict[str, Any]] = []
        for i, name in enumerate(HOOK_SCHEMES):
            body = body_for(HOOK_SCHEMES[name], i)
            headers = signed(name, body, f"delivery-{i}")
            code, answer = await post_hook(g, name, body, headers)
            assert code == 202, (name, answer)
            assert answer["status"] == "accepted"
            assert set(answer) == {"status", "run_id", "session_id", "delivery_id"}
            accepted.append(answer)
            expected_id = {"st": f"evt_{i}", "sl": f"Ev{i}"}.get(name, f"delivery-{i}")
            assert answer["delivery_id"] == expected_id
            # the same delivery again: 200 duplicate, no run
            code, dup = await post_hook(g, name, body, headers)
            assert (code, dup) == (200, {"status": "duplicate", "delivery_id": expected_id})
            # a changed body under the same signature
            code, err = await post_hook(g, name, body + b" ", headers)
            assert (code, err["error"]["code"]) == (401, "invalid_signature"), name
            # no signature at all
            code, err = await post_hook(g, name, body, {"Content-Type": "application/json"})
            assert (code, err["error"]["code"]) == (401, "missing_signature"), name
            if name in TIMESTAMPED:
                old = signed(
                    name,
                    body_for(HOOK_SCHEMES[name], 100 + i),
                    f"old-{i}",
                    ts=int(time.time()) - 3600,
                )
                code, err = await post_hook(g, name, body_for(HOOK_SCHEMES[name], 100 + i), old)
                assert (code, err["error"]["code"]) == (401, "stale_signature"), name
        # exactly one run per accepted delivery, each recorded against its delivery id
        assert await count(g, "SELECT count(*) FROM runs") == len(HOOK_SCHEMES)
        for name, answer in zip(HOOK_SCHEMES, accepted, strict=True):
            assert (
                await count(
                    g,
                    "SELECT count(*) FROM deliveries WHERE hook = ? AND delivery_id = ? "
                    "AND run_id = ?",
                    name,
                    answer["delivery_id"],
                    answer["run_id"],
                )
                == 1
            )
        events = g.gateway.bus.recent(100, None)
        received = [e for e in events if e.type == "webhook_received"]
        assert sorted((e.payload["hook"], e.payload["delivery_id"]) for e in received) == sorted(
            (name, a["delivery_id"]) for name, a in zip(HOOK_SCHEMES, accepted, strict=True)
        )
        results = receiver_for(g.gateway).results
        for name in HOOK_SCHEMES:
            assert results[(name, "accepted")] == 1
            assert results[(name, "duplicate")] == 1
            assert results[(name, "invalid_signature")] == 1
            assert results[(name, "missing_signature")] == 1
            assert results[(name, "stale_signature")] == (1 if name in TIMESTAMPED else 0)
        # hook runs: the hook's principal, source "hook", and they finish
        for answer in accepted:
            run = await g.gateway.runs.wait(answer["run_id"])
            assert run.status == "completed"
            assert run.source == "hook"
            assert run.owner.startswith("hook:")
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_prompt_template_and_no_tool_commands(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), CONFIG)
    try:
        body = b'{"action": "closed", "repo": {"name": "x{{body}}y"}}'
        code, answer = await post_hook(g, "hm", body, signed("hm", body, "t-1"))
        assert code == 202
        run = await g.gateway.runs.wait(answer["run_id"])
        history = await g.gateway.store.history(answer["session_id"])
        prompt = f"Event closed on x{{{{body}}}}y []: {body.decode()}"
        assert [m.content for m in history if m.role == "user"] == [prompt]
        assert run.response == prompt  # echo: and the template was not applied twice
        # a body asking the echo provider for a tool is just text in a hook run
        body = b'/tool list_dir {"path": "."}'
        headers = sign("hmac", "raw-secret", body, timestamp=int(time.time()))
        code, answer = await post_hook(g, "raw", body, headers)
        assert code == 202 and answer["delivery_id"].startswith("dlv_")
        run = await g.gateway.runs.wait(answer["run_id"])
        assert run.status == "completed"
        assert run.tools_used == ()
        assert run.response == body.decode()
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_replay_cache_survives_a_restart(tmp_path: Any) -> None:
    body = body_for("standard", 7)
    headers = signed("std", body, "msg_restart")
    g = await start_gateway(str(tmp_path), CONFIG)
    try:
        code, answer = await post_hook(g, "std", body, headers)
        assert code == 202
        await g.gateway.runs.wait(answer["run_id"])
    finally:
        await g.stop()
    g = await start_gateway(str(tmp_path), CONFIG)
    try:
        code, dup = await post_hook(g, "std", body, headers)
        assert (code, dup) == (200, {"status": "duplicate", "delivery_id": "msg_restart"})
        assert await count(g, "SELECT count(*) FROM runs") == 1
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_concurrent_copies_start_one_run(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), CONFIG)
    try:
        body = body_for("github", 1)
        headers = signed("gh", body, "same-delivery")
        results = await DeferredList(
            [treq.post(g.url + "/hooks/gh", body, headers=headers) for _ in range(8)],
            consumeErrors=True,
        )
        codes = sorted(r.code for ok, r in results if ok)
        for ok, r in results:
            if ok:
                await r.content()
        assert codes == [200] * 7 + [202]
        assert await count(g, "SELECT count(*) FROM runs") == 1
        await wait_until(lambda: g.gateway.runs.active_count == 0, what="the run to end")
    finally:
        await g.stop()


@pytest_twisted.ensureDeferred
async def test_unknown_hook_method_and_body_limit(tmp_path: Any) -> None:
    g = await start_gateway(str(tmp_path), CONFIG)
    try:
        code, err = await post_hook(g, "nope", b"{}", {})
        assert (code, err["error"]["code"]) == (404, "not_found")
        resp = await treq.get(g.url + "/hooks/gh")
        assert resp.code == 405
        await resp.content()
        big = b'{"x": "' + b"a" * 3000 + b'"}'
        code, err = await post_hook(g, "gh", big, signed("gh", big, "big"))
        assert (code, err["error"]["code"]) == (413, "payload_too_large")
        assert await count(g, "SELECT count(*) FROM runs") == 0
        # the operations side needs a token; a hook never does
        resp = await treq.post(g.url + "/api/hooks/wake", b'{"prompt": "x"}')
        assert resp.code == 401
        await resp.content()
        resp = await treq.post(
            g.url + "/api/hooks/wake", b'{"prompt": "wake up"}', headers=auth(ADMIN)
        )
        answer = json.loads(await resp.content())
        assert resp.code == 202 and set(answer) == {"session_id", "run_id"}
        run = await g.gateway.runs.wait(answer["run_id"])
        assert (run.status, run.source, run.response) == ("completed", "wake", "wake up")
    finally:
        await g.stop()


def test_hook_body_limit_and_config_checks() -> None:
    config = parse_config(CONFIG, {})
    assert hook_body_limit(config, "/hooks/gh") == 2000
    assert hook_body_limit(config, "/hooks/hm") is None  # the /hooks/ prefix limit applies
    assert hook_body_limit(config, "/hooks/unknown") is None
    assert hook_body_limit(config, "/api/hooks/wake") is None
    with pytest.raises(ConfigError, match="secret"):
        parse_config('[webhooks.x]\nscheme = "github"\nsecret = ""\n', {})


def test_config_refuses_hooks_that_cannot_work(tmp_path: Any) -> None:
    from twisted.internet import reactor

    from gatewayd.tap import compose

    cases = {
        '[webhooks.x]\nscheme = "github"\nsecret = "s"\nalgorithm = "sha512"\n': "sha256",
        '[webhooks.x]\nsecret = "s"\nchannel = "telegram"\n': "no bridge named 'telegram'",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            compose(parse_config(TOKENS_TOML + text, {}), reactor=reactor, state_dir=str(tmp_path))


# -- the template, as a pure function ---------------------------------------------------------


def test_render_prompt_examples() -> None:
    body = b'{"a": {"b": [1, {"c": "deep"}], "t": true, "n": null}, "s": "{{a.t}}"}'
    assert render_prompt("{{a.b.1.c}}|{{a.t}}|{{a.n}}|{{a.zz}}|{{ s }}", body) == (
        "deep|true|||{{a.t}}"
    )
    assert render_prompt("{{a.b}}", body) == '[1,{"c":"deep"}]'
    assert render_prompt("{{a}} {{body}}", b"not json \xff") == " not json \ufffd"
    assert render_prompt("{{__class__}}|{{a.__init__}}|{% x %} ${x} {x} {{ a b }}", b"{}") == (
        "||{% x %} ${x} {x} {{ a b }}"
    )


@settings(max_examples=300, deadline=None)
@given(value=st.text(), template_text=st.text(alphabet="ab{}. ", max_size=30))
def check_substitution_is_one_pass(value: str, template_text: str) -> None:
    body = json.dumps({"v": value}).encode()
    assert render_prompt("[{{v}}]", body) == f"[{value}]"
    assert render_prompt("{{body}}", body) == body.decode()
    # whatever the template, the body's text is never evaluated again
    out = render_prompt(template_text + "{{v}}", body)
    assert out.endswith(value)


def test_substitution_property() -> None:
    check_substitution_is_one_pass()
