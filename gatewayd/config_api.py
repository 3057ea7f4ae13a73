"""Safe config changes: read (redacted), patch, replace and reload, applied live or rolled back.

The file is the source of truth.  A change is made to the file's *text* with tomlkit, so
comments, ordering and untouched values (``${VAR}`` references included) stay exactly as the
operator wrote them; the result is validated by the same loader the process started with,
then applied to the running gateway, and only then written back, atomically (temporary file
in the same directory, then ``rename``).  If applying fails, the previous config is put back
and the file is not touched.

What "applied live" means: ``Gateway.config`` is replaced (it is frozen, so the object is
swapped), and the parts built from the config at start-up are rebuilt here — static tokens
(``gateway.api_keys``), the provider, the workspace, the stream cap, the log's size limit and
secret list — then every ``gw.config_listeners(old, new)`` runs, so other modules that keep
derived state can follow.  Keys in :data:`RESTART_KEYS` only take effect at the next start;
answers list them under ``restart_required``.

No file (the gateway runs on built-in defaults): reading works; changing answers 409, because
a file written now would not be read at the next start (CONTRACT §1 reads ``--config`` or
``$GATEWAYD_CONFIG`` only) and the change would silently vanish.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import tomlkit
from tomlkit.items import AoT
from twisted.logger import Logger

from gatewayd.auth import Principal
from gatewayd.config import DEFAULT_BODY_LIMITS, Config, ConfigError, config_from_dict
from gatewayd.errors import GatewayError, invalid

if TYPE_CHECKING:
    from gatewayd.core import Gateway

_log = Logger()

REDACTED = "***"
SECRET_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "api_key",
        "bot_token",
        "signing_secret",
        "webhook_secret_token",
    }
)
#: keys (or key prefixes, dotted) that only take effect when the process starts again
RESTART_KEYS: tuple[str, ...] = (
    "gateway.listen",  # the listeners are bound at start
    "gateway.ws_max_message_bytes",  # the WebSocket factory's frame caps
    "store",  # the database is opened at start
    "events",  # the bus and its replay buffer
    "bridges",  # bridge services are built at start
    "cron.jobs",  # declared jobs are loaded at start
    "heartbeat.interval_s",  # the heartbeat timer's period
)
MAX_TOML_BYTES = 1024 * 1024
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)([^/@\s]*)(@)")


# -- reading -------------------------------------------------------------------------------------


def is_secret_key(name: str) -> bool:
    return name in SECRET_KEYS or name.endswith("_secret") or name.endswith("_token")


def config_tree(config: Any) -> Any:
    """The config as JSON mirroring the TOML tree (TOML key names, no empty sections)."""
    if attrs.has(type(config)):
        out: dict[str, Any] = {}
        for field in attrs.fields(type(config)):
            value = getattr(config, field.name)
            if value is None:
                continue
            key = field.metadata.get("key", field.name)
            if field.name == "body_limits_set":
                value = {**DEFAULT_BODY_LIMITS, "/": config.body_limit_bytes, **value}
            out[key] = config_tree(value)
        return out
    if isinstance(config, Mapping):
        return {str(k): config_tree(v) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return [config_tree(v) for v in config]
    return config


def redact(tree: Any, key: str = "") -> Any:
    """Every secret as ``"***"``, and the password of any URL's user-info."""
    if isinstance(tree, dict):
        return {k: redact(v, k) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v, key) for v in tree]
    if isinstance(tree, str):
        if is_secret_key(key) and tree:
            return REDACTED
        return _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + m.group(3), tree)
    return tree


def secret_values(config: Config) -> list[str]:
    """The secret strings of a config (for scrubbing logs)."""
    out: list[str] = []

    def walk(tree: Any, key: str) -> None:
        if isinstance(tree, dict):
            for k, v in tree.items():
                walk(v, k)
        elif isinstance(tree, list):
            for v in tree:
                walk(v, key)
        elif isinstance(tree, str) and tree:
            if is_secret_key(key):
                out.append(tree)
            else:
                out.extend(m.group(2) for m in _URL_USERINFO.finditer(tree) if m.group(2))

    walk(config_tree(config), "")
    return out


def read_file(path: str | None) -> str:
    if path is None:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as e:
        raise GatewayError("unavailable", f"cannot read the config file: {e}") from None


def etag_for(file_text: str, config: Config) -> str:
    """Changes when the file's text or the running config changes (strong, quoted)."""
    h = hashlib.sha256(file_text.encode("utf-8"))
    h.update(b"\0")
    h.update(json.dumps(redact(config_tree(config)), sort_keys=True).encode())
    return '"' + h.hexdigest()[:32] + '"'


def current_etag(gw: Gateway) -> str:
    return etag_for(read_file(gw.config_path), gw.config)


def check_if_match(gw: Gateway, if_match: str | None) -> None:
    """``If-Match``: ``*`` or any listed tag equal to the current one; else 412."""
    if not if_match:
        return
    tags = [t.strip() for t in if_match.split(",")]
    if "*" in tags:
        return
    current = current_etag(gw)
    if not any((t[2:] if t.startswith("W/") else t) == current for t in tags):
        raise GatewayError(
            "precondition_failed", "the config changed since that ETag was read; read it again"
        )


def get_config(gw: Gateway) -> dict[str, Any]:
    return {"config": redact(config_tree(gw.config)), "etag": current_etag(gw)}


# -- changing ------------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _keep_stars(value: Any, old: Any, path: str, key: str) -> Any:
    """Resolve ``"***"`` under secret keys to the value the file already has there."""
    if isinstance(value, str) and value == REDACTED and is_secret_key(key):
        if old is None:
            raise invalid(f"{path}: '***' stands for the existing secret, and there is none")
        return old
    if isinstance(value, dict):
        old_map = old if isinstance(old, dict) else {}
        return {k: _keep_stars(v, old_map.get(k), _join(path, k), k) for k, v in value.items()}
    if isinstance(value, list):
        old_list = old if isinstance(old, list) else []
        return [
            _keep_stars(v, old_list[i] if i < len(old_list) else None, f"{path}[{i}]", key)
            for i, v in enumerate(value)
        ]
    return value


def _no_nulls(value: Any, path: str) -> None:
    if value is None:
        raise invalid(f"{path}: null is only allowed to remove a key")
    if isinstance(value, dict):
        for k, v in value.items():
            if v is not None:
                _no_nulls(v, _join(path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_nulls(v, f"{path}[{i}]")


def merge_patch(container: Any, patch: Mapping[str, Any], path: str = "") -> None:
    """RFC 7396 onto a tomlkit container: null removes, objects merge, the rest replaces."""
    for key, value in patch.items():
        key_path = _join(path, key)
        if not isinstance(key, str) or not key:
            raise invalid(f"{key_path}: keys must be non-empty strings")
        if value is None:
            if key in container:
                del container[key]
            continue
        if isinstance(value, dict):
            current = container.get(key)
            if not isinstance(current, dict) or isinstance(current, AoT):
                container[key] = tomlkit.table()
                current = container[key]
            merge_patch(current, value, key_path)
            continue
        if value == REDACTED and is_secret_key(key):
            continue  # "***" leaves a secret as it is
        _no_nulls(value, key_path)
        old = container.get(key)
        resolved = _keep_stars(value, old, key_path, key)
        try:
            container[key] = resolved
        except (ValueError, TypeError) as e:
            raise invalid(f"{key_path}: cannot be written as TOML: {e}") from None


_BARE = re.compile(r"[A-Za-z0-9_-]+")


def dotted(parts: tuple[str, ...]) -> str:
    """TOML's dotted-key spelling: ``gateway.body_limits."/v1/"``."""
    return ".".join(p if _BARE.fullmatch(p) else json.dumps(p) for p in parts)


def _leaves(tree: Any, path: tuple[str, ...], out: dict[tuple[str, ...], Any]) -> None:
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            _leaves(v, (*path, k), out)
    else:
        out[path] = tree


def _diff(old: Config, new: Config) -> list[tuple[str, ...]]:
    """Keys whose effective value differs (lists and empty tables count whole)."""
    a: dict[tuple[str, ...], Any] = {}
    b: dict[tuple[str, ...], Any] = {}
    _leaves(config_tree(old), (), a)
    _leaves(config_tree(new), (), b)
    out = []
    for key in a.keys() | b.keys():
        old_value, new_value = a.get(key, _MISSING), b.get(key, _MISSING)
        if old_value == new_value or {_key(old_value), _key(new_value)} == {"missing", "empty"}:
            continue  # an empty table that gained (or lost) keys: those keys are listed
        out.append(key)
    return sorted(out)


def _key(value: Any) -> str:
    return "missing" if value is _MISSING else "empty" if value == {} else "value"


def changed_keys(old: Config, new: Config) -> list[str]:
    return [dotted(k) for k in _diff(old, new)]


_MISSING = object()


def needs_restart(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "[") for p in RESTART_KEYS)


@attrs.frozen
class Outcome:
    applied: tuple[str, ...]
    restart_required: tuple[str, ...]
    changes: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"applied": list(self.applied), "restart_required": list(self.restart_required)}


def validate_text(gw: Gateway, text: str) -> Config:
    """Parse and check a whole config text the way a start would; 400 names the key."""
    if len(text.encode("utf-8")) > MAX_TOML_BYTES:
        raise GatewayError("payload_too_large", "a config file is at most 1 MiB")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise invalid(f"invalid TOML: {e}") from None
    try:
        config = gw.config_overrides(config_from_dict(raw, os.environ))
        _startup_checks(gw, config)
    except ConfigError as e:
        raise invalid(str(e)) from None
    return config


def _startup_checks(gw: Gateway, config: Config) -> None:
    """What ``build_gateway``/``compose`` would refuse at the next start."""
    from twisted.internet.endpoints import serverFromString

    from gatewayd.agent.tools import resolve_workspace
    from gatewayd.app import store_path

    store_path(config, gw.state_dir)
    try:
        resolve_workspace(config.agent.workspace, gw.state_dir)
    except ValueError as e:
        raise ConfigError(f"agent.workspace: {e}") from None
    for description in config.gateway.listen:
        try:
            serverFromString(gw.reactor, description)
        except Exception as e:
            raise ConfigError(f"gateway.listen: {description!r}: {e}") from None


def plan(gw: Gateway, new: Config) -> Outcome:
    """What a change would do: keys applied now, keys waiting for a restart, the diff."""
    changed = _diff(gw.config, new)
    restart = [k for k in changed_keys(gw.boot_config, new) if needs_restart(k)]
    applied = [dotted(k) for k in changed if not needs_restart(dotted(k))]
    before: dict[tuple[str, ...], Any] = {}
    after: dict[tuple[str, ...], Any] = {}
    _leaves(redact(config_tree(gw.config)), (), before)
    _leaves(redact(config_tree(new)), (), after)
    changes = tuple({"key": dotted(k), "old": before.get(k), "new": after.get(k)} for k in changed)
    return Outcome(tuple(applied), tuple(restart), changes)


# -- applying ------------------------------------------------------------------------------------

Applier = Callable[["Gateway", Config, Config], None]


def _apply_tokens(gw: Gateway, old: Config, new: Config) -> None:
    if gw.static_tokens is not None and old.gateway.api_keys != new.gateway.api_keys:
        gw.tokens.replace_static(gw.static_tokens(new))


#: the agent keys the provider object is built from (gatewayd.app.build_provider)
PROVIDER_KEYS = (
    "provider",
    "model",
    "base_url",
    "api_key",
    "connect_timeout_s",
    "read_timeout_s",
    "max_retries",
)


def _apply_provider(gw: Gateway, old: Config, new: Config) -> None:
    if any(getattr(old.agent, k) != getattr(new.agent, k) for k in PROVIDER_KEYS):
        from gatewayd.app import build_provider

        gw.provider = build_provider(new, gw.reactor)


def _apply_workspace(gw: Gateway, old: Config, new: Config) -> None:
    if old.agent.workspace != new.agent.workspace:
        from gatewayd.agent.tools import resolve_workspace

        try:
            gw.workspace = resolve_workspace(new.agent.workspace, gw.state_dir)
        except ValueError as e:
            raise ConfigError(f"agent.workspace: {e}") from None


def _apply_limits(gw: Gateway, old: Config, new: Config) -> None:
    gw.streams.max_per_token = new.gateway.max_streams_per_token
    if gw.file_log is not None:
        gw.file_log.set_max_bytes(new.gateway.log_max_bytes)
        gw.file_log.set_secrets(log_secrets(gw, new))


def log_secrets(gw: Gateway, config: Config) -> list[str]:
    """What the log must never show: the config's secrets and every static token."""
    tokens = [t[0] for t in gw.static_tokens(config)] if gw.static_tokens is not None else []
    return secret_values(config) + tokens


APPLIERS: tuple[Applier, ...] = (_apply_workspace, _apply_tokens, _apply_provider, _apply_limits)


def swap(gw: Gateway, new: Config) -> None:
    """Make ``new`` the running config, or put the old one back and raise 400."""
    old = gw.config
    provider, workspace = gw.provider, gw.workspace
    gw.config = new
    done: list[Callable[[Config, Config], None]] = []
    try:
        for applier in APPLIERS:
            applier(gw, old, new)
        for listener in list(gw.config_listeners):
            listener(old, new)
            done.append(listener)
    except Exception as e:
        gw.config = old
        gw.provider, gw.workspace = provider, workspace
        undo: list[Callable[[], None]] = [
            lambda: _apply_tokens(gw, new, old),
            lambda: _apply_limits(gw, new, old),
            *[(lambda listener=listener: listener(new, old)) for listener in reversed(done)],
        ]
        for step in undo:
            try:
                step()
            except Exception:
                _log.failure("could not roll back part of a config change")
        gw.metrics.config_changed("rolled_back")
        if isinstance(e, GatewayError):
            raise
        what = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        raise invalid(
            f"the change could not be applied ({what}); the previous config is still running"
        ) from None


def write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(prefix=".gatewayd-config-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _need_file(gw: Gateway) -> str:
    if gw.config_path is None:
        raise GatewayError(
            "conflict",
            "this gateway runs without a config file: start it with --config FILE "
            "(or $GATEWAYD_CONFIG) to change its config over the API",
        )
    return gw.config_path


def _commit(
    gw: Gateway,
    principal: Principal | None,
    action: str,
    new: Config,
    text: str | None,
    old_text: str,
) -> dict[str, Any]:
    outcome = plan(gw, new)
    keys = [c["key"] for c in outcome.changes]
    old, old_provider = gw.config, gw.provider
    swap(gw, new)
    if text is not None and text != old_text:
        try:
            write_atomically(_need_file(gw), text)
        except OSError as e:
            swap(gw, old)
            gw.provider = old_provider
            raise GatewayError(
                "unavailable", f"could not write the config file ({e.strerror}); nothing changed"
            ) from None
    if gw.provider is not old_provider:
        _close_later(old_provider)
    if keys or (text is not None and text != old_text):
        gw.bus.publish("config_patched", keys=keys)
    gw.audit(principal, action, gw.config_path or "", keys=keys)
    gw.metrics.config_changed("applied")
    _log.info(
        "config {action}: applied {applied}; restart required for {restart}",
        action=action,
        applied=",".join(outcome.applied) or "-",
        restart=",".join(outcome.restart_required) or "-",
    )
    return outcome.to_json()


def _close_later(provider: Any) -> None:
    """The replaced provider's pool: runs still on it finish, then their connections close."""
    close = getattr(provider, "close", None)
    if close is not None:
        try:
            close().addErrback(lambda f: _log.failure("closing the old provider failed", f))
        except Exception:
            _log.failure("closing the old provider failed")


def patch_config(
    gw: Gateway,
    principal: Principal | None,
    patch: Mapping[str, Any],
    *,
    if_match: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    check_if_match(gw, if_match)
    if not dry_run:
        _need_file(gw)
    old_text = read_file(gw.config_path)
    try:
        doc = tomlkit.parse(old_text)
    except Exception as e:
        raise GatewayError("conflict", f"the config file is not valid TOML: {e}") from None
    merge_patch(doc, patch)
    text = tomlkit.dumps(doc)
    new = validate_text(gw, text)
    if dry_run:
        outcome = plan(gw, new)
        return {"dry_run": True, **outcome.to_json(), "changes": list(outcome.changes)}
    return _commit(gw, principal, "config.patch", new, text, old_text)


def replace_config(
    gw: Gateway, principal: Principal | None, text: str, *, if_match: str | None = None
) -> dict[str, Any]:
    check_if_match(gw, if_match)
    _need_file(gw)
    old_text = read_file(gw.config_path)
    new = validate_text(gw, text)
    return _commit(gw, principal, "config.set", new, text, old_text)


def apply_config(gw: Gateway, principal: Principal | None) -> dict[str, Any]:
    """Reload the file (and TLS material): what SIGHUP does."""
    from gatewayd.endpoints import reload_all_tls

    text = read_file(gw.config_path)
    new = validate_text(gw, text) if gw.config_path is not None else gw.config
    result = _commit(gw, principal, "config.apply", new, None, text)
    reload_all_tls()
    return result


# -- SIGHUP --------------------------------------------------------------------------------------


def install_sighup(gw: Gateway) -> None:
    """SIGHUP reloads the config, TLS material and API keys; no connection is dropped."""
    if not hasattr(signal, "SIGHUP"):
        return

    def reload() -> None:
        try:
            result = apply_config(gw, None)
        except GatewayError as e:
            _log.error("SIGHUP: config not reloaded: {message}", message=e.message)
        except Exception:
            _log.failure("SIGHUP: config reload failed")
        else:
            _log.info("SIGHUP: config reloaded ({applied})", applied=result)

    def handler(signum: int, frame: Any) -> None:
        gw.reactor.callFromThread(reload)

    signal.signal(signal.SIGHUP, handler)


# -- REST: the four /api/config routes -------------------------------------------------------------


def if_match_header(request: Any) -> str | None:
    value = request.getHeader(b"if-match")
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)
