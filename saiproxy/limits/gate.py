"""The hook: a client request is admitted once, before any SAI call, and settled when it ends.

:func:`admit` after the exchanges are prepared, :func:`settle` when the
request ends (the exchange's ``conclude``, whatever ended it). A refusal is
a :class:`RateLimited` (429, rendered in the path's protocol's shape); the
rate-limit headers go on every answer of a limited path, streams included
(they are set before the first byte).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from aiohttp import web

from ..core.prompt import estimate_tokens
from ..errors import ClientError
from ..keys import LIMITS
from .limits import Grant
from .rules import Figures, Verdict, requested_output, seconds_ceil

if TYPE_CHECKING:
    from ..core.exchange import Exchange

__all__ = ["RateLimited", "add_limit_headers", "admit", "requested_output", "settle"]

log = logging.getLogger("saiproxy.limits")

MODE_HEADER: Final = "X-Saiproxy-Limits"
LIMIT_HEADERS: Final = web.RequestKey("limit_headers", dict[str, str])
ANTHROPIC_PREFIXES: Final = ("/v1/messages", "/messages")


class RateLimited(ClientError):
    """A limit refused the request: 429, with when to retry; a spent budget is final."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, verdict: Verdict, headers: dict[str, str]) -> None:
        reason = verdict.reason or "requests"
        wait = seconds_ceil(verdict.retry_ms)
        if verdict.final:
            message = (
                "Your token budget for this period is spent (saiproxy limits); "
                f"it renews in {wait} s."
            )
        else:
            what = {
                "requests": "requests per minute",
                "tokens": "tokens per minute",
                "concurrency": "concurrent requests",
            }.get(reason, reason)
            message = f"Rate limit reached: {what} (saiproxy limits). Retry in {wait} s."
        super().__init__(message)
        if verdict.final:
            self.type = self.code = "insufficient_quota"
        self.reason = reason
        self._headers = headers

    def headers(self) -> dict[str, str]:
        return self._headers


def duration(ms: int) -> str:
    """Return ``ms`` as OpenAI writes its resets: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    seconds = seconds_ceil(ms)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def _rfc3339(ms: int) -> str:
    moment = datetime.now(UTC) + timedelta(milliseconds=max(0, ms))
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def headers_for(path: str, mode: str, verdict: Verdict) -> dict[str, str]:
    """Return the rate-limit headers of an answer on ``path``, in its protocol's names."""
    headers = {MODE_HEADER: mode}
    figures: Figures | None = verdict.figures
    anthropic = path.startswith(ANTHROPIC_PREFIXES)
    if figures is not None:
        for kind, limit, left, reset in (
            ("requests", figures.rpm, figures.requests_left, figures.requests_reset_ms),
            ("tokens", figures.tpm, figures.tokens_left, figures.tokens_reset_ms),
        ):
            if not limit:
                continue
            if anthropic:
                headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
                headers[f"anthropic-ratelimit-{kind}-remaining"] = str(left)
                headers[f"anthropic-ratelimit-{kind}-reset"] = _rfc3339(reset)
            else:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(left)
                headers[f"x-ratelimit-reset-{kind}"] = duration(reset)
    if not verdict.granted:
        headers["Retry-After"] = str(seconds_ceil(verdict.retry_ms))
        headers["retry-after-ms"] = str(verdict.retry_ms)
        if verdict.final:
            headers["x-should-retry"] = "false"
    return headers


async def add_limit_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """on_response_prepare: the headers of the request's admission, on whatever answers it."""
    headers = request.get(LIMIT_HEADERS)
    if headers is not None:
        response.headers.update(headers)


GRANT: Final = web.RequestKey("limit_grant", Grant)


async def admit(request: web.Request, exchanges: Sequence[Exchange]) -> None:
    """Admit a client request (one exchange, or several answered together) once, before SAI;
    raise :class:`RateLimited` when a limit refuses it."""
    limits = request.app.get(LIMITS)
    if limits is None:
        return
    calls = [exchange.call for exchange in exchanges if exchange.call is not None]
    if not calls:
        return  # answered without SAI (the context check): nothing to limit
    output = limits.config.output_reserve
    reserve = sum(
        estimate_tokens(exchange.chars) + (exchange.max_output or output) for exchange in exchanges
    )
    client = limits.client(request, calls[0].credential)
    grant = await limits.admit(client, reserve)
    headers = headers_for(request.path, limits.mode, grant.verdict)
    request[LIMIT_HEADERS] = headers
    if not grant.verdict.granted:
        log.info(
            "request limited",
            extra={
                "client": client.id,
                "reason": grant.verdict.reason,
                "retry_after_ms": grant.verdict.retry_ms,
                "limits_mode": limits.mode,
            },
        )
        raise RateLimited(grant.verdict, headers)
    request[GRANT] = grant


def settle(request: web.Request, exchanges: Sequence[Exchange]) -> None:
    """The request ended, however (answered, failed, client gone, cancelled): correct its
    tokens to the real count and end its lease. Never raises; never waits."""
    grant = request.get(GRANT)
    limits = request.app.get(LIMITS)
    if grant is None or limits is None:
        return
    input_tokens = output_tokens = 0
    for exchange in exchanges:
        usage = exchange.usage
        if usage.total_tokens:
            input_tokens += usage.prompt_tokens
            output_tokens += usage.completion_tokens
        elif exchange.first_byte is not None:
            # Cut before SAI's token counts arrived: the prompt was spent at least.
            input_tokens += estimate_tokens(exchange.chars)
    limits.settle(grant, input_tokens, output_tokens)
