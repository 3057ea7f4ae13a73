"""Cron jobs as clients and the config see them: validating fields, and their JSON views.

Pure functions, kept apart from the timing in :mod:`gatewayd.scheduler`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from gatewayd.config import ConfigError
from gatewayd.errors import GatewayError, invalid
from gatewayd.ops import ID_RE
from gatewayd.schedule import parse_catch_up, parse_schedule, rfc3339
from gatewayd.store.cron import CronJob, CronRun

EXCERPT_CHARS = 200
MAX_NAME_CHARS = 200
MAX_PROMPT_CHARS = 100_000
MAX_CHANNEL_CHARS = 200
_JOB_KEYS = frozenset({"name", "schedule", "payload", "prompt", "channel", "enabled", "catch_up"})
_PAYLOAD_KEYS = frozenset({"type", "prompt", "session_id"})


# --- validation --------------------------------------------------------------------------


def _parse_payload(obj: object) -> tuple[str, str | None]:
    if not isinstance(obj, dict):
        raise invalid("payload must be an object")
    unknown = sorted(str(k) for k in obj if k not in _PAYLOAD_KEYS)
    if unknown:
        raise invalid(f"payload has unknown field(s): {', '.join(unknown)}")
    if obj.get("type", "agentTurn") != "agentTurn":
        raise invalid("payload.type must be agentTurn")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("payload.prompt must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid(f"payload.prompt is longer than {MAX_PROMPT_CHARS} characters")
    session_id = obj.get("session_id")
    if session_id is not None and (
        not isinstance(session_id, str) or not ID_RE.fullmatch(session_id)
    ):
        raise invalid("payload.session_id must match [A-Za-z0-9._:-]{1,128}")
    return prompt, session_id


def parse_job_fields(obj: Mapping[str, Any], *, base: CronJob | None = None) -> dict[str, Any]:
    """Validated :class:`CronJob` fields from a create body (``base`` None) or a PATCH.

    A PATCH merges ``payload`` into the job's (a null member removes it); ``prompt`` is
    accepted as a shorthand for ``payload.prompt``.  Every problem is a 400 naming the field.
    """
    unknown = sorted(str(k) for k in obj if k not in _JOB_KEYS)
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    if "name" in obj:
        name = obj["name"]
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise invalid(f"name must be a string of at most {MAX_NAME_CHARS} characters")
        out["name"] = name.strip()
    if "schedule" in obj or base is None:
        out["schedule"] = parse_schedule(obj.get("schedule"))
    if "payload" in obj or "prompt" in obj or base is None:
        merged: dict[str, Any] = base.payload() if base is not None else {}
        if "payload" in obj:
            patch = obj["payload"]
            if not isinstance(patch, dict):
                raise invalid("payload must be an object")
            for key, value in patch.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
        if "prompt" in obj:
            merged["prompt"] = obj["prompt"]
        if base is None and "payload" not in obj and "prompt" not in obj:
            raise invalid("payload must be an object with a prompt")
        out["prompt"], out["session_id"] = _parse_payload(merged)
    if "channel" in obj:
        channel = obj["channel"]
        if not isinstance(channel, str) or len(channel) > MAX_CHANNEL_CHARS:
            raise invalid(f"channel must be a string of at most {MAX_CHANNEL_CHARS} characters")
        out["channel"] = channel.strip()
    if "enabled" in obj:
        if not isinstance(obj["enabled"], bool):
            raise invalid("enabled must be a boolean")
        out["enabled"] = obj["enabled"]
    if "catch_up" in obj or base is None:
        out["catch_up"] = parse_catch_up(obj.get("catch_up"))
    return out


def config_jobs(raw_jobs: Iterable[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``[[cron.jobs]]`` as (id, fields); a bad job is a ConfigError naming it.

    A job needs an ``id``, or a ``name`` that can serve as one, so that a restart finds the
    same job again (and keeps its history).
    """
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_jobs):
        where = f"cron.jobs[{i}]"
        body = dict(raw)
        jid = body.pop("id", None) or body.get("name")
        if not isinstance(jid, str) or not ID_RE.fullmatch(jid):
            raise ConfigError(
                f"{where}.id: required (or a name made of A-Z a-z 0-9 . _ : -, at most 128)"
            )
        if jid in seen:
            raise ConfigError(f"{where}.id: {jid!r} is declared twice")
        seen.add(jid)
        try:
            fields = parse_job_fields(body)
        except GatewayError as e:
            raise ConfigError(f"{where}: {e.message}") from None
        fields.setdefault("name", jid)
        out.append((jid, fields))
    return out


# --- views -------------------------------------------------------------------------------


def _ts(value: float | None) -> str | None:
    return None if value is None else rfc3339(value, digits=3)


def job_view(job: CronJob) -> dict[str, Any]:
    """The contract's job shape (§10), plus ``origin``: config jobs change in the config."""
    out: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "schedule": job.schedule.to_json(),
        "payload": job.payload(),
    }
    if job.channel:
        out["channel"] = job.channel
    out.update(
        enabled=job.enabled,
        catch_up=job.catch_up,
        next_run_at=_ts(job.next_run_at),
        last_run_at=_ts(job.last_run_at),
        last_status=job.last_status,
        origin=job.origin,
    )
    return out


def run_view(run: CronRun) -> dict[str, Any]:
    out: dict[str, Any] = {
        "run_id": run.run_id,
        "started_at": _ts(run.started_at),
        "finished_at": _ts(run.finished_at),
        "status": run.status,
        "excerpt": run.excerpt,
    }
    if run.session_id is not None:
        out["session_id"] = run.session_id
    return out


def excerpt(text: str | None) -> str | None:
    if not text:
        return text
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"
