"""The hook: a client request is admitted once, before any SAI call, and settled when it ends.

The core sees a narrow interface, numbers in and out: :func:`admit` with the
request's credential and token reservation, before SAI; :func:`admit_shared`
before a request that began on a user's own credential is served on a
shared one (the 429 fallback to SAI_COOKIE); :func:`settle` with the tokens
counted when the request ends, however it ended. A refusal is a
:class:`RateLimited` (429, rendered in the path's protocol's shape); the
rate-limit headers go on every answer of a limited path, streams included
(they are set before the first byte).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from aiohttp import web

from ..base.errors import ClientError
from ..base.log import limits_logger as log
from ..upstream.auth import Credential
from .base import ScopeKind, Settlement
from .grant import Grant
from .identity import Client
from .limits import LIMITS
from .rules import MAX_TOKENS, Figures, Verdict, requested_output, seconds_ceil

__all__ = [
    "ANTHROPIC_PREFIXES", "RateLimited", "add_limit_headers", "admit", "admit_shared", "counted",
    "requested_output", "settle",
]  # fmt: skip


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
        if verdict.final and verdict.budget_left:
            message = (
                f"Your token budget for this period has {verdict.budget_left} tokens left, "
                "fewer than this request reserves (its prompt and the answer's bound, "
                f"max_tokens) (saiproxy limits); it renews in {wait} s. Ask for a shorter answer."
            )
        elif verdict.final:
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


# Each protocol's header names, per kind: (limit, remaining, reset), made once.
_OPENAI_NAMES: Final = {
    kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}",
           f"x-ratelimit-reset-{kind}")
    for kind in ("requests", "tokens")
}  # fmt: skip
_ANTHROPIC_NAMES: Final = {
    kind: (f"anthropic-ratelimit-{kind}-limit", f"anthropic-ratelimit-{kind}-remaining",
           f"anthropic-ratelimit-{kind}-reset")
    for kind in ("requests", "tokens")
}  # fmt: skip


def headers_for(path: str, mode: str, verdict: Verdict) -> dict[str, str]:
    """Return the rate-limit headers of an answer on ``path``, in its protocol's names."""
    headers = {MODE_HEADER: mode}
    figures: Figures | None = verdict.figures
    if figures is not None:
        anthropic = path.startswith(ANTHROPIC_PREFIXES)
        names = _ANTHROPIC_NAMES if anthropic else _OPENAI_NAMES
        reset_text = _rfc3339 if anthropic else duration
        for kind, limit, left, reset in (
            ("requests", figures.rpm, figures.requests_left, figures.requests_reset_ms),
            ("tokens", figures.tpm, figures.tokens_left, figures.tokens_reset_ms),
        ):
            if not limit:
                continue
            limit_name, left_name, reset_name = names[kind]
            headers[limit_name] = str(limit)
            headers[left_name] = str(left)
            headers[reset_name] = reset_text(reset)
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


GRANTS: Final = web.RequestKey("limit_grants", list[Grant])
# The client and the reservation of the request's admission, for admit_shared.
ASKED: Final = web.RequestKey("limit_asked", tuple[Client, int])


def counted(value: int) -> int:
    """Return a token count the limits take: non-negative, at most MAX_TOKENS."""
    return min(max(0, value), MAX_TOKENS)


async def admit(
    request: web.Request,
    credential: Credential,
    prompt_tokens: int,
    max_outputs: Sequence[int | None],
) -> None:
    """Admit a client request (one conversation, or several answered together) once, before
    SAI: it reserves ``prompt_tokens`` and each answer's bound (or LIMITS_OUTPUT_RESERVE).
    Raise :class:`RateLimited` when a limit refuses it."""
    limits = request.app.get(LIMITS)
    if limits is None:
        return
    output = limits.config.output_reserve
    reserve = counted(prompt_tokens + sum(bound or output for bound in max_outputs))
    client = limits.client(request, credential)
    request[ASKED] = (client, reserve)
    request[GRANTS] = []  # the request's admissions (admit_shared's follows this one)
    await _admit(request, client, reserve, ("client", "global"))


async def admit_shared(request: web.Request) -> bool:
    """Admit to the global limits a request that began on the user's own credential and is
    about to be served on a shared one (SAI_COOKIE after a 429), before that credential is
    used; return False when they refuse it."""
    limits = request.app.get(LIMITS)
    asked = request.get(ASKED)
    if limits is None or asked is None or not limits.config.shared.any:
        return True
    client, reserve = asked
    if client.shared:
        return True  # its admission took the global scope already
    request[ASKED] = (shared := Client(client.id, client.kind, True), reserve)
    try:
        await _admit(request, shared, reserve, ("global",))
    except RateLimited:
        return False
    return True


async def _admit(
    request: web.Request, client: Client, reserve: int, kinds: tuple[ScopeKind, ...]
) -> None:
    limits = request.app[LIMITS]
    grant = limits.admit_at_once(client, reserve, kinds) or await limits.admit(
        client, reserve, kinds
    )
    # At once: whatever happens next, the request's end settles it. (GRANTS is made
    # with ASKED, before the first admission: a missing key would cost a KeyError.)
    request[GRANTS].append(grant)
    verdict = grant.verdict
    headers = headers_for(request.path, limits.mode, verdict)
    if kinds != ("global",):  # a fallback refused is SAI's 429, with SAI's Retry-After
        request[LIMIT_HEADERS] = headers
    if not verdict.granted:
        log.info(
            "request limited",
            extra={
                "client": verdict.client,
                "reason": verdict.reason,
                "retry_after_ms": verdict.retry_ms,
                "limits_mode": limits.mode,
                **({"scope": "global", "fallback": True} if kinds == ("global",) else {}),
            },
        )
        raise RateLimited(verdict, headers)


def settle(request: web.Request, input_tokens: int, output_tokens: int, accepted: bool) -> None:
    """The request ended, however (answered, failed, client gone, cancelled): correct its
    tokens to what SAI counted (``accepted``: SAI answered the user's own credential) and
    end its leases. Never raises; never waits."""
    limits = request.app.get(LIMITS)
    if limits is None:
        return  # limits off: no request key is looked up (a missing one raises inside get)
    grants = request.get(GRANTS)
    if not grants:
        return
    ended = Settlement(counted(input_tokens), counted(output_tokens), accepted)
    for grant in grants:
        limits.settle(grant, ended)
