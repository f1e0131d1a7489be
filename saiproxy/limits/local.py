"""Limits held in this process: the default without LIMITS_URL, and each replica's share while
the store is unreachable. The same sliding windows as the shared store's script."""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .base import Ask, UsageCursor, UsagePage, UsageRow, remaining_dates, rows_page
from .rules import (
    CONCURRENCY_RETRY_MS,
    EXCESS_KEEP_MS,
    WINDOW_MS,
    Figures,
    Period,
    Reason,
    Verdict,
    learn_excess,
    tighter,
)

USAGE_DAYS = 40  # days of usage kept


def calendar(period: Period, now: float | None = None) -> tuple[str, str, int]:
    """Return today's date (UTC), the budget period's name and the milliseconds it has left."""
    now = time.time() if now is None else now
    second = int(now)
    cached = _CALENDARS.get(period)
    if cached is None or cached[0] != second:
        cached = _CALENDARS[period] = (second, *_calendar(period, second))
    _, date, name, end_ms = cached
    return date, name, end_ms - int(now * 1000)


# The last second's calendar per period (second, date, period's name, its end in ms): one
# admission after another within a second costs no date arithmetic.
_CALENDARS: dict[Period, tuple[int, str, str, int]] = {}


def _calendar(period: Period, second: int) -> tuple[str, str, int]:
    """Return the date (UTC), the period's name and the period's end (ms) at ``second``."""
    moment = datetime.fromtimestamp(second, UTC)
    date = moment.strftime("%Y-%m-%d")
    start_of_day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        year, month = moment.year + moment.month // 12, moment.month % 12 + 1
        end = start_of_day.replace(year=year, month=month, day=1)
        name = moment.strftime("%Y-%m")
    else:
        end = start_of_day + timedelta(days=1)
        name = date
    return date, name, int(end.timestamp()) * 1000


@dataclass(slots=True)
class _Scope:
    requests: deque[int] = field(default_factory=deque)  # admission times, ms
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (time, tokens)
    token_sum: int = 0
    leases: set[str] = field(default_factory=set)
    budget: dict[str, int] = field(default_factory=dict)  # period -> tokens used
    excess: int | None = None  # the answers' learned excess over their reservations
    excess_at: int = 0  # when it was last learned, ms

    def learned(self, now: int) -> int | None:
        if self.excess is not None and now - self.excess_at > EXCESS_KEEP_MS:
            self.excess = None
        return self.excess

    def expire(self, now: int) -> None:
        cutoff = now - WINDOW_MS
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens:
            first = next(iter(self.tokens))
            at, tokens = self.tokens[first]
            if at > cutoff:
                break
            del self.tokens[first]
            self.token_sum -= tokens


class LocalLimiter:
    """The Limiter of one process."""

    def __init__(self, period: Period) -> None:
        self.period = period
        self._scopes: dict[str, _Scope] = {}
        self._usage: dict[tuple[str, str], list[int]] = {}  # (date, client) -> 4 counters

    def _scope(self, name: str) -> _Scope:
        scope = self._scopes.get(name)
        if scope is None:
            scope = self._scopes[name] = _Scope()
        return scope

    def _count(self, date: str, client: str, index: int, amount: int) -> None:
        row = self._usage.get((date, client))
        if row is None:
            row = self._usage[(date, client)] = [0, 0, 0, 0]
            if len(self._usage) > 1000:  # keep a bounded history
                oldest = min(day for day, _ in self._usage)
                for key in [key for key in self._usage if key[0] == oldest]:
                    del self._usage[key]
        row[index] += amount

    async def admit(self, ask: Ask) -> Verdict:
        now = int(time.monotonic() * 1000)
        date, period, period_left = calendar(self.period)
        deny: Reason | None = None
        wait = 0
        figures: list[Figures] = []
        costs: list[int] = []
        for name, rules in ask.scopes:
            scope = self._scope(name)
            scope.expire(now)
            used_r = len(scope.requests)
            reset_r = scope.requests[0] + WINDOW_MS - now if scope.requests else 0
            if rules.rpm and used_r >= rules.rpm and deny is None:
                deny, wait = "requests", scope.requests[used_r - rules.rpm] + WINDOW_MS - now
            cost = rules.token_cost(ask.reserve, scope.learned(now) or 0) if rules.tpm else 0
            costs.append(cost)
            used_t = scope.token_sum
            oldest = next(iter(scope.tokens.values()), None)
            reset_t = oldest[0] + WINDOW_MS - now if oldest is not None else 0
            if rules.tpm and used_t + cost > rules.tpm and deny is None:
                deny, wait, left = "tokens", WINDOW_MS, used_t
                for at, tokens in scope.tokens.values():
                    left -= tokens
                    if left + cost <= rules.tpm:
                        wait = at + WINDOW_MS - now
                        break
            if rules.concurrency and len(scope.leases) >= rules.concurrency and deny is None:
                deny, wait = "concurrency", CONCURRENCY_RETRY_MS
            if (
                rules.budget
                and scope.budget.get(period, 0) + ask.reserve > rules.budget
                and deny is None
            ):
                deny, wait = "budget", period_left
            figures.append(Figures(rules.rpm, used_r, reset_r, rules.tpm, used_t, reset_t))
        if deny is not None:
            self._count(date, ask.client.id, 3, 1)
            refused = _left(ask, figures, None)
            return Verdict(False, deny, max(1, wait), refused, period, date)
        for (name, rules), cost in zip(ask.scopes, costs, strict=True):
            scope = self._scope(name)
            if rules.rpm:
                scope.requests.append(now)
            if rules.tpm:
                scope.tokens[ask.id] = (now, cost)
                scope.token_sum += cost
            if rules.concurrency:
                scope.leases.add(ask.id)
            if rules.budget:
                scope.budget = {period: scope.budget.get(period, 0) + ask.reserve}
        self._count(date, ask.client.id, 0, 1)
        return Verdict(True, None, 0, _left(ask, figures, costs), period, date, tuple(costs))

    async def settle(
        self, ask: Ask, verdict: Verdict, input_tokens: int, output_tokens: int
    ) -> None:
        self.settle_now(ask, verdict, input_tokens, output_tokens)

    def settle_now(self, ask: Ask, verdict: Verdict, input_tokens: int, output_tokens: int) -> None:
        """:meth:`settle`, at once: nothing here waits."""
        actual = input_tokens + output_tokens
        now = int(time.monotonic() * 1000)
        for name, rules in ask.scopes:
            scope = self._scope(name)
            scope.leases.discard(ask.id)
            held = scope.tokens.get(ask.id)
            if held is not None:
                scope.tokens[ask.id] = (held[0], actual)
                scope.token_sum += actual - held[1]
            if rules.tpm:
                scope.excess = learn_excess(scope.learned(now), ask.reserve, actual)
                scope.excess_at = now
            if rules.budget and verdict.period_id in scope.budget:
                scope.budget[verdict.period_id] += actual - ask.reserve
        self._count(verdict.date, ask.client.id, 1, input_tokens)
        self._count(verdict.date, ask.client.id, 2, output_tokens)

    async def release_all(self) -> None:
        for scope in self._scopes.values():
            scope.leases.clear()

    def leases(self) -> int:
        return sum(len(scope.leases) for scope in self._scopes.values())

    async def usage_page(
        self,
        dates: Sequence[str],
        *,
        limit: int,
        cursor: UsageCursor | None = None,
        client: str | None = None,
    ) -> UsagePage:
        if client is not None:
            return rows_page(
                [
                    UsageRow(date, client, *row)
                    for date in remaining_dates(dates, cursor)
                    if (row := self._usage_of(date, client)) is not None
                ],
                limit,
            )
        rows: list[UsageRow] = []
        for date in remaining_dates(dates, cursor):
            room = limit - len(rows)
            if room == 0:
                return UsagePage(rows, UsageCursor(date))
            after = cursor.after if cursor is not None and cursor.date == date else ""
            # The day's next clients in order, without sorting the whole day per page.
            found = heapq.nsmallest(
                room + 1,
                ((name, row) for name, row in self._usage_on(date) if name > after),
                key=lambda entry: entry[0],
            )
            rows += [UsageRow(date, name, *row) for name, row in found[:room]]
            if len(found) > room:
                return UsagePage(rows, UsageCursor(date, rows[-1].client))
        return UsagePage(rows, None)

    # The readers of the usage kept here: usage_page knows nothing else of how it is kept.
    def _usage_on(self, date: str) -> Iterator[tuple[str, list[int]]]:
        """Each client's counters on ``date``."""
        return ((client, row) for (day, client), row in self._usage.items() if day == date)

    def _usage_of(self, date: str, client: str) -> list[int] | None:
        """``client``'s counters on ``date``, if any."""
        return self._usage.get((date, client))


def _left(ask: Ask, used: list[Figures], costs: list[int] | None) -> Figures | None:
    """Turn each scope's use into what is left (after this admission took one request and
    ``costs`` tokens from each scope; None when it was refused)."""
    result: Figures | None = None
    for index, ((_, rules), figures) in enumerate(zip(ask.scopes, used, strict=True)):
        taken = 1 if costs is not None else 0
        cost = costs[index] if costs is not None else 0
        left = Figures(
            rules.rpm,
            max(0, rules.rpm - figures.requests_left - taken),
            figures.requests_reset_ms or (WINDOW_MS if taken else 0),
            rules.tpm,
            max(0, rules.tpm - figures.tokens_left - cost),
            figures.tokens_reset_ms or (WINDOW_MS if taken else 0),
        )
        result = tighter(result, left)
    return result
