"""Strict JSON for input from the network: UTF-8 only, and no lone surrogates.

``json.loads`` accepts ``"\\ud800"`` and yields a string that cannot be encoded back to
UTF-8 — which then fails deep inside the store or a response writer. Every transport parses
client JSON through :func:`loads`, so such input is a plain "invalid JSON" error at the door.
"""

from __future__ import annotations

import json
import re
from typing import Any

_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidJSON(ValueError):
    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


def loads(data: bytes | str) -> Any:
    """Decode JSON; raises :class:`InvalidJSON` (a ValueError) with a short ``msg``."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidJSON("not UTF-8") from None
    try:
        value = json.loads(data)
    except json.JSONDecodeError as e:
        raise InvalidJSON(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise InvalidJSON("nested too deeply") from None
    if _ESCAPED_SURROGATE.search(data) and _has_lone_surrogate(value):
        raise InvalidJSON("a string holds a lone UTF-16 surrogate")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
