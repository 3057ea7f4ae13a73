"""Building the parts: the gateway core with its store, tokens and agent, and the site."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import IO, Any

from twisted.web.resource import IResource

from gatewayd import ops
from gatewayd.agent.base import Provider
from gatewayd.agent.tools import default_registry, resolve_workspace
from gatewayd.auth import TokenRegistry, new_token
from gatewayd.config import Config, ConfigError
from gatewayd.core import Gateway
from gatewayd.service import GatewayService
from gatewayd.store.sqlite import SQLiteStore
from gatewayd.web.admin import admin_resources
from gatewayd.web.dashboard import Dashboard
from gatewayd.web.hooks import mount as mount_hooks
from gatewayd.web.openai_api import mount as mount_openai
from gatewayd.web.operations import operations_resources
from gatewayd.web.rest import build_app, static_routes
from gatewayd.web.root import HealthResource, RootResource
from gatewayd.web.site import GatewaySite
from gatewayd.web.sse import sse_resources
from gatewayd.web.wamp import mount as mount_wamp
from gatewayd.web.ws import mount as mount_websocket

ADMIN_TOKEN_FILE = "admin-token"


def build_provider(config: Config, reactor: Any) -> Provider:
    agent = config.agent
    if agent.provider == "openai":
        from gatewayd.agent.providers.openai import OpenAIProvider

        return OpenAIProvider(
            reactor,
            base_url=agent.base_url,
            api_key=agent.api_key or os.environ.get("OPENAI_API_KEY", ""),
            model=agent.effective_model,
            connect_timeout_s=agent.connect_timeout_s,
            read_timeout_s=agent.read_timeout_s,
            max_retries=agent.max_retries,
        )
    if agent.provider == "anthropic":
        from gatewayd.agent.providers.anthropic import AnthropicProvider

        return AnthropicProvider(
            reactor,
            base_url=agent.base_url,
            api_key=agent.api_key or os.environ.get("ANTHROPIC_API_KEY", ""),
            model=agent.effective_model,
            connect_timeout_s=agent.connect_timeout_s,
            read_timeout_s=agent.read_timeout_s,
            max_retries=agent.max_retries,
        )
    from gatewayd.agent.providers.echo import EchoProvider

    return EchoProvider(agent.effective_model)


def store_path(config: Config, state_dir: str) -> str:
    url = config.store.url or f"sqlite:///{os.path.join(state_dir, 'gatewayd.sqlite3')}"
    url = url.replace("<state-dir>", state_dir)
    match = re.fullmatch(r"sqlite:///?(.+)", url)
    if not match:
        kind = url.split(":", 1)[0]
        raise ConfigError(
            f"store.url: unsupported store {kind!r}: this build stores in sqlite:///PATH"
        )
    path = match.group(1)
    if url.startswith("sqlite:////") or not url.startswith("sqlite:///"):
        return path
    return path if os.path.isabs(path) else os.path.join(state_dir, path)


def static_tokens(
    config: Config, state_dir: str, cli_token: str | None, announce: IO[str] | None
) -> list[tuple[str, str, str, str]]:
    """(token, role, name, kind) for every token that is not in the store.

    With no configured key and no ``--token``, the first start makes an admin token, writes
    it to ``<state-dir>/admin-token`` (0600) and prints it once; later starts reuse it.
    """
    tokens = [
        (k.key, k.role, k.name or f"api_keys[{i}]", "config")
        for i, k in enumerate(config.gateway.api_keys)
    ]
    if cli_token:
        tokens.append((cli_token, "admin", "--token", "cli"))
    if tokens:
        return tokens
    path = os.path.join(state_dir, ADMIN_TOKEN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError:
        token = new_token()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        if announce is not None:
            announce.write(f"gatewayd: generated an admin token (saved to {path}):\n{token}\n")
            announce.flush()
    if not token:
        raise ConfigError(f"{path}: the admin token file is empty")
    return [(token, "admin", "admin-token", "generated")]


def build_gateway(
    config: Config,
    *,
    reactor: Any,
    state_dir: str,
    cli_token: str | None = None,
    announce: IO[str] | None = None,
    clock: Any = None,
    config_path: str | None = None,
    config_overrides: Callable[[Config], Config] | None = None,
) -> tuple[Gateway, GatewayService]:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    tokens = TokenRegistry(clock if clock is not None else reactor)
    for token, role, name, kind in static_tokens(config, state_dir, cli_token, announce):
        tokens.add_static(token, role, name, kind)
    try:
        workspace = resolve_workspace(config.agent.workspace, state_dir)
    except ValueError as e:
        raise ConfigError(f"agent.workspace: {e}") from None
    gateway = Gateway(
        config,
        reactor=reactor,
        clock=clock,
        store=SQLiteStore(reactor, store_path(config, state_dir)),
        provider=build_provider(config, reactor),
        tools=default_registry(),
        tokens=tokens,
        state_dir=state_dir,
        workspace=workspace,
    )
    # config changes over the API (gatewayd.config_api) re-read this file, re-apply the CLI
    gateway.config_path = config_path
    if config_overrides is not None:
        gateway.config_overrides = config_overrides
    gateway.static_tokens = lambda c: static_tokens(c, state_dir, cli_token, None)
    return gateway, GatewayService(gateway, log_dir=state_dir)


def build_resource(gateway: Gateway, service: GatewayService | None = None) -> IResource:
    """The root resource: fixed paths in a dict (fast), the rest through Klein."""
    ops.load_all()
    fixed = static_routes(gateway)  # REST rows without path parameters
    fixed[b"/health"] = HealthResource(gateway)
    websockets = mount_websocket(gateway, fixed)  # /ws, /ws/chat, POST /rpc
    wamp = mount_wamp(gateway, fixed)  # /wamp: WAMP v2 for Autobahn clients (§13)
    if service is not None:
        service.stopping_hooks += [websockets.going_away, wamp.going_away]
    fixed.update(sse_resources(gateway))  # /api/events, /api/chat/stream
    # /metrics /ready /api/openapi.json /api/asyncapi.json /api/daemon/logs /api/config*
    fixed.update(operations_resources(gateway))
    fixed.update(admin_resources(gateway))  # /admin/paircode, /admin/shutdown (loopback only)
    app = build_app(gateway, mounts=[mount_hooks])  # + POST /hooks/<name>, /bridges/*
    klein = mount_openai(gateway, app.resource())  # /v1/* in front of Klein
    root = RootResource(gateway, klein, fixed, Dashboard())
    return gateway.metrics.wrap(root)  # request timing and the in-flight gauge


def build_site(gateway: Gateway, service: GatewayService | None = None) -> GatewaySite:
    site = GatewaySite(build_resource(gateway, service), gateway)
    site.request_finished = gateway.metrics.request_finished
    if service is not None:
        service.sites.append(site)
    return site
