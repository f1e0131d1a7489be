"""``GET /limits/usage``: one page of each client's use per day; an admin key reads every
client's, a proxy key its own (the rows are limits/usage.py's)."""

from __future__ import annotations

from dataclasses import asdict

from aiohttp import web

from ..base.errors import ClientError
from ..base.keys import SETTINGS
from ..base.log import limits_logger as log
from ..limits.base import UsageCursor
from ..limits.identity import KeyRing, presented_keys
from ..limits.limits import LIMITS, Limits
from ..limits.usage import DEFAULT_LIMIT, MAX_DAYS, MAX_LIMIT, dates

__all__ = ["usage_view"]


def _reader(request: web.Request, limits: Limits) -> str | None:
    """Return whose rows the caller may read: None for every client's (an admin key), a
    proxy key's own client ID; anyone else gets the 404 of an unknown path. The peer's
    address grants nothing: behind a reverse proxy every caller comes from loopback."""
    admin = (key.reveal().encode() for key in request.app[SETTINGS].admin_api_keys)
    if KeyRing(admin).matches(presented_keys(request)):
        return None
    owner = limits.identify.proxy_client(request)
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
    client = _reader(request, limits)
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
