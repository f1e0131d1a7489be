"""Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}`` and its statuses."""

from __future__ import annotations

from typing import Any, Final

import orjson
from aiohttp import web

from ...base.errors import ProxyError

__all__ = ["ERROR_TYPES", "STATUS_MAP", "AnthropicErrors", "error_body"]

# Anthropic's error type for each status it uses (its API reference, and the
# types the official SDK declares). Statuses it does not use are mapped onto
# the nearest one it does: SAI failing is Anthropic's 500 ``api_error``, a
# service that cannot take the request now is its 529 ``overloaded_error``.
ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
STATUS_MAP: Final = {502: 500, 503: 529}


def error_body(error: ProxyError) -> tuple[int, dict[str, Any]]:
    """Return Anthropic's status and error object for ``error``."""
    status = STATUS_MAP.get(error.status, error.status)
    kind = ERROR_TYPES.get(status)
    if kind is None:
        if status >= 500:
            status, kind = 500, "api_error"
        else:
            # Anthropic's reference: other 4xx statuses are invalid_request_error too.
            kind = "invalid_request_error"
    # Context too long already reads "prompt is too long: ...", Anthropic's wording.
    return status, {"type": "error", "error": {"type": kind, "message": error.message}}


class AnthropicErrors:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``."""

    def response(self, error: ProxyError) -> web.Response:
        """Return the error as Anthropic's status and error object."""
        status, body = error_body(error)
        return web.Response(
            status=status,
            body=orjson.dumps(body),
            content_type="application/json",
            headers=error.headers(),
        )
