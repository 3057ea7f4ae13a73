"""``gatewayctl``: manage a running gatewayd over its REST API (CONTRACT §11).

Standard library only (no Twisted, no Klein), so it starts in a blink.  Readable tables by
default, the API's JSON with ``--json``.  Exit codes: 0 ok, 1 an error answer (any 4xx/5xx),
2 usage, 3 the gateway could not be reached.

Where it connects: ``--url``, else ``$GATEWAYD_URL``, else ``http://127.0.0.1:18789``
(``unix:/path/to.sock`` for a UNIX listener).  Credentials: ``--token``, else
``$GATEWAYD_TOKEN``, else the ``admin-token`` file of ``$GATEWAYD_STATE_DIR`` (or
``~/.local/state/gatewayd``) — so on the gateway's own host an operator needs no flags.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import socket
import ssl
import sys
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TextIO

DEFAULT_URL = "http://127.0.0.1:18789"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class Failed(Exception):
    """An error answer from the gateway: exit 1."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Unreachable(Exception):
    """No answer at all: exit 3."""


# -- connecting ---------------------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Client:
    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: float = 30.0,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout
        if url.startswith("unix:"):
            self._unix: str | None = url[len("unix:") :]
            self._scheme, self._host, self._base = "http", "localhost", ""
        else:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"--url: expected http://HOST:PORT, https://… or unix:PATH: {url}")
            self._unix = None
            self._scheme, self._host, self._base = (
                parts.scheme,
                parts.netloc,
                parts.path.rstrip("/"),
            )
        self._context: ssl.SSLContext | None = None
        if self._scheme == "https":
            self._context = ssl.create_default_context(cafile=cacert)
            if cert:
                self._context.load_cert_chain(cert, key)

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._unix is not None:
            return _UnixConnection(self._unix, timeout)
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, timeout=timeout, context=self._context)
        return http.client.HTTPConnection(self._host, timeout=timeout)

    def open(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        content_type: str = "application/json",
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        target = self._base + path
        if query:
            items = {k: v for k, v in query.items() if v is not None}
            if items:
                target += "?" + urllib.parse.urlencode(items)
        all_headers = {"Accept": "application/json", "User-Agent": "gatewayctl"}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        data: bytes | None = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            all_headers["Content-Type"] = content_type
        all_headers.update(headers or {})
        conn = self._connection(None if stream else self.timeout)
        try:
            conn.request(method, target, body=data, headers=all_headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise Unreachable(f"cannot reach {self.url}: {_reason(e)}") from None
        return conn, response

    def call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """One request; the JSON answer, or :class:`Failed`."""
        conn, response = self.open(method, path, body, **kw)
        try:
            try:
                raw = response.read()
            except (OSError, http.client.HTTPException) as e:
                raise Unreachable(f"the connection to {self.url} broke: {_reason(e)}") from None
            check(response, raw)
            if not raw:
                return None
            try:
                return json.loads(raw)
            except ValueError:
                return raw.decode("utf-8", "replace")
        finally:
            conn.close()


def _reason(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def check(response: http.client.HTTPResponse, raw: bytes) -> None:
    if response.status < 400:
        return
    code, message = "error", response.reason
    try:
        error = json.loads(raw)["error"]
        code = str(error.get("code") or error.get("type") or code)
        message = str(error.get("message") or message)
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    raise Failed(response.status, code, message)


def sse_events(response: http.client.HTTPResponse) -> Iterator[tuple[str, str]]:
    """``(event, data)`` for each SSE event of a streaming answer."""
    event, data = "message", list[str]()
    while True:
        try:
            line = response.readline()
        except (OSError, http.client.HTTPException):
            return
        if not line:
            return
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if not text:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif text.startswith(":"):
            continue
        else:
            field, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


# -- output -------------------------------------------------------------------------------------


class Output:
    def __init__(self, as_json: bool, out: TextIO, err: TextIO) -> None:
        self.json = as_json
        self.out = out
        self.err = err

    def emit(self, value: Any, readable: Callable[[Any], object] | None = None) -> None:
        if self.json or readable is None:
            self.out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
        else:
            readable(value)

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
        if not rows:
            self.line("(none)")
            return
        cells = [[_cell(row.get(c)) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        self.line(
            "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
        )
        for r in cells:
            self.line("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())

    def fields(self, obj: dict[str, Any], keys: Sequence[str] | None = None) -> None:
        keys = list(keys) if keys is not None else list(obj)
        width = max((len(k) for k in keys), default=0)
        for k in keys:
            if k in obj:
                self.line(f"{k.ljust(width)}  {_cell(obj[k], 100)}")


def _cell(value: Any, limit: int = 60) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, dict | list):
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- commands -----------------------------------------------------------------------------------

Handler = Callable[[Client, argparse.Namespace, Output], int]


def cmd_status(c: Client, a: argparse.Namespace, o: Output) -> int:
    o.emit(c.call("GET", "/api/status"), o.fields)
    return EXIT_OK


def cmd_health(c: Client, a: argparse.Namespace, o: Output) -> int:
    o.emit(c.call("GET", "/health"), lambda v: o.line(f"{v.get('status')} {v.get('timestamp')}"))
    return EXIT_OK


def cmd_chat(c: Client, a: argparse.Namespace, o: Output) -> int:
    body: dict[str, Any] = {"message": a.message}
    if a.session:
        body["session_id"] = a.session
    conn, response = c.open(
        "POST", "/api/chat/stream", body, stream=True, headers={"Accept": "text/event-stream"}
    )
    try:
        if response.status == 404 or response.status == 405:
            response.read()
            conn.close()
            result = c.call("POST", "/api/chat", body, stream=True)
            o.emit(result, lambda v: o.out.write(_ended(str(v.get("response", "")))))
            return EXIT_OK
        if response.status >= 400:
            check(response, response.read())
        wrote = ""  # the streamed text, to end the output with exactly one newline
        for event, data in sse_events(response):
            payload = _loads(data)
            if event == "token":
                if not o.json:
                    content = str(payload.get("content", ""))
                    o.out.write(content)
                    o.out.flush()
                    wrote = (wrote + content)[-1:] or wrote
            elif event in ("tool_start", "tool_end", "approval_requested") and not o.json:
                o.err.write(_tool_line(event, payload) + "\n")
                o.err.flush()
            elif event == "done":
                if o.json:
                    o.emit(payload)
                elif wrote:
                    o.out.write("" if wrote.endswith("\n") else "\n")
                else:
                    o.out.write(_ended(str(payload.get("response", ""))))
                return EXIT_OK
            elif event == "error":
                error = payload.get("error", {}) if isinstance(payload, dict) else {}
                if wrote and not wrote.endswith("\n") and not o.json:
                    o.line()
                raise Failed(
                    200,
                    str(error.get("code", "error")),
                    str(error.get("message", "the run failed")),
                )
        raise Unreachable("the chat stream ended before the run did")
    finally:
        conn.close()


def _ended(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _tool_line(event: str, p: dict[str, Any]) -> str:
    if event == "tool_start":
        return f"[tool {p.get('tool')} {_cell(p.get('input'), 80)}]"
    if event == "tool_end":
        flag = " (error)" if p.get("is_error") else ""
        return f"[tool {p.get('tool')} done{flag}]"
    return (
        f"[approval needed: {p.get('approval_id')} for {p.get('tool')}; "
        f"gatewayctl approvals approve {p.get('approval_id')}]"
    )


def _loads(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return {"raw": data}


def cmd_sessions(c: Client, a: argparse.Namespace, o: Output) -> int:
    if a.action == "list":
        result = c.call("GET", "/api/sessions", query={"limit": a.limit})
        o.emit(
            result,
            lambda v: o.table(v["sessions"], ["id", "title", "message_count", "last_activity"]),
        )
    elif a.action == "show":
        result = c.call("GET", f"/api/sessions/{_seg(a.id)}")

        def show(v: dict[str, Any]) -> None:
            o.fields({k: x for k, x in v.items() if k != "messages"})
            for m in v.get("messages", []):
                o.line(f"[{m.get('created_at')}] {m.get('role')}: {m.get('content')}")

        o.emit(result, show)
    else:
        c.call("DELETE", f"/api/sessions/{_seg(a.id)}")
        o.emit({"deleted": a.id}, lambda v: o.line(f"deleted session {a.id}"))
    return EXIT_OK


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def cmd_logs(c: Client, a: argparse.Namespace, o: Output) -> int:
    query = {"lines": a.lines, "follow": "1" if a.follow else "0"}
    conn, response = c.open(
        "GET", "/api/daemon/logs", query=query, stream=True, headers={"Accept": "text/event-stream"}
    )
    try:
        if response.status >= 400:
            check(response, response.read())
        try:
            for event, data in sse_events(response):
                if event == "log":
                    o.line(data if o.json else format_log_line(data))
                    o.out.flush()
                elif event == "tail_end" and not a.follow:
                    return EXIT_OK
        except KeyboardInterrupt:
            return EXIT_OK
        return EXIT_OK
    finally:
        conn.close()


def format_log_line(data: str) -> str:
    """One JSON log event as ``time level namespace: text``."""
    try:
        event = json.loads(data)
    except ValueError:
        return data
    when = event.get("log_time")
    stamp = (
        datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(when, int | float)
        else "-"
    )
    level = event.get("log_level")
    level_name = level.get("name", "-") if isinstance(level, dict) else str(level or "-")
    text = event.get("log_format") or ""
    try:
        text = text.format_map(_Fields(event))
    except (ValueError, IndexError, KeyError, AttributeError):
        pass
    failure = event.get("log_failure")
    if isinstance(failure, dict) and failure.get("value"):
        text += f" ({failure.get('type', {}).get('__name__', 'error')}: …)"
    return f"{stamp} {level_name:<5} {event.get('log_namespace', '-')}: {text}"


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def cmd_models(c: Client, a: argparse.Namespace, o: Output) -> int:
    o.emit(
        c.call("GET", "/api/models"), lambda v: o.table(v["models"], ["id", "provider", "default"])
    )
    return EXIT_OK


def cmd_approvals(c: Client, a: argparse.Namespace, o: Output) -> int:
    if a.action == "list":
        result = c.call("GET", "/api/approvals", query={"status": a.status})
        o.emit(
            result,
            lambda v: o.table(
                v["approvals"], ["id", "tool", "status", "session_id", "created_at", "input"]
            ),
        )
        return EXIT_OK
    body = {"reason": a.reason} if a.reason else {}
    verb = "approve" if a.action == "approve" else "deny"
    result = c.call("POST", f"/api/approvals/{_seg(a.id)}/{verb}", body)
    o.emit(result, lambda v: o.line(f"{v.get('id', a.id)}: {v.get('status')}"))
    return EXIT_OK


def cmd_devices(c: Client, a: argparse.Namespace, o: Output) -> int:
    if a.action == "list":
        o.emit(
            c.call("GET", "/api/devices"),
            lambda v: o.table(v["devices"], ["id", "name", "role", "created_at", "paired_from"]),
        )
    elif a.action == "pair":
        body = {k: v for k, v in (("name", a.name), ("role", a.role)) if v}
        result = c.call("POST", "/api/devices/pair", body)
        o.emit(
            result,
            lambda v: o.line(
                f"pairing code {v.get('code')} (expires {v.get('expires_at')}); on the device: "
                f'POST /pair {{"code": "{v.get("code")}"}}'
            ),
        )
    else:
        c.call("DELETE", f"/api/devices/{_seg(a.id)}")
        o.emit({"revoked": a.id}, lambda v: o.line(f"revoked device {a.id}"))
    return EXIT_OK


def cmd_tokens(c: Client, a: argparse.Namespace, o: Output) -> int:
    if a.action == "list":
        o.emit(
            c.call("GET", "/api/tokens"),
            lambda v: o.table(
                v["tokens"], ["id", "name", "role", "kind", "created_at", "expires_at"]
            ),
        )
    elif a.action == "create":
        body: dict[str, Any] = {"role": a.role, "name": a.name}
        if a.expires_in is not None:
            body["expires_in_s"] = a.expires_in
        result = c.call("POST", "/api/tokens", body)

        def show(v: dict[str, Any]) -> None:
            o.fields(v, ["id", "name", "role", "expires_at"])
            o.line(f"token  {v.get('token')}")
            o.err.write("gatewayctl: the token is shown once; keep it now\n")

        o.emit(result, show)
    else:
        c.call("DELETE", f"/api/tokens/{_seg(a.id)}")
        o.emit({"revoked": a.id}, lambda v: o.line(f"revoked token {a.id}"))
    return EXIT_OK


def _schedule(a: argparse.Namespace) -> dict[str, Any]:
    chosen = [x for x in (a.every, a.cron, a.at) if x is not None]
    if len(chosen) != 1:
        usage("cron add: give exactly one of --every SECONDS, --cron EXPR, --at TIME")
    if a.every is not None:
        return {"type": "every", "seconds": a.every}
    if a.cron is not None:
        schedule: dict[str, Any] = {"type": "cron", "expr": a.cron}
        if a.tz:
            schedule["tz"] = a.tz
        return schedule
    return {"type": "at", "at": a.at}


def cmd_cron(c: Client, a: argparse.Namespace, o: Output) -> int:
    if a.action == "list":
        o.emit(
            c.call("GET", "/api/cron"),
            lambda v: o.table(
                v["jobs"], ["id", "name", "schedule", "enabled", "next_run_at", "last_status"]
            ),
        )
    elif a.action == "add":
        if a.job is not None:
            body = _json_arg(a.job, "JOB")
        else:
            if not a.prompt:
                usage("cron add: --prompt is required (or give the job as JSON)")
            payload: dict[str, Any] = {"type": "agentTurn", "prompt": a.prompt}
            if a.session:
                payload["session_id"] = a.session
            body = {"name": a.name or "", "schedule": _schedule(a), "payload": payload}
            if a.channel:
                body["channel"] = a.channel
        result = c.call("POST", "/api/cron", body)
        o.emit(result, lambda v: o.line(f"added job {v.get('id')} (next: {v.get('next_run_at')})"))
    elif a.action == "remove":
        c.call("DELETE", f"/api/cron/{_seg(a.id)}")
        o.emit({"removed": a.id}, lambda v: o.line(f"removed job {a.id}"))
    elif a.action == "run":
        result = c.call("POST", f"/api/cron/{_seg(a.id)}/run", {})
        o.emit(result, lambda v: o.line(f"started run {v.get('run_id')} in {v.get('session_id')}"))
    else:
        result = c.call("GET", f"/api/cron/{_seg(a.id)}/runs")
        o.emit(
            result, lambda v: o.table(v["runs"], ["run_id", "status", "started_at", "finished_at"])
        )
    return EXIT_OK


def cmd_channels(c: Client, a: argparse.Namespace, o: Output) -> int:
    o.emit(
        c.call("GET", "/api/channels"),
        lambda v: o.table(
            v["channels"], ["name", "state", "received", "sent", "errors", "last_error"]
        ),
    )
    return EXIT_OK


def cmd_config(c: Client, a: argparse.Namespace, o: Output) -> int:
    if a.action == "get":
        o.emit(c.call("GET", "/api/config"))
        return EXIT_OK
    patch = _json_arg(a.patch, "JSON")
    headers = {"If-Match": a.if_match} if a.if_match else None
    result = c.call(
        "POST",
        "/api/config/patch",
        patch,
        headers=headers,
        query={"dry_run": "1" if a.dry_run else None},
        content_type="application/merge-patch+json",
    )

    def show(v: dict[str, Any]) -> None:
        for change in v.get("changes", []):
            o.line(f"{change['key']}: {_cell(change.get('old'))} -> {_cell(change.get('new'))}")
        o.line(f"applied: {', '.join(v.get('applied', [])) or '-'}")
        o.line(f"restart required: {', '.join(v.get('restart_required', [])) or '-'}")
        if v.get("dry_run"):
            o.line("(dry run: nothing was changed)")

    o.emit(result, show)
    return EXIT_OK


def cmd_backup(c: Client, a: argparse.Namespace, o: Output) -> int:
    result = c.call("POST", "/api/backup", {}, stream=True)
    o.emit(result, lambda v: o.line(f"backup written to {v['path']} ({v['bytes']} bytes)"))
    return EXIT_OK


def _json_arg(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        usage(f"{what}: not valid JSON: {e}")
    if not isinstance(value, dict):
        usage(f"{what}: must be a JSON object")
    return value


# -- the parser ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def usage(message: str) -> NoReturn:
    sys.stderr.write(f"gatewayctl: {message}\n")
    raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gatewayctl", description="Manage a running gatewayd.")
    p.add_argument(
        "--url",
        help=f"the gateway (default: $GATEWAYD_URL or {DEFAULT_URL}; unix:PATH for a UNIX socket)",
    )
    p.add_argument(
        "--token", help="bearer token (default: $GATEWAYD_TOKEN, then the state dir's admin-token)"
    )
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (30)")
    p.add_argument("--cacert", help="CA bundle for https://")
    p.add_argument("--cert", help="client certificate (mtls: listeners)")
    p.add_argument("--key", help="client certificate's key")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    sub.add_parser("status", help="version, uptime, load").set_defaults(fn=cmd_status)
    sub.add_parser("health", help="liveness").set_defaults(fn=cmd_health)
    chat = sub.add_parser("chat", help="send a message; the answer streams")
    chat.add_argument("message")
    chat.add_argument("--session", help="session id (default: a new session)")
    chat.set_defaults(fn=cmd_chat)

    sessions = sub.add_parser("sessions", help="list|show ID|delete ID")
    s = sessions.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    s.required = True
    s_list = s.add_parser("list")
    s_list.add_argument("--limit", type=int, default=50)
    s.add_parser("show").add_argument("id")
    s.add_parser("delete").add_argument("id")
    sessions.set_defaults(fn=cmd_sessions)

    logs = sub.add_parser("logs", help="the daemon log (admin)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.add_argument("--lines", "-n", type=int, default=100, help="lines of tail (100)")
    logs.set_defaults(fn=cmd_logs)

    sub.add_parser("models", help="the models").set_defaults(fn=cmd_models)

    approvals = sub.add_parser("approvals", help="list|approve ID|deny ID [--reason R]")
    ap = approvals.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    ap.required = True
    ap_list = ap.add_parser("list")
    ap_list.add_argument("--status", help="pending, approved, denied, expired, cancelled")
    for verb in ("approve", "deny"):
        one = ap.add_parser(verb)
        one.add_argument("id")
        one.add_argument("--reason")
    approvals.set_defaults(fn=cmd_approvals)

    devices = sub.add_parser("devices", help="list|pair [--name N]|revoke ID")
    dv = devices.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    dv.required = True
    dv.add_parser("list")
    pair = dv.add_parser("pair")
    pair.add_argument("--name")
    pair.add_argument("--role", help="the device token's role (default operator)")
    dv.add_parser("revoke").add_argument("id")
    devices.set_defaults(fn=cmd_devices)

    tokens = sub.add_parser("tokens", help="list|create --role R --name N|revoke ID")
    tk = tokens.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    tk.required = True
    tk.add_parser("list")
    create = tk.add_parser("create")
    create.add_argument("--role", required=True, choices=("admin", "operator", "chat", "viewer"))
    create.add_argument("--name", required=True)
    create.add_argument("--expires-in", type=int, metavar="SECONDS")
    tk.add_parser("revoke").add_argument("id")
    tokens.set_defaults(fn=cmd_tokens)

    cron = sub.add_parser("cron", help="list|add|remove ID|run ID|runs ID")
    cr = cron.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    cr.required = True
    cr.add_parser("list")
    add = cr.add_parser("add", help="--every S | --cron EXPR [--tz TZ] | --at TIME, --prompt P")
    add.add_argument("job", nargs="?", help="the whole job as JSON (instead of the flags)")
    add.add_argument("--name")
    add.add_argument("--every", type=int, metavar="SECONDS")
    add.add_argument("--cron", metavar="EXPR")
    add.add_argument("--tz")
    add.add_argument("--at", metavar="TIME", help="RFC 3339, e.g. 2026-03-15T14:32:00Z")
    add.add_argument("--prompt")
    add.add_argument("--session")
    add.add_argument("--channel")
    for verb in ("remove", "run", "runs"):
        cr.add_parser(verb).add_argument("id")
    cron.set_defaults(fn=cmd_cron)

    sub.add_parser("channels", help="the chat bridges").set_defaults(fn=cmd_channels)

    config = sub.add_parser("config", help="get | patch JSON [--dry-run] [--if-match ETAG]")
    cf = config.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    cf.required = True
    cf.add_parser("get")
    patch = cf.add_parser("patch")
    patch.add_argument(
        "patch",
        metavar="JSON",
        help='a JSON merge patch, e.g. \'{"agent": {"system_prompt": "Be brief."}}\'',
    )
    patch.add_argument("--dry-run", action="store_true")
    patch.add_argument("--if-match", metavar="ETAG")
    config.set_defaults(fn=cmd_config)

    sub.add_parser("backup", help="an online snapshot of the store").set_defaults(fn=cmd_backup)
    return p


def default_token(env: dict[str, str]) -> str | None:
    """``$GATEWAYD_TOKEN``, else this host's state dir ``admin-token``."""
    if env.get("GATEWAYD_TOKEN"):
        return env["GATEWAYD_TOKEN"]
    state_dir = env.get("GATEWAYD_STATE_DIR") or os.path.join(
        os.path.expanduser("~"), ".local", "state", "gatewayd"
    )
    try:
        with open(os.path.join(state_dir, "admin-token"), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    env = dict(os.environ)
    token = args.token or default_token(env)
    try:
        client = Client(
            args.url or env.get("GATEWAYD_URL") or DEFAULT_URL,
            token,
            timeout=args.timeout,
            cacert=args.cacert,
            cert=args.cert,
            key=args.key,
        )
    except (ValueError, OSError, ssl.SSLError) as e:
        err.write(f"gatewayctl: {e}\n")
        return EXIT_USAGE
    output = Output(args.json, out, err)
    try:
        return int(args.fn(client, args, output))
    except Failed as e:
        if args.json:
            out.write(
                json.dumps({"error": {"code": e.code, "message": e.message, "status": e.status}})
                + "\n"
            )
        err.write(f"gatewayctl: {e.status} {e.code}: {e.message}\n")
        return EXIT_ERROR
    except Unreachable as e:
        err.write(f"gatewayctl: {e}\n")
        return EXIT_UNREACHABLE
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
