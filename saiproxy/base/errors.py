"""Every failure saiproxy reports, as one exception tree.

    ProxyError                      status, type, code, param: an OpenAI error object
    ├── ClientError                 the client's request is wrong (4xx, never retried)
    │   ├── InvalidRequest          400 invalid_request_error
    │   ├── BodyTooLarge            413
    │   ├── BodyTimeout             408: the body did not arrive within BODY_READ_TIMEOUT
    │   ├── MalformedRequest        aiohttp could not parse the request (400, 431, ...)
    │   ├── ProxyAccessDenied       401 authentication_error / invalid_api_key
    │   ├── NoCredential            401: the auth chain found no SAI credential
    │   ├── ModelNotFound           404 model_not_found (STRICT_MODELS)
    │   ├── NotFound                404: no stored object of that id for this client
    │   └── StorageQuotaExceeded    400: the client's stored bytes are at their quota
    ├── StateUnavailable            503: the state store (Valkey) did not answer
    └── UpstreamError               SAI's answer, mapped by ERROR_MODE (docs/sai.md)
        ├── UpstreamAuthRejected    SAI said 401 for a credential
        ├── UpstreamRateLimited     SAI said 429 and no fallback is left
        ├── ContextTooLong          SAI's "prompt is too long", or the early estimate
        ├── UpstreamUnavailable     5xx, 3xx, connection failure after retries
        │   └── UpstreamAnswerTooLarge  the answer grew past MAX_ANSWER_BYTES
        ├── UpstreamTimeout         no answer within REQUEST_TIMEOUT after retries
        ├── ShutdownCut             the process is stopping: the answer was cut short
        └── StreamBroken            saiproxy itself failed after the stream started

A ``ProxyError`` renders as HTTP with :meth:`ProxyError.body`; an
``UpstreamError`` in ``message`` mode renders as assistant text with
:meth:`UpstreamError.chat_text` and :attr:`UpstreamError.finish_reason`.
Texts never contain a secret: credentials appear only by their label.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

__all__ = [
    "BodyTimeout",
    "BodyTooLarge",
    "ClientError",
    "ContextTooLong",
    "InvalidRequest",
    "MalformedRequest",
    "ModelNotFound",
    "NoCredential",
    "NotFound",
    "ProxyAccessDenied",
    "ProxyError",
    "ShutdownCut",
    "StateUnavailable",
    "StorageQuotaExceeded",
    "StreamBroken",
    "UpstreamAnswerTooLarge",
    "UpstreamAuthRejected",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class ProxyError(Exception):
    """A failure with an OpenAI error object and an HTTP status."""

    # Class defaults; an instance may carry its own (aiohttp's 404s and 405s do).
    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        """Return the OpenAI error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Return extra response headers for the HTTP rendering."""
        return {}


class ClientError(ProxyError):
    """The request itself is wrong."""

    status = 400
    type = "invalid_request_error"


class InvalidRequest(ClientError):
    """The body is not a valid chat completion request."""


class BodyTooLarge(ClientError):
    """The body is larger than MAX_BODY_BYTES."""

    status = 413
    code = "request_too_large"


class BodyTimeout(ClientError):
    """The request body did not arrive within BODY_READ_TIMEOUT."""

    status = 408
    code = "request_timeout"


class MalformedRequest(ClientError):
    """aiohttp's parser refused the request (request line, headers, framing)."""

    code = "malformed_request"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ProxyAccessDenied(ClientError):
    """The caller did not present one of PROXY_API_KEYS."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NoCredential(ClientError):
    """The auth chain found no usable SAI credential."""

    status = 401
    type = "authentication_error"
    code = "missing_api_key"


class ModelNotFound(ClientError):
    """The requested model is not configured and STRICT_MODELS is on."""

    status = 404
    code = "model_not_found"

    def __init__(self, name: str | None) -> None:
        # A request's model name is at most 256 characters; a looked-up one (a path) is cut there.
        shown = name[:256] if name is not None else None
        super().__init__(f"The model {shown!r} does not exist; see GET /v1/models", param="model")


class NotFound(ClientError):
    """No stored response, item or conversation of that id belongs to the caller.

    Another client's object is not found either: a 404, never a 403, so that
    an id tells nothing about whether it exists.
    """

    status = 404
    code = "not_found"


class StorageQuotaExceeded(ClientError):
    """Storing this would take the client's stored bytes past STATE_CLIENT_BYTES."""

    code = "storage_quota_exceeded"


class StateUnavailable(ProxyError):
    """The state store did not answer in time or refused: nothing was stored or read."""

    status = 503
    code = "state_unavailable"


class UpstreamError(ProxyError):
    """SAI did not produce an answer."""

    # The finish reason of the explanation in message mode: one every client accepts.
    finish_reason: ClassVar[Literal["stop", "length"]] = "stop"

    def chat_text(self) -> str:
        """Return the explanation a chat user reads in message mode."""
        return self.message


class UpstreamAuthRejected(UpstreamError):
    """SAI rejected the credential (401); never retried, never falls back."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, label: str, fix: str) -> None:
        super().__init__(f"SAI rejected the {label} (HTTP 401). {fix}")
        self.label = label


class UpstreamRateLimited(UpstreamError):
    """SAI rate limited the call (429) and no fallback credential is left."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, label: str, retry_after: str | None) -> None:
        wait = f" SAI asks to retry after {retry_after} s." if retry_after else ""
        super().__init__(
            f"SAI's usage limit was reached for the {label} (HTTP 429).{wait} "
            "Please wait a moment and try again."
        )
        self.label = label
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": self.retry_after} if self.retry_after else {}


class ContextTooLong(UpstreamError):
    """The conversation does not fit the model's context."""

    status = 400
    type = "invalid_request_error"
    code = "context_length_exceeded"
    finish_reason = "length"

    def __init__(self, estimated_tokens: int | None = None, limit: int | None = None) -> None:
        # Both providers' wordings, for the clients that look for them: Anthropic's
        # "prompt is too long" and OpenAI's "This model's maximum context length is"
        # (LiteLLM raises ContextWindowExceededError on either; aider then helps).
        if estimated_tokens is not None and limit is not None:
            size = (
                f"about {estimated_tokens} tokens > {limit} maximum. This model's maximum "
                f"context length is {limit} tokens, and the conversation needs about "
                f"{estimated_tokens}."
            )
        else:
            size = "This model's maximum context length is smaller than the conversation."
        super().__init__(
            f"prompt is too long: {size} "
            "Shorten the history or remove long pasted text, start a new chat, "
            "or ask for a summary of this conversation and continue from it in a new chat."
        )


class UpstreamUnavailable(UpstreamError):
    """SAI failed (5xx, unexpected status, broken connection) after retries."""

    status = 502
    type = "api_error"
    code = "upstream_error"

    def __init__(self, detail: str, attempts: int = 1) -> None:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"SAI could not answer: {detail}{tries}. Please try again in a moment.")
        self.detail = detail


class UpstreamAnswerTooLarge(UpstreamUnavailable):
    """SAI's answer grew past MAX_ANSWER_BYTES (decompressed); never retried."""

    def __init__(self, limit: int, attempts: int = 1) -> None:
        super().__init__(
            f"the answer is larger than the limit of {limit} bytes (MAX_ANSWER_BYTES)", attempts
        )
        self.limit = limit


class UpstreamTimeout(UpstreamError):
    """SAI stayed silent longer than REQUEST_TIMEOUT, after retries."""

    status = 504
    type = "api_error"
    code = "upstream_timeout"

    def __init__(self, timeout: float, attempts: int = 1) -> None:
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(
            f"SAI did not answer within {timeout:g} s{tries}. "
            "Please try again, or shorten the request."
        )


class ShutdownCut(UpstreamError):
    """SHUTDOWN_TIMEOUT ran out while the answer was still coming: it is cut short."""

    status = 503
    type = "api_error"
    code = "server_shutting_down"
    finish_reason = "length"

    def __init__(self) -> None:
        super().__init__(
            "This saiproxy instance is restarting and had to cut the answer short. "
            "Please send the request again."
        )


class StreamBroken(UpstreamError):
    """saiproxy failed while relaying an answer whose stream had started: it ends in-band."""

    status = 500
    type = "api_error"
    code = "internal_error"
    finish_reason = "length"

    def __init__(self) -> None:
        super().__init__(
            "saiproxy failed while relaying the answer, which is cut short here; "
            "the request ID finds the cause in the logs."
        )
