"""JSON bodies over HTTP: reading a request's (bounded in size and time), writing a response's."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import orjson
from aiohttp import web

from .errors import BodyTimeout, BodyTooLarge, InvalidRequest
from .keys import SETTINGS, STATE

# Its lines keep the logger name they had when this lived in the exchange (operators filter on it).
log = logging.getLogger("saiproxy.exchange")

# A body this large is parsed in a thread, one at a time. orjson holds the GIL,
# but in a thread the loop still gets turns: 8 MiB of 300,000 tiny messages
# stalled the loop 375 ms inline and 156 ms in a thread (and holds ~190 MB
# while parsed, so one at a time also bounds memory).
LARGE_BODY: Final = 256 * 1024


async def read_json(request: web.Request) -> Any:
    """Return the request body parsed as JSON; 413 over MAX_BODY_BYTES, 400 if not JSON.

    aiohttp reads a body only when asked, with no timer of its own: a client
    sending a few bytes now and then would hold the request (and its
    connection) forever. The whole body must arrive within BODY_READ_TIMEOUT,
    or the answer is a 408 and the connection is closed.
    """
    settings = request.app[SETTINGS]
    try:
        if request.content.is_eof():
            raw = await request.read()  # all here already (the usual case): no timer to set
        else:
            async with asyncio.timeout(settings.body_read_timeout):
                raw = await request.read()
    except TimeoutError:
        log.info("request body too slow", extra={"timeout_s": settings.body_read_timeout})
        raise BodyTimeout(
            f"The request body did not arrive within {settings.body_read_timeout:g} s "
            "(BODY_READ_TIMEOUT)"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(
            f"The request body is larger than the limit of {settings.max_body_bytes} bytes "
            "(MAX_BODY_BYTES)"
        ) from None
    try:
        if len(raw) < LARGE_BODY:
            return orjson.loads(raw)
        async with request.app[STATE].large_bodies:
            # In a thread the parse yields the GIL every switch interval, so the
            # loop keeps serving the other requests meanwhile.
            return await asyncio.to_thread(orjson.loads, raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """Return a JSON response."""
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )
