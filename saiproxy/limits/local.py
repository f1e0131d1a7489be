"""Limits held in this process: the default without LIMITS_URL, and each replica's share while
the store is unreachable. The same rules as the shared store's scripts (scripts/*.lua).

Everything a client makes this store keep expires with its window: a scope
once its last request left the minute and its leases ended, a learned excess
after an hour, a user's accepted credential after a day, a budget with its
period, usage after 40 days (today's never). Memory follows the clients live
now, not every client ever seen.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from .base import (
    Ask,
    Settlement,
    UsageCursor,
    UsagePage,
    UsageRow,
    remaining_dates,
    rows_page,
    scope_name,
)
from .identity import ANONYMOUS
from .rules import (
    CONCURRENCY_RETRY_MS,
    EXCESS_KEEP_MS,
    USAGE_KEEP_MS,
    VERIFIED_KEEP_MS,
    WINDOW_MS,
    Period,
    Reason,
    Used,
    Verdict,
    learn_excess,
    remaining,
)

__all__ = ["Calendar", "LocalLimiter", "wall_clock_ms"]

# Past days' usage rows kept at most (today's are never dropped): a bound on memory
# whatever the number of clients, with room for 40 days of a few thousand clients.
USAGE_ROWS_KEPT = 200_000
_T = TypeVar("_T")


def wall_clock_ms() -> int:
    """Return the time in ms since the epoch, as the stores count it."""
    return time.time_ns() // 1_000_000


class Calendar:
    """Today's date (UTC), the budget period's name and when it ends: worked out once per
    second, not per admission."""

    def __init__(self, period: Period) -> None:
        self.period = period
        self._second = -1
        self._today = ("", "", 0)

    def at(self, now_ms: int) -> tuple[str, str, int]:
        """Return the date, the period's name and the ms the period has left at ``now_ms``."""
        second = now_ms // 1000
        if second != self._second:
            self._second, self._today = second, self._work_out(second)
        date, name, end_ms = self._today
        return date, name, end_ms - now_ms

    def _work_out(self, second: int) -> tuple[str, str, int]:
        moment = datetime.fromtimestamp(second, UTC)
        date = moment.strftime("%Y-%m-%d")
        start_of_day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "month":
            year, month = moment.year + moment.month // 12, moment.month % 12 + 1
            end = start_of_day.replace(year=year, month=month, day=1)
            name = moment.strftime("%Y-%m")
        else:
            end = start_of_day + timedelta(days=1)
            name = date
        return date, name, int(end.timestamp()) * 1000


@dataclass(slots=True)
class _Scope:
    """One scope's windows and leases. Each container is made when first needed: an empty
    deque alone costs 600 bytes, and most scopes have one or two kinds of limit."""

    touched: int  # ms: its last admission or settlement
    requests: deque[int] | None = None  # admission times, ms
    tokens: dict[str, tuple[int, int]] | None = None  # id -> (time, tokens)
    token_sum: int = 0
    leases: set[str] | None = None

    def expire(self, now: int) -> None:
        cutoff = now - WINDOW_MS
        requests, tokens = self.requests, self.tokens
        while requests and requests[0] <= cutoff:
            requests.popleft()
        while tokens:
            first = next(iter(tokens))
            at, count = tokens[first]
            if at > cutoff:
                break
            del tokens[first]
            self.token_sum -= count


@dataclass(slots=True)
class _Checked:
    """What an admission found in its scopes: the first limit that refuses it, if any, and
    each scope's use and the request's costs there (tokens, budget)."""

    deny: Reason | None = None
    wait: int = 0  # ms until the refusing limit could admit it
    budget_left: int | None = None  # when a budget refuses
    used: list[Used] = field(default_factory=list)
    costs: list[tuple[int, int]] = field(default_factory=list)


class LocalLimiter:
    """The Limiter of one process."""

    def __init__(self, period: Period, clock: Callable[[], int] = wall_clock_ms) -> None:
        self.period = period
        self._clock = clock
        self._calendar = Calendar(period)
        # In the order they were last touched: the sweep looks at the oldest only.
        self._scopes: OrderedDict[str, _Scope] = OrderedDict()
        self._excess: OrderedDict[str, tuple[int, int]] = OrderedDict()  # client -> (excess, ms)
        self._verified: OrderedDict[str, int] = OrderedDict()  # client -> until, ms
        self._budget_period = ""
        self._budgets: dict[str, int] = {}  # scope -> tokens used in _budget_period
        self._usage: dict[str, dict[str, list[int]]] = {}  # date -> client -> 4 counters
        self._swept = 0

    # --- what a client makes this store keep, and its end

    def _scope(self, name: str, now: int) -> _Scope:
        scope = self._scopes.get(name)
        if scope is None:
            scope = self._scopes[name] = _Scope(now)
        else:
            scope.touched = now
            self._scopes.move_to_end(name)
        return scope

    def _sweep(self, now: int) -> None:
        """Drop what has expired, at most once a second: each pass looks only at entries
        old enough to go (they are kept in the order they were touched)."""
        if now - self._swept < 1000:
            return
        self._swept = now
        cutoff = now - WINDOW_MS
        scopes = self._scopes
        while scopes:
            name, scope = next(iter(scopes.items()))
            if scope.touched > cutoff:
                break
            if scope.leases:  # a request still running (a long stream): look again later
                scope.touched = now
                scopes.move_to_end(name)
            else:  # its requests and tokens left the window with its last touch
                del scopes[name]
        _drop_older(self._excess, lambda kept: kept[1] + EXCESS_KEEP_MS < now)
        _drop_older(self._verified, lambda until: until < now)
        # Worked out apart: asked of the calendar, it would throw away today's.
        oldest_day = datetime.fromtimestamp((now - USAGE_KEEP_MS) // 1000, UTC).strftime("%Y-%m-%d")
        for date in [date for date in self._usage if date < oldest_day]:
            del self._usage[date]

    def _learned(self, client: str, now: int) -> int | None:
        kept = self._excess.get(client)
        if kept is None or kept[1] + EXCESS_KEEP_MS < now:
            return None
        return kept[0]

    def _count(self, date: str, client: str, index: int, amount: int) -> None:
        day = self._usage.get(date)
        if day is None:
            day = self._usage[date] = {}
        row = day.get(client)
        if row is None:
            row = day[client] = [0, 0, 0, 0]
            self._bound_usage(date)
        row[index] += amount

    def _bound_usage(self, today: str) -> None:
        """Keep at most USAGE_ROWS_KEPT rows of past days: the oldest days go first; today's
        rows are never dropped."""
        past = sum(len(rows) for date, rows in self._usage.items() if date != today)
        for date in sorted(self._usage):
            if past <= USAGE_ROWS_KEPT or date >= today:
                break
            past -= len(self._usage.pop(date))

    # --- the Limiter

    async def admit(self, ask: Ask) -> Verdict:
        return self.admit_now(ask)

    def admit_now(self, ask: Ask) -> Verdict:
        """:meth:`admit`, at once: nothing here waits."""
        now = self._clock()
        date, period, period_left = self._calendar.at(now)
        self._sweep(now)
        if period != self._budget_period:
            self._budget_period, self._budgets = period, {}
        client = ask.client
        if ask.verify and self._verified.get(client, -1) < now:
            client = ANONYMOUS
        excess = 0
        if any(rules.tpm for _, rules in ask.scopes):
            excess = self._learned(client, now) or 0
        checked = self._check(ask, client, excess, now, period_left)
        if ask.usage:
            self._count(date, client, 3 if checked.deny is not None else 0, 1)
        if checked.deny is not None:
            refused = remaining(checked.used, None)
            return Verdict(False, checked.deny, max(1, checked.wait), refused, period, date,
                           client, (), checked.budget_left)  # fmt: skip
        self._take(ask, client, checked.costs, now)
        granted = remaining(checked.used, checked.costs)
        return Verdict(True, None, 0, granted, period, date, client, tuple(checked.costs))

    def _check(self, ask: Ask, client: str, excess: int, now: int, period_left: int) -> _Checked:
        """Measure each scope of ``ask`` as ``client``: the first limit it would exceed refuses."""
        checked = _Checked()
        for kind, rules in ask.scopes:
            name = scope_name(kind, client)
            scope = self._scope(name, now)
            scope.expire(now)
            requests = scope.requests or ()
            used_r = len(requests)
            reset_r = requests[0] + WINDOW_MS - now if requests else 0
            if rules.rpm and used_r >= rules.rpm and checked.deny is None:
                checked.deny = "requests"
                checked.wait = requests[used_r - rules.rpm] + WINDOW_MS - now
            cost = rules.token_cost(ask.reserve, excess)
            held = scope.tokens or {}
            used_t = scope.token_sum if rules.tpm else 0
            oldest = next(iter(held.values()), None) if rules.tpm else None
            reset_t = oldest[0] + WINDOW_MS - now if oldest is not None else 0
            if rules.tpm and used_t + cost > rules.tpm and checked.deny is None:
                checked.deny, checked.wait, left = "tokens", WINDOW_MS, used_t
                for at, tokens in held.values():
                    left -= tokens
                    if left + cost <= rules.tpm:
                        checked.wait = at + WINDOW_MS - now
                        break
            if (rules.concurrency and len(scope.leases or ()) >= rules.concurrency
                    and checked.deny is None):  # fmt: skip
                checked.deny, checked.wait = "concurrency", CONCURRENCY_RETRY_MS
            budget_cost = rules.budget_cost(ask.reserve)
            if rules.budget and checked.deny is None:
                spent = self._budgets.get(name, 0)
                if spent + budget_cost > rules.budget:
                    checked.deny, checked.wait = "budget", period_left
                    checked.budget_left = max(0, rules.budget - spent)
            checked.used.append(
                Used(rules.rpm, used_r if rules.rpm else 0, reset_r if rules.rpm else 0,
                     rules.tpm, used_t, reset_t)
            )  # fmt: skip
            checked.costs.append((cost, budget_cost))
        return checked

    def _take(self, ask: Ask, client: str, costs: list[tuple[int, int]], now: int) -> None:
        """Take the admitted request's share of every scope: a request, tokens, a lease."""
        for (kind, rules), (cost, budget_cost) in zip(ask.scopes, costs, strict=True):
            name = scope_name(kind, client)
            scope = self._scopes[name]
            if rules.rpm:
                if scope.requests is None:
                    scope.requests = deque()
                scope.requests.append(now)
            if rules.tpm:
                if scope.tokens is None:
                    scope.tokens = {}
                scope.tokens[ask.id] = (now, cost)
                scope.token_sum += cost
            if rules.concurrency:
                if scope.leases is None:
                    scope.leases = set()
                scope.leases.add(ask.id)
            if rules.budget:
                self._budgets[name] = self._budgets.get(name, 0) + budget_cost

    def settle_now(self, ask: Ask, verdict: Verdict, ended: Settlement) -> None:
        """The request ended: correct its tokens to the real count, end its lease, count usage."""
        actual = ended.input_tokens + ended.output_tokens
        now = self._clock()
        client = verdict.client
        learns = False
        for (kind, rules), (cost, budget_cost) in zip(ask.scopes, verdict.costs, strict=True):
            name = scope_name(kind, client)
            scope = self._scopes.get(name)
            if scope is not None:
                if scope.leases:
                    scope.leases.discard(ask.id)
                held = scope.tokens.get(ask.id) if scope.tokens else None
                if held is not None and scope.tokens is not None:
                    scope.tokens[ask.id] = (held[0], actual)
                    scope.token_sum += actual - cost
            if rules.tpm:
                learns = True
            if rules.budget and verdict.period_id == self._budget_period and name in self._budgets:
                self._budgets[name] += actual - budget_cost
        if learns:
            excess = learn_excess(self._learned(client, now), ask.reserve, actual)
            self._excess.pop(client, None)  # to the end: the most recently learned
            self._excess[client] = (excess, now)
        if ask.usage:
            self._count(verdict.date, client, 1, ended.input_tokens)
            self._count(verdict.date, client, 2, ended.output_tokens)
        if ended.accepted and ask.client.startswith("user-"):
            self.accept(ask.client)

    def accepted(self, client: str) -> bool:
        """Return whether SAI accepted ``client``'s credential within the last day."""
        return self._verified.get(client, -1) >= self._clock()

    def accept(self, client: str) -> None:
        """Note a user's credential that SAI accepted (or the store knew as accepted): while
        the store is unreachable, this replica still counts it as its own client."""
        self._verified.pop(client, None)
        self._verified[client] = self._clock() + VERIFIED_KEEP_MS

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
        return iter(self._usage.get(date, {}).items())

    def _usage_of(self, date: str, client: str) -> list[int] | None:
        """``client``'s counters on ``date``, if any."""
        return self._usage.get(date, {}).get(client)

    def entries(self) -> int:
        """Return how many scopes, learned excesses and accepted credentials are kept."""
        return len(self._scopes) + len(self._excess) + len(self._verified)


def _drop_older(entries: OrderedDict[str, _T], gone: Callable[[_T], bool]) -> None:
    """Drop the entries at the front of ``entries`` (the oldest) for which ``gone`` is true."""
    while entries:
        first = next(iter(entries))
        if not gone(entries[first]):
            return
        del entries[first]
