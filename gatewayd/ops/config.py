"""Config over every transport: read (redacted), patch, replace, reload.

The work is in :mod:`gatewayd.config_api`; REST adds the ``ETag``/``If-Match`` headers and
the TOML body of ``PUT /api/config`` (:mod:`gatewayd.web.operations`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gatewayd import config_api
from gatewayd.ops import Call, Param, operation

if TYPE_CHECKING:
    from gatewayd.core import Gateway

IF_MATCH = Param(
    "if_match", str, max_length=1024, doc="the ETag the change was based on; a stale one gives 412"
)


@operation("config.get", "read", summary="The effective config, secrets shown as ***, and its ETag")
async def config_get(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return config_api.get_config(gw)


@operation(
    "config.patch",
    "admin",
    Param("patch", dict, required=True, doc="a JSON merge patch (RFC 7396) of the TOML tree"),
    IF_MATCH,
    Param("dry_run", bool, default=False, doc="answer the diff without changing anything"),
    summary="Merge-patch the config file, keeping its comments; apply what can be applied live",
)
async def config_patch(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return config_api.patch_config(
        gw, call.principal, p["patch"], if_match=p["if_match"], dry_run=p["dry_run"]
    )


@operation(
    "config.set",
    "admin",
    Param(
        "toml",
        str,
        required=True,
        max_length=config_api.MAX_TOML_BYTES,
        doc="the whole config file, as TOML",
    ),
    IF_MATCH,
    summary="Replace the config file (validated first) and apply it",
)
async def config_set(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return config_api.replace_config(gw, call.principal, p["toml"], if_match=p["if_match"])


@operation(
    "config.apply",
    "admin",
    summary="Reload the config file, TLS material and API keys (what SIGHUP does)",
)
async def config_apply(gw: Gateway, call: Call, p: dict[str, Any]) -> dict[str, Any]:
    return config_api.apply_config(gw, call.principal)
