"""The Limiter protocol the two stores implement, and what passes between them and the gate.

Both stores (``local.py`` in the process, ``shared.py`` in Valkey) keep the
same rules; ``tests/test_limits_equivalence.py`` drives them with the same
random sequences and requires the same verdicts.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from .rules import Rules, Verdict

__all__ = [
    "Ask", "Limiter", "Settlement", "UsageCursor", "UsagePage", "UsageRow", "remaining_dates",
    "rows_page", "scope_name",
]  # fmt: skip

ScopeKind = Literal["client", "global"]


@dataclass(frozen=True, slots=True)
class Ask:
    """One client request asking to be admitted: one admission, every scope checked at once."""

    id: str  # unique among every replica's admissions
    client: str  # key-<16 hex>, user-<16 hex> or anonymous
    verify: bool  # a user's credential: its own client once SAI has accepted it, else anonymous
    reserve: int  # input estimate + the answer's bound (or LIMITS_OUTPUT_RESERVE)
    scopes: tuple[tuple[ScopeKind, Rules], ...]  # the client's, the global one, or both
    usage: bool = True  # counted in the client's usage (False: a second admission of a request)


@dataclass(frozen=True, slots=True)
class Settlement:
    """How an admitted request ended: what SAI counted, and whether it accepted a user's
    credential."""

    input_tokens: int
    output_tokens: int
    accepted: bool = False  # SAI answered the user's own credential: it is theirs


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One client's use on one day (UTC)."""

    date: str
    client: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    limited: int = 0


def scope_name(kind: ScopeKind, client: str) -> str:
    """Return a scope's name in the stores: ``client:<id>`` or ``global``."""
    return f"client:{client}" if kind == "client" else "global"


USAGE_PAGE_MAX: Final = 1000  # rows a page of usage may ask for
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True, slots=True)
class UsageCursor:
    """Where the next page of usage starts: the day being read; in the process the last client
    returned from it (a day is read in client order); in the shared store the HSCAN cursor
    of the batch to read, and when a page stopped inside that batch, the last client it
    returned from it, the batch's COUNT and its fingerprint. Sent as an opaque string."""

    date: str
    after: str = ""  # the last client returned on ``date``; "" for none yet
    scan: int = 0  # the shared store: the HSCAN cursor of the batch to read (again)
    count: int = 0  # the shared store: that batch's COUNT, when the page stopped in it
    batch: str = ""  # the shared store: that batch's fingerprint, when the page stopped in it

    def encode(self) -> str:
        """Return the cursor as an opaque URL-safe string."""
        fields = [self.date, self.after, self.scan, self.count, self.batch]
        raw = json.dumps(fields, separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> UsageCursor:
        """Return the cursor ``text`` encodes; ValueError for anything else."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            date, after, scan, count, batch = json.loads(raw)
        except (ValueError, TypeError) as error:  # binascii.Error is a ValueError
            raise ValueError("not a usage cursor") from error
        if (
            not isinstance(date, str) or not _DATE.fullmatch(date)
            or not isinstance(after, str) or not isinstance(batch, str)
            or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in (scan, count))
        ):  # fmt: skip
            raise ValueError("not a usage cursor")
        return cls(date, after, scan, count, batch)


def remaining_dates(dates: Sequence[str], cursor: UsageCursor | None) -> list[str]:
    """Return the days of ``dates`` (newest first) a page starting at ``cursor`` still reads:
    the cursor's day and the older ones (a cursor from before midnight keeps its place)."""
    if cursor is None:
        return list(dates)
    return [date for date in dates if date <= cursor.date]


@dataclass(frozen=True, slots=True)
class UsagePage:
    """One page of usage rows, and where the next page starts (None: this was the last)."""

    rows: list[UsageRow]
    next: UsageCursor | None


def rows_page(rows: Sequence[UsageRow], limit: int) -> UsagePage:
    """Return the first ``limit`` of ``rows`` (one client's: one a day) as a page."""
    if len(rows) > limit:
        return UsagePage(list(rows[:limit]), UsageCursor(rows[limit].date))
    return UsagePage(list(rows), None)


class Limiter(Protocol):
    """A store of limits: in the process, or shared by every replica."""

    async def admit(self, ask: Ask) -> Verdict:
        """Check every limit of every scope at once; on success take the request's share."""

    async def usage_page(
        self,
        dates: Sequence[str],
        *,
        limit: int,
        cursor: UsageCursor | None = None,
        client: str | None = None,
    ) -> UsagePage:
        """Return one page of the use on ``dates`` (newest first) from ``cursor``: at most
        ``limit`` rows, day by day; only ``client``'s rows when given. The work of one page
        is bounded whatever the number of clients; a page may hold fewer than ``limit`` rows
        before the last (only ``next`` None ends)."""
