"""One error family; every transport renders it in its own shape."""

from __future__ import annotations

from typing import Any

#: REST code -> HTTP status (CONTRACT §4).
STATUS: dict[str, int] = {
    "invalid_request": 400,
    "unauthorized": 401,
    "missing_signature": 401,
    "invalid_signature": 401,
    "stale_signature": 401,
    "forbidden": 403,
    "not_found": 404,
    "model_not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "conflict": 409,
    "precondition_failed": 412,
    "payload_too_large": 413,
    "uri_too_long": 414,
    "headers_too_large": 431,
    "rate_limited": 429,
    "queue_full": 429,
    "budget_exceeded": 429,
    "too_many_streams": 429,
    "internal": 500,
    "unavailable": 503,
}


class GatewayError(Exception):
    """A failure a client is allowed to see: a code, a message for people, a status."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        *,
        retry_after: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS.get(code, 400)
        self.retry_after = retry_after
        self.data = data or {}

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def __repr__(self) -> str:
        return f"GatewayError({self.code!r}, {self.message!r}, {self.status})"


def invalid(message: str) -> GatewayError:
    return GatewayError("invalid_request", message)


def not_found(what: str = "not found") -> GatewayError:
    return GatewayError("not_found", what)


_OPENAI_CODES = {
    "unauthorized": "invalid_api_key",
    "forbidden": "insufficient_permissions",
    "rate_limited": "rate_limit_exceeded",
    "budget_exceeded": "insufficient_quota",
    "invalid_request": None,
    "internal": None,
}


def openai_error_body(error: GatewayError) -> dict[str, Any]:
    """``{"error": {message, type, param, code}}`` for a GatewayError."""
    status = error.status
    if error.code == "budget_exceeded":
        kind = "insufficient_quota"
    elif status == 429:
        kind = "requests"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    code = error.data.get("openai_code", _OPENAI_CODES.get(error.code, error.code))
    return {
        "error": {
            "message": error.message,
            "type": kind,
            "param": error.data.get("param"),
            "code": code,
        }
    }


def error_body(error: GatewayError, path: bytes | str | None) -> dict[str, Any]:
    """The error in the shape its route speaks: OpenAI's under ``/v1/``, ours elsewhere."""
    if path is not None:
        prefix = b"/v1/" if isinstance(path, bytes) else "/v1/"
        if path.startswith(prefix):  # type: ignore[arg-type]
            return openai_error_body(error)
    return error.to_json()
