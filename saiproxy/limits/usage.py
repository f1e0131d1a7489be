"""Usage per client per day: ``saiproxy usage [--json] [--days N]``, and the loopback-only
``GET /limits/usage`` it reads when the limits live in the process (no LIMITS_URL)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import urllib.error
import urllib.request
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from ..keys import LIMITS
from ..settings import SettingsError, setting
from .base import UsageRow
from .rules import Period


def dates(days: int, now: datetime | None = None) -> list[str]:
    """Return the last ``days`` dates (UTC), today first."""
    today = now or datetime.now(UTC)
    return [(today - timedelta(days=back)).strftime("%Y-%m-%d") for back in range(days)]


def _loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


async def usage_view(request: web.Request) -> web.Response:
    """This process's (or the store's) usage, to loopback callers only."""
    limits = request.app.get(LIMITS)
    if limits is None or not _loopback(request.remote):
        raise web.HTTPNotFound()
    try:
        days = min(40, max(1, int(request.query.get("days", "1"))))
    except ValueError:
        days = 1
    rows = await limits.usage(dates(days))
    return web.json_response(
        {"mode": limits.mode, "rows": [asdict(row) for row in rows]},
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
        async with asyncio.timeout(5.0):
            return await SharedLimiter(store, prefix, period, 30).usage(wanted)
    finally:
        await store.aclose()


def _from_process(port: int, key: str | None, days: int) -> list[UsageRow]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/limits/usage?days={days}")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=5) as answer:
        data: dict[str, Any] = json.load(answer)
    return [UsageRow(**row) for row in data["rows"]]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="saiproxy usage",
        description="Print each client's requests, tokens and refusals per day (UTC): from "
        "LIMITS_URL's store, or else from the proxy running on this host (PORT).",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--days", type=int, default=1, help="how many days back (default 1)")
    args = parser.parse_args(argv)
    days = min(40, max(1, args.days))
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
            keys = setting("proxy_api_keys")
            port = setting("port")
            rows = _from_process(port, keys[0].reveal() if keys else None, days)
            source = f"the proxy on 127.0.0.1:{port}"
    except SettingsError as error:
        print(f"saiproxy usage: configuration error: {error}", file=sys.stderr)
        return 2
    except (OSError, urllib.error.URLError) as error:
        print(f"saiproxy usage: cannot read usage: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # the store's client errors
        print(f"saiproxy usage: cannot read usage: {type(error).__name__}", file=sys.stderr)
        return 1
    _print(rows, args.json, source)
    return 0
