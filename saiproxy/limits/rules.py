"""What is limited: the rules of each scope, the reservation of a request, the answers' figures."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, NamedTuple

from ..base.settings import Settings

__all__ = [
    "CONCURRENCY_RETRY_MS",
    "EXCESS_KEEP_MS",
    "GLOBAL",
    "MAX_TOKENS",
    "OUTPUT_FIELDS",
    "USAGE_KEEP_MS",
    "VERIFIED_KEEP_MS",
    "WINDOW_MS",
    "Config",
    "Figures",
    "Period",
    "Reason",
    "Rules",
    "Used",
    "Verdict",
    "learn_excess",
    "remaining",
    "requested_output",
    "seconds_ceil",
    "tighter",
]

WINDOW_MS: Final = 60_000  # requests and tokens per minute: a sliding window of 60 s
GLOBAL: Final = "global"  # the scope of the shared SAI credentials
Reason = Literal["requests", "tokens", "concurrency", "budget"]
Period = Literal["day", "month"]
# The body fields a client bounds its answer with, by protocol (the first present wins).
OUTPUT_FIELDS: Final = ("max_completion_tokens", "max_output_tokens", "max_tokens")
# A concurrent request ends when it ends: no time is known; clients are told to retry in 1 s.
CONCURRENCY_RETRY_MS: Final = 1000
# What a scope learned of its answers' excess over their reservations is forgotten after an
# hour without a settlement.
EXCESS_KEEP_MS: Final = 3_600_000
# A user's credential that SAI accepted counts as its own client for a day after its last
# accepted answer; until SAI accepts it, its requests are anonymous's (rotation buys nothing).
VERIFIED_KEEP_MS: Final = 86_400_000
USAGE_KEEP_MS: Final = 40 * 86_400_000  # usage per client per day is kept 40 days
# The largest token count the limits take: SAI's counts above it are ignored (estimated), a
# client's answer bound above it is taken as it. Far above any model's context, and far
# below 2^53, where the store's scripts (Lua numbers are doubles) would lose integers.
MAX_TOKENS: Final = 100_000_000


@dataclass(frozen=True, slots=True)
class Rules:
    """One scope's limits; 0 means no limit of that kind."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    budget: int = 0

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrency or self.budget)

    def share(self, replicas: int) -> Rules:
        """Return this replica's share of the limits (the store is unreachable)."""
        if replicas <= 1:
            return self

        def part(limit: int) -> int:
            return max(1, limit // replicas) if limit else 0

        return replace(
            self,
            rpm=part(self.rpm),
            tpm=part(self.tpm),
            concurrency=part(self.concurrency),
            budget=part(self.budget),
        )

    def token_cost(self, reserve: int, excess: int) -> int:
        """Return what ``reserve`` takes from the token window, with the client's learned
        ``excess``: never more than the whole limit, so that one large request can still run
        alone (0 without a tokens-per-minute limit)."""
        return min(reserve + excess, self.tpm) if self.tpm else 0

    def budget_cost(self, reserve: int) -> int:
        """Return what ``reserve`` takes from the budget: never more than the whole budget,
        so that a request larger than the budget runs when the budget is untouched (0 without
        a budget)."""
        return min(reserve, self.budget) if self.budget else 0


def learn_excess(learned: int | None, reserve: int, actual: int) -> int:
    """Return a scope's excess (what its answers cost beyond their reservations) after one
    more answer: up at once to a larger excess, down a quarter of the way to a smaller one.

    SAI does not honour ``max_tokens``, and its prompt count includes the template's own
    text: an answer can cost more than its reservation, and every request in flight when the
    tokens per minute are reached adds its correction. Reserving the excess seen lately
    leaves only the part of a correction beyond it.
    """
    sample = max(0, actual - reserve)
    if learned is None or sample >= learned:
        return sample
    return learned + (sample - learned) // 4  # a quarter of the way down, rounded up


@dataclass(frozen=True, slots=True)
class Config:
    """Every limit, and how the limiter runs."""

    client: Rules
    shared: Rules  # the shared SAI credentials (SAI_KEY, SAI_COOKIE), all clients together
    period: Period
    output_reserve: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Config:
        period: Period = "month" if settings.limits_budget_period == "month" else "day"
        return cls(
            client=Rules(
                settings.limits_client_rpm,
                settings.limits_client_tpm,
                settings.limits_client_concurrency,
                settings.limits_client_budget,
            ),
            shared=Rules(
                settings.limits_global_rpm,
                settings.limits_global_tpm,
                settings.limits_global_concurrency,
                settings.limits_global_budget,
            ),
            period=period,
            output_reserve=settings.limits_output_reserve,
        )

    def share(self, replicas: int) -> Config:
        return replace(self, client=self.client.share(replicas), shared=self.shared.share(replicas))


def requested_output(body: Any) -> int | None:
    """Return the answer's token bound the client asked for, if any (at most MAX_TOKENS)."""
    if not isinstance(body, dict):
        return None
    for name in OUTPUT_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, MAX_TOKENS)
    return None


@dataclass(frozen=True, slots=True)
class Figures:
    """What one scope has left after an admission or a refusal, for the response headers."""

    rpm: int
    requests_left: int
    requests_reset_ms: int
    tpm: int
    tokens_left: int
    tokens_reset_ms: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to one admission: granted, or refused for ``reason`` with a wait."""

    granted: bool
    reason: Reason | None
    retry_ms: int
    figures: Figures | None  # the tighter scope's, for the headers
    period_id: str  # the budget's period (e.g. 2026-12-06 or 2026-12)
    date: str  # the usage day (UTC)
    client: str  # the client it counted against: the ask's, or anonymous (not yet accepted)
    # What the admission took from each scope (the ask's order): tokens from the window,
    # and from the budget.
    costs: tuple[tuple[int, int], ...] = ()
    budget_left: int | None = None  # refused for the budget: what it had left

    @property
    def final(self) -> bool:
        """True when retrying soon cannot help: the budget is spent."""
        return self.reason == "budget"


class Used(NamedTuple):
    """What one scope had used when a request asked (before it was admitted).

    A named tuple: one is made per scope of every admission, at a fraction of
    a frozen dataclass's cost (which sets each field through ``object.__setattr__``).
    """

    rpm: int
    requests: int
    requests_reset_ms: int
    tpm: int
    tokens: int
    tokens_reset_ms: int


def remaining(used: list[Used], costs: list[tuple[int, int]] | None) -> Figures | None:
    """Return the tighter scope's figures left after an admission took one request and
    ``costs`` tokens from each scope (None: it was refused, and took nothing).

    :func:`tighter` of every scope's figures in turn, worked out on numbers: one
    :class:`Figures` is made per admission, not two per scope.
    """
    if not used:
        return None
    taken = 1 if costs is not None else 0
    # (limit, left, reset) of the tighter scope so far, per kind.
    requests: tuple[int, int, int] | None = None
    tokens: tuple[int, int, int] | None = None
    for index, scope in enumerate(used):
        cost = costs[index][0] if costs is not None else 0
        rpm, tpm = scope.rpm, scope.tpm
        left_r = max(0, rpm - scope.requests - taken)
        left_t = max(0, tpm - scope.tokens - cost)
        if requests is None or not (requests[0] and (not rpm or requests[1] <= left_r)):
            requests = (rpm, left_r, scope.requests_reset_ms or (WINDOW_MS if taken else 0))
        if tokens is None or not (tokens[0] and (not tpm or tokens[1] <= left_t)):
            tokens = (tpm, left_t, scope.tokens_reset_ms or (WINDOW_MS if taken else 0))
    assert requests is not None and tokens is not None
    return Figures(*requests, *tokens)


def tighter(a: Figures | None, b: Figures | None) -> Figures | None:
    """Return, kind by kind, the figures of the scope with less left."""
    if a is None or b is None:
        return a or b
    requests = a if (a.rpm and (not b.rpm or a.requests_left <= b.requests_left)) else b
    tokens = a if (a.tpm and (not b.tpm or a.tokens_left <= b.tokens_left)) else b
    return Figures(
        requests.rpm,
        requests.requests_left,
        requests.requests_reset_ms,
        tokens.tpm,
        tokens.tokens_left,
        tokens.tokens_reset_ms,
    )


def seconds_ceil(ms: int) -> int:
    return max(1, math.ceil(ms / 1000))
