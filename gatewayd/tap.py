"""``twistd gateway``: the options and the one function that composes the service tree."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from gatewayd.config import Config, ConfigError, load_config


def default_state_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".local", "state", "gatewayd")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run gatewayd, an AI-agent gateway. --listen takes any Twisted server endpoint "
        "string (tcp:, ssl:, unix:, systemd:, and gatewayd's mtls:) and may repeat."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (default: $GATEWAYD_CONFIG, else built-ins)"],
        [
            "state-dir",
            None,
            None,
            "state directory (default: $GATEWAYD_STATE_DIR or ~/.local/state/gatewayd)",
        ],
        ["token", None, None, "add an admin token (prefer --token-file: argv shows in ps)"],
        ["token-file", None, None, "read an admin token from this file"],
        ["provider", None, None, "agent provider: echo, openai or anthropic"],
        ["model", None, None, "model name"],
        ["base-url", None, None, "provider base URL (OpenAI-compatible servers)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this endpoint string (repeatable; default tcp:18789:interface=127.0.0.1)."""
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def postOptions(self) -> None:
        try:
            self["gateway_config"] = options_config(self, os.environ)
        except ConfigError as e:
            sys.stderr.write(f"gatewayd: config error: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None


def options_config(options: Any, env: Any) -> Config:
    path = options["config"] or env.get("GATEWAYD_CONFIG") or None
    overrides = cli_overrides(options)
    config = overrides(load_config(path, env))
    #: kept for config changes over the API, which re-read the file and re-apply the CLI
    options["gateway_config_path"] = os.path.abspath(path) if path else None
    options["gateway_config_overrides"] = overrides
    if options["token"] is not None and not _token_ok(options["token"]):
        raise ConfigError("--token: must be at least 16 URL-safe characters")
    if options["token-file"]:
        try:
            with open(options["token-file"], encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise ConfigError(
                f"--token-file: cannot read {options['token-file']}: {e.strerror}"
            ) from None
        if not _token_ok(token):
            raise ConfigError("--token-file: the token must be at least 16 URL-safe characters")
        options["token"] = token
    return config


def cli_overrides(options: Any) -> Callable[[Config], Config]:
    """The command line's say over a config: --provider, --model, --base-url, --listen."""
    agent_overrides: dict[str, Any] = {}
    if options["provider"]:
        if options["provider"] not in ("echo", "openai", "anthropic"):
            raise ConfigError("--provider: must be one of echo, openai, anthropic")
        agent_overrides["provider"] = options["provider"]
    if options["model"]:
        agent_overrides["model"] = options["model"]
    if options["base-url"]:
        agent_overrides["base_url"] = options["base-url"]
    listen = tuple(options["listen"])

    def apply(config: Config) -> Config:
        if agent_overrides:
            config = attrs.evolve(config, agent=attrs.evolve(config.agent, **agent_overrides))
        if listen:
            config = attrs.evolve(config, gateway=attrs.evolve(config.gateway, listen=listen))
        return config

    return apply


def _token_ok(token: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9_\-.~+/=]{16,512}", token))


def makeService(options: Options, reactor: Any = None) -> Any:
    """Compose the whole service tree (see DESIGN.md, "The shape")."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    state_dir = os.path.abspath(
        options["state-dir"] or os.environ.get("GATEWAYD_STATE_DIR") or default_state_dir()
    )
    try:
        service = compose(
            options["gateway_config"],
            reactor=reactor,
            state_dir=state_dir,
            cli_token=options["token"],
            announce=sys.stdout,
            config_path=options.get("gateway_config_path"),
            config_overrides=options.get("gateway_config_overrides"),
        )
    except ConfigError as e:
        sys.stderr.write(f"gatewayd: config error: {e}\n")
        raise SystemExit(1) from None
    from gatewayd.process import run_as_daemon

    run_as_daemon(service, reactor)
    return service


def compose(
    config: Config,
    *,
    reactor: Any,
    state_dir: str,
    cli_token: str | None = None,
    announce: Any = None,
    config_path: str | None = None,
    config_overrides: Callable[[Config], Config] | None = None,
) -> Any:
    """The gateway core, its site on every listener, and its timers, as one MultiService."""
    from gatewayd.app import build_gateway, build_site

    gateway, service = build_gateway(
        config,
        reactor=reactor,
        state_dir=state_dir,
        cli_token=cli_token,
        announce=announce,
        config_path=config_path,
        config_overrides=config_overrides,
    )
    site = build_site(gateway, service)
    for description in config.gateway.listen:
        try:
            endpoint = serverFromString(reactor, description)
        except Exception as e:  # a bad endpoint string is a config error, said in one line
            raise ConfigError(f"gateway.listen: {description!r}: {e}") from None
        listener = StreamServerEndpointService(endpoint, site)
        listener.setName(f"listen:{description}")
        listener.setServiceParent(service)
        gateway.listeners.append(description)
    # chat bridges (Telegram, Slack, Discord, outbound webhook, IRC); also checks the hooks
    from gatewayd.bridges import install_channels

    install_channels(gateway, service)
    # timers: children of the GatewayService, so they start once the core has
    from gatewayd.heartbeat import HeartbeatService
    from gatewayd.prune import PruneService
    from gatewayd.scheduler import CronService

    CronService(gateway, clock=gateway.clock).setServiceParent(service)
    HeartbeatService(gateway, clock=gateway.clock).setServiceParent(service)
    PruneService(gateway, clock=gateway.clock).setServiceParent(service)
    return service
