"""Config: TOML with ``${VAR}`` interpolation, validated into frozen typed values.

Every problem becomes a :class:`ConfigError` whose one-line message names the key, so an
operator sees ``gateway.body_limit_bytes: expected an integer, got 'lots'`` and nothing else.
The loader is driven by the attrs classes below: a field's annotation says its type, its
metadata may add a check, and unknown keys are errors (typos must not pass silently).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs

DEFAULT_LISTEN = "tcp:18789:interface=127.0.0.1"
ROLES = ("admin", "operator", "chat", "viewer")
POLICIES = ("allow", "ask", "deny")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

T = TypeVar("T")


class ConfigError(Exception):
    """A config problem, already phrased as one line naming the key."""


# -- checks -------------------------------------------------------------------------------------


def _check(fn: Callable[[Any], str | None]) -> dict[str, Any]:
    return {"check": fn}


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be positive"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must not be negative"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def http_url(v: Any) -> str | None:
    """An ``http://`` or ``https://`` URL with an ASCII host, or empty (the default)."""
    if v == "":
        return None
    parts = urllib.parse.urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL"
    if not parts.hostname.isascii():
        return "must name its host in ASCII (punycode)"
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return "has an invalid port"
    return None


def _local_bus(v: Any) -> str | None:
    if v == "local":
        return None
    return 'only the in-process bus ("local") is supported; a shared bus across replicas is not'


def _cidrs(v: Any) -> str | None:
    for item in v:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not a CIDR"
    return None


def _body_limits(v: Any) -> str | None:
    for prefix, limit in v.items():
        if not prefix.startswith("/"):
            return f"{prefix!r}: a path prefix must start with '/'"
        if limit <= 0:
            return f"{prefix!r}: must be positive"
    return None


# -- the schema ---------------------------------------------------------------------------------


@attrs.frozen
class ApiKey:
    key: str
    role: str = attrs.field(default="admin", metadata=_check(one_of(*ROLES)))
    name: str = ""


@attrs.frozen
class ClientCert:
    role: str = attrs.field(metadata=_check(one_of(*ROLES)))
    subject_cn: str = ""
    fingerprint_sha256: str = ""


@attrs.frozen
class RateLimit:
    rate_per_s: float = attrs.field(default=20.0, metadata=_check(positive))
    burst: int = attrs.field(default=40, metadata=_check(positive))


@attrs.frozen
class WsRateLimit:
    max_messages: int = attrs.field(default=60, metadata=_check(positive))
    window_ms: int = attrs.field(default=60000, metadata=_check(positive))


DEFAULT_BODY_LIMITS = {
    "/": 65536,
    "/v1/": 4194304,
    "/hooks/": 1048576,
    "/bridges/": 1048576,
    "/api/config": 1048576,
}


@attrs.frozen
class GatewayConfig:
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    body_limit_bytes: int = attrs.field(default=65536, metadata=_check(positive))
    header_timeout_s: float = attrs.field(default=10.0, metadata=_check(positive))
    request_timeout_s: float = attrs.field(default=30.0, metadata=_check(positive))
    sse_keepalive_s: float = attrs.field(default=15.0, metadata=_check(positive))
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), metadata=_check(_cidrs))
    metrics_public: bool = False
    shutdown_grace_s: float = attrs.field(default=10.0, metadata=_check(non_negative))
    ws_max_message_bytes: int = attrs.field(default=1048576, metadata=_check(positive))
    max_connections: int = attrs.field(default=10000, metadata=_check(positive))
    max_connections_per_ip: int = attrs.field(default=256, metadata=_check(positive))
    max_streams_per_token: int = attrs.field(default=64, metadata=_check(positive))
    log_max_bytes: int = attrs.field(default=50 * 1024 * 1024, metadata=_check(positive))
    #: only the prefixes the operator set; see :func:`body_limit_for` for the defaults
    body_limits_set: dict[str, int] = attrs.field(
        factory=dict, metadata={**_check(_body_limits), "key": "body_limits"}
    )
    api_keys: tuple[ApiKey, ...] = ()
    client_certs: tuple[ClientCert, ...] = ()
    rate_limit: RateLimit = RateLimit()
    ws_rate_limit: WsRateLimit = WsRateLimit()


@attrs.frozen
class ToolConfig:
    policy: str = attrs.field(default="ask", metadata=_check(one_of(*POLICIES)))


@attrs.frozen
class Pricing:
    input_cents_per_mtok: float = attrs.field(default=0.0, metadata=_check(non_negative))
    output_cents_per_mtok: float = attrs.field(default=0.0, metadata=_check(non_negative))


@attrs.frozen
class AgentConfig:
    provider: str = attrs.field(
        default="echo", metadata=_check(one_of("echo", "openai", "anthropic"))
    )
    model: str = ""
    base_url: str = attrs.field(default="", metadata=_check(http_url))
    api_key: str = ""
    system_prompt: str = ""
    workspace: str = ""
    max_concurrent_runs: int = attrs.field(default=32, metadata=_check(positive))
    max_queue_per_session: int = attrs.field(default=16, metadata=_check(positive))
    budget_cents_per_day: float = attrs.field(default=0.0, metadata=_check(non_negative))
    approval_timeout_s: float = attrs.field(default=300.0, metadata=_check(positive))
    connect_timeout_s: float = attrs.field(default=10.0, metadata=_check(positive))
    read_timeout_s: float = attrs.field(default=120.0, metadata=_check(positive))
    max_retries: int = attrs.field(default=3, metadata=_check(non_negative))
    max_tool_rounds: int = attrs.field(default=16, metadata=_check(positive))
    agents: tuple[str, ...] = ()
    tools: dict[str, ToolConfig] = attrs.field(factory=dict)
    pricing: Pricing = Pricing()

    @property
    def effective_model(self) -> str:
        if self.model:
            return self.model
        return {"echo": "echo-1", "openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5"}[
            self.provider
        ]


@attrs.frozen
class StoreConfig:
    url: str = ""


@attrs.frozen
class EventsConfig:
    url: str = attrs.field(default="local", metadata=_check(_local_bus))
    replay_buffer: int = attrs.field(default=10000, metadata=_check(positive))


@attrs.frozen
class SessionsConfig:
    ttl_days: float = attrs.field(default=30.0, metadata=_check(positive))


@attrs.frozen
class RetentionConfig:
    runs_days: float = attrs.field(default=90.0, metadata=_check(positive))
    delivery_ids_days: float = attrs.field(default=7.0, metadata=_check(positive))
    cron_runs_keep: int = attrs.field(default=100, metadata=_check(positive))


@attrs.frozen
class HeartbeatConfig:
    interval_s: float = attrs.field(default=1800.0, metadata=_check(positive))
    prompt: str = ""
    channel: str = ""


@attrs.frozen
class WebhookConfig:
    secret: str
    scheme: str = attrs.field(
        default="hmac", metadata=_check(one_of("hmac", "github", "standard", "slack", "stripe"))
    )
    algorithm: str = attrs.field(
        default="sha256", metadata=_check(one_of("sha256", "sha384", "sha512"))
    )
    prompt: str = ""
    channel: str = ""
    max_age_s: int = attrs.field(default=300, metadata=_check(positive))
    body_limit_bytes: int = attrs.field(default=0, metadata=_check(non_negative))
    tools: tuple[str, ...] = ()
    session_id: str = ""


@attrs.frozen
class TelegramBridge:
    bot_token: str
    webhook_secret_token: str
    api_base: str = attrs.field(default="https://api.telegram.org", metadata=_check(http_url))
    allowed_users: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    default_target: str = ""


@attrs.frozen
class SlackBridge:
    bot_token: str
    signing_secret: str
    api_base: str = attrs.field(default="https://slack.com/api", metadata=_check(http_url))
    allowed_users: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    default_target: str = ""
    max_age_s: int = attrs.field(default=300, metadata=_check(positive))


@attrs.frozen
class DiscordBridge:
    public_key: str
    application_id: str
    bot_token: str = ""
    api_base: str = attrs.field(default="https://discord.com/api/v10", metadata=_check(http_url))
    allowed_users: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    default_target: str = ""


@attrs.frozen
class OutboundWebhookBridge:
    url: str = attrs.field(metadata=_check(http_url))
    secret: str
    max_attempts: int = attrs.field(default=5, metadata=_check(positive))
    backoff_base_s: float = attrs.field(default=1.0, metadata=_check(positive))
    default_target: str = ""


@attrs.frozen
class IrcBridge:
    endpoint: str
    nick: str = "gatewayd"
    channels: tuple[str, ...] = ()
    allowed_users: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    default_target: str = ""


@attrs.frozen
class BridgesConfig:
    telegram: TelegramBridge | None = None
    slack: SlackBridge | None = None
    discord: DiscordBridge | None = None
    webhook: OutboundWebhookBridge | None = None
    irc: IrcBridge | None = None


@attrs.frozen
class CronConfig:
    jobs: tuple[dict[str, Any], ...] = ()


@attrs.frozen
class Config:
    gateway: GatewayConfig = GatewayConfig()
    agent: AgentConfig = AgentConfig()
    store: StoreConfig = StoreConfig()
    events: EventsConfig = EventsConfig()
    sessions: SessionsConfig = SessionsConfig()
    retention: RetentionConfig = RetentionConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    webhooks: dict[str, WebhookConfig] = attrs.field(factory=dict)
    bridges: BridgesConfig = BridgesConfig()
    cron: CronConfig = CronConfig()


# -- loading ------------------------------------------------------------------------------------


def interpolate(value: Any, env: Mapping[str, str], path: str) -> Any:
    """Replace ``${VAR}`` in every string; an unset variable is an error naming key and var."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                raise ConfigError(f"{path}: environment variable {name} is not set")
            return env[name]

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env, _join(path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {_describe(value)}")
        _key_tp, val_tp = typing.get_args(tp)
        return {k: _convert(val_tp, v, _join(path, k)) for k, v in value.items()}
    if attrs.has(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {_describe(value)}")
        return load_section(tp, value, path)
    raise ConfigError(f"{path}: unsupported type")  # pragma: no cover


def load_section(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.metadata.get("key", f.name): f for f in attrs.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise ConfigError(f"{_join(path, key)}: unknown key")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        key_path = _join(path, name)
        if name not in data:
            if field.default is attrs.NOTHING:
                raise ConfigError(f"{key_path}: required")
            continue
        value = _convert(hints[field.name], data[name], key_path)
        check = field.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{key_path}: {problem}")
        kwargs[field.name] = value
    return cls(**kwargs)


def _cross_checks(config: Config) -> None:
    """Rules that span keys: secrets a listener or hook cannot run without."""
    for name, hook in config.webhooks.items():
        if not hook.secret:
            raise ConfigError(f"webhooks.{name}.secret: a webhook needs a secret")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            raise ConfigError(f"webhooks.{name}: names may use A-Z a-z 0-9 . _ - only")
        if hook.scheme == "standard" and not hook.secret.startswith("whsec_"):
            raise ConfigError(f"webhooks.{name}.secret: the standard scheme needs a whsec_ secret")
    secrets = {
        "telegram": ("webhook_secret_token", "bot_token"),
        "slack": ("signing_secret", "bot_token"),
        "discord": ("public_key", "application_id"),
        "webhook": ("secret", "url"),
        "irc": ("endpoint",),
    }
    for bridge, keys in secrets.items():
        section = getattr(config.bridges, bridge)
        if section is None:
            continue
        for key in keys:
            if not getattr(section, key):
                raise ConfigError(f"bridges.{bridge}.{key}: required for the {bridge} bridge")
    for i, cert in enumerate(config.gateway.client_certs):
        if not (cert.subject_cn or cert.fingerprint_sha256):
            raise ConfigError(f"gateway.client_certs[{i}]: needs subject_cn or fingerprint_sha256")
    for i, api_key in enumerate(config.gateway.api_keys):
        if len(api_key.key) < 16 or not re.fullmatch(r"[A-Za-z0-9_\-.~+/=]+", api_key.key):
            raise ConfigError(f"gateway.api_keys[{i}].key: must be at least 16 URL-safe characters")
    if not config.gateway.listen:
        raise ConfigError("gateway.listen: needs at least one endpoint")
    for i, job in enumerate(config.cron.jobs):
        if not isinstance(job.get("name", ""), str):
            raise ConfigError(f"cron.jobs[{i}].name: expected a string")


def parse_config(text: str, env: Mapping[str, str] | None = None, source: str = "config") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    return config_from_dict(raw, env)


def config_from_dict(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    data = interpolate(dict(raw), os.environ if env is None else env, "")
    config = load_section(Config, data)
    _cross_checks(config)
    return config


def load_config(path: str | None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path``; ``None`` means the built-in defaults."""
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config is not UTF-8") from None
    return parse_config(text, env, source=path)


def body_limit_for(config: GatewayConfig, path: str) -> int:
    """The longest matching prefix wins (CONTRACT §2).

    ``body_limit_bytes`` is the default cap: it stands for the ``"/"`` entry unless the
    operator set ``"/"`` in ``gateway.body_limits`` explicitly.
    """
    limits = {**DEFAULT_BODY_LIMITS, "/": config.body_limit_bytes, **config.body_limits_set}
    best = max((p for p in limits if path.startswith(p)), key=len, default="/")
    return limits.get(best, config.body_limit_bytes)
