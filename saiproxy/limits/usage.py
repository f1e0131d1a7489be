"""Usage per client per day: ``GET /limits/usage`` (an admin key reads every client's, a
proxy key its own; paginated) and ``saiproxy usage [--json] [--days N]``, which reads every
page from LIMITS_URL's store, or else from the proxy on this host with an admin key."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web

from ..base.errors import ClientError
from ..base.keys import SETTINGS
from ..base.settings import SettingsError, setting
from ..web.middlewares import any_key_matches, presented_keys
from .base import USAGE_PAGE_MAX, UsageCursor, UsageRow
from .identity import digest
from .limits import LIMITS
from .rules import Period

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_DAYS",
    "MAX_LIMIT",
    "USAGE_PATH",
    "dates",
    "main",
    "usage_view",
]

log = logging.getLogger("saiproxy.limits")

USAGE_PATH: Final = "/limits/usage"
MAX_DAYS: Final = 40  # as long as usage is kept
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = USAGE_PAGE_MAX


def dates(days: int, now: datetime | None = None) -> list[str]:
    """Return the last ``days`` dates (UTC), today first."""
    today = now or datetime.now(UTC)
    return [(today - timedelta(days=back)).strftime("%Y-%m-%d") for back in range(days)]


def _reader(request: web.Request) -> str | None:
    """Return whose rows the caller may read: None for every client's (an admin key), a
    proxy key's own client ID; anyone else gets the 404 of an unknown path. The peer's
    address grants nothing: behind a reverse proxy every caller comes from loopback."""
    settings = request.app[SETTINGS]
    presented = presented_keys(request)
    admin = [key.reveal().encode() for key in settings.admin_api_keys]
    if any_key_matches(presented, admin):
        return None
    owner: str | None = None
    for key in settings.proxy_api_keys:  # each compared, whichever matches
        if any_key_matches(presented, [key.reveal().encode()]) and owner is None:
            owner = f"key-{digest(key.reveal())}"
    if owner is None:
        raise web.HTTPNotFound()
    return owner


def _number(request: web.Request, name: str, default: int, highest: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= highest:
        raise ClientError(f"{name} must be a whole number from 1 to {highest}", param=name)
    return value


async def usage_view(request: web.Request) -> web.Response:
    """One page of usage: ``?days=N`` (1-40, default 1), ``&limit=K`` (1-1000, default 100),
    ``&cursor=`` the previous page's ``next_cursor``; every client's for an admin key, the
    caller's own for a proxy key."""
    limits = request.app.get(LIMITS)
    if limits is None:
        raise web.HTTPNotFound()
    client = _reader(request)
    days = _number(request, "days", 1, MAX_DAYS)
    limit = _number(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    cursor: UsageCursor | None = None
    if "cursor" in request.query:
        try:
            cursor = UsageCursor.decode(request.query["cursor"])
        except ValueError:
            raise ClientError(
                "cursor is not a next_cursor of this endpoint", param="cursor"
            ) from None
    try:
        page = await limits.usage_page(dates(days), limit=limit, cursor=cursor, client=client)
    except Exception as error:
        if limits.shared is None:
            raise
        # The store failed or timed out: said as such; the breaker is for admissions.
        log.warning("usage: the limits store did not answer", extra={"error": type(error).__name__})
        raise web.HTTPServiceUnavailable(reason="The limits store did not answer") from None
    return web.json_response(
        {
            "mode": limits.mode,
            "rows": [asdict(row) for row in page.rows],
            "next_cursor": page.next.encode() if page.next is not None else None,
        }
    )


def _print(rows: list[UsageRow], as_json: bool, source: str) -> None:
    if as_json:
        print(json.dumps({"source": source, "rows": [asdict(row) for row in rows]}, indent=2))
        return
    print(f"usage from {source}")
    header = ("date", "client", "requests", "input_tokens", "output_tokens", "limited")
    table = [header] + [
        (r.date, r.client, str(r.requests), str(r.input_tokens), str(r.output_tokens),
         str(r.limited))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    if not rows:
        print("(no requests recorded)")


async def _from_store(url: str, prefix: str, period: Period, wanted: list[str]) -> list[UsageRow]:
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


def _from_process(port: int, admin_key: str, days: int) -> list[UsageRow]:
    rows: list[UsageRow] = []
    cursor: str | None = None
    while True:
        query = {"days": str(days), "limit": str(MAX_LIMIT)}
        if cursor is not None:
            query["cursor"] = cursor
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{USAGE_PATH}?{urllib.parse.urlencode(query)}",
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            data: dict[str, Any] = json.load(answer)
        rows += [UsageRow(**row) for row in data["rows"]]
        following = data.get("next_cursor")
        if following is None:
            return rows
        if following == cursor:
            raise ValueError("the proxy answered the same page twice")
        cursor = following


def _unique(rows: Sequence[UsageRow]) -> list[UsageRow]:
    """Return ``rows`` once each (a row read twice while the store's hash grew), newest day
    first, each day's clients in order."""
    seen: dict[tuple[str, str], UsageRow] = {}
    for row in rows:
        seen.setdefault((row.date, row.client), row)
    by_client = sorted(seen.values(), key=lambda row: row.client)
    return sorted(by_client, key=lambda row: row.date, reverse=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="saiproxy usage",
        description="Print each client's requests, tokens and refusals per day (UTC): from "
        "LIMITS_URL's store, or else from the proxy running on this host (PORT), read with "
        "the first of ADMIN_API_KEYS.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--days", type=int, default=1, help="how many days back (default 1)")
    args = parser.parse_args(argv)
    days = min(MAX_DAYS, max(1, args.days))
    try:
        url = setting("limits_url")
        if url is not None:
            rows = asyncio.run(
                _from_store(
                    url.reveal(), setting("limits_prefix"), setting("limits_budget_period"),
                    dates(days),
                )
            )  # fmt: skip
            source = "the limits store"
        else:
            port = setting("port")
            admin_keys = setting("admin_api_keys")
            if not admin_keys:
                print(
                    f"saiproxy usage: set ADMIN_API_KEYS (an admin key of the proxy on "
                    f"127.0.0.1:{port}) to read its usage, or LIMITS_URL to read the store",
                    file=sys.stderr,
                )
                return 2
            rows = _from_process(port, admin_keys[0].reveal(), days)
            source = f"the proxy on 127.0.0.1:{port}"
    except SettingsError as error:
        print(f"saiproxy usage: configuration error: {error}", file=sys.stderr)
        return 2
    except urllib.error.HTTPError as error:
        hint = (
            " (is the first of ADMIN_API_KEYS one of the proxy's, and are its limits on?)"
            if error.code in (401, 404)
            else ""
        )
        print(f"saiproxy usage: the proxy answered {error.code}{hint}", file=sys.stderr)
        return 1
    except (OSError, ValueError, urllib.error.URLError) as error:
        print(f"saiproxy usage: cannot read usage: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # the store's client errors
        print(f"saiproxy usage: cannot read usage: {type(error).__name__}", file=sys.stderr)
        return 1
    _print(_unique(rows), args.json, source)
    return 0
