"""Usage per client per day, as the limits keep it: the dates asked for, and every page of
them read from LIMITS_URL's store (``saiproxy usage``); ``GET /limits/usage`` serves it a page
at a time (web/usage.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from .base import USAGE_PAGE_MAX, UsageCursor, UsageRow
from .rules import Period

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_DAYS",
    "MAX_LIMIT",
    "USAGE_PATH",
    "dates",
    "read_store",
    "unique",
]

USAGE_PATH: Final = "/limits/usage"
MAX_DAYS: Final = 40  # as long as usage is kept
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = USAGE_PAGE_MAX


def dates(days: int, now: datetime | None = None) -> list[str]:
    """Return the last ``days`` dates (UTC), today first."""
    today = now or datetime.now(UTC)
    return [(today - timedelta(days=back)).strftime("%Y-%m-%d") for back in range(days)]


async def read_store(url: str, prefix: str, period: Period, wanted: list[str]) -> list[UsageRow]:
    """Return every row of ``wanted`` dates, read a page at a time from the store at ``url``."""
    from .shared import SharedLimiter, connect  # the Redis client, only when asked

    store = connect(url, 5.0)
    try:
        limiter = SharedLimiter(store, prefix, period, 30)
        rows: list[UsageRow] = []
        cursor: UsageCursor | None = None
        while True:
            async with asyncio.timeout(5.0):  # each page; its work is bounded
                page = await limiter.usage_page(wanted, limit=MAX_LIMIT, cursor=cursor)
            rows += page.rows
            if page.next is None:
                return rows
            cursor = page.next
    finally:
        await store.aclose()


def unique(rows: Sequence[UsageRow]) -> list[UsageRow]:
    """Return ``rows`` once each (a row read twice while the store's hash grew), newest day
    first, each day's clients in order."""
    seen: dict[tuple[str, str], UsageRow] = {}
    for row in rows:
        seen.setdefault((row.date, row.client), row)
    by_client = sorted(seen.values(), key=lambda row: row.client)
    return sorted(by_client, key=lambda row: row.date, reverse=True)
