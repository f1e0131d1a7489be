"""What one attempt at SAI came to: the value the attempt loop reads and acts on.

:func:`judge` is the policy for an answer other than 200 (docs/sai.md): a
401 fails at once, a 429 falls back to another credential while one is left,
502/503/504 are worth a retry, and anything else fails with what SAI said.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from ..base.errors import (
    ContextTooLong,
    UpstreamAuthRejected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from ..base.log import sai_logger as log
from .auth import AuthChain, Credential
from .call import SaiCall
from .stream import SaiStream

__all__ = [
    "CONTEXT_TOO_LONG",
    "RETRYABLE_STATUSES",
    "Fail",
    "FallBack",
    "Opened",
    "Outcome",
    "Retry",
    "judge",
]


RETRYABLE_STATUSES: Final = frozenset({502, 503, 504})
CONTEXT_TOO_LONG: Final = re.compile(r"prompt is too long|openaicompatible", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Opened:
    """SAI answered 200: the answer's body is still to be read."""

    stream: SaiStream


@dataclass(frozen=True, slots=True)
class Retry:
    """The attempt failed in a way worth retrying; ``error`` is the answer once none is left."""

    error: UpstreamError


@dataclass(frozen=True, slots=True)
class FallBack:
    """A 429 moves the call to ``credential``: the next attempt goes out at once, not a retry,
    when the request's budget has a call left (and the global limits admit it)."""

    credential: Credential
    retry_after: str | None  # SAI's Retry-After, for the 429 if the fallback is refused


@dataclass(frozen=True, slots=True)
class Fail:
    """The call ends with ``error``: asking again would not help."""

    error: UpstreamError


Outcome = Opened | Retry | FallBack | Fail


def judge(
    call: SaiCall, chain: AuthChain, status: int, body: str, retry_after: str | None
) -> Retry | FallBack | Fail:
    """Return the outcome of an attempt SAI answered with ``status`` (not 200) and ``body``."""
    credential = call.credential
    if status == 401:
        log.warning(
            "SAI rejected the credential; not falling back",
            extra={"credential": credential.label, "source": credential.source},
        )
        return Fail(UpstreamAuthRejected(credential.label, credential.fix_when_rejected))
    if status == 429:
        fallback = chain.after_rate_limit(call.tried)
        if fallback is None:
            return Fail(UpstreamRateLimited(credential.label, retry_after))
        return FallBack(fallback, retry_after)
    if status == 500 and CONTEXT_TOO_LONG.search(body):
        return Fail(ContextTooLong())
    if 300 <= status < 400:
        log.warning("SAI answered with a redirect; not following it", extra={"status": status})
        return Fail(
            UpstreamUnavailable(f"HTTP {status} from SAI (a redirect, not followed)", call.attempts)
        )
    error = UpstreamUnavailable(f"HTTP {status} from SAI", call.attempts)
    if status in RETRYABLE_STATUSES:
        return Retry(error)
    return Fail(error)
