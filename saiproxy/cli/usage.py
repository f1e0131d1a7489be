"""``saiproxy usage [--json] [--days N]``: each client's use per day, every page of it, from
LIMITS_URL's store, or else from the proxy on this host with an admin key."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict
from typing import Any

from ..base.settings import SettingsError, setting
from ..limits.base import UsageRow
from ..limits.usage import MAX_DAYS, MAX_LIMIT, USAGE_PATH, dates, read_store, unique

__all__ = ["main"]


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
                read_store(
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
    _print(unique(rows), args.json, source)
    return 0
