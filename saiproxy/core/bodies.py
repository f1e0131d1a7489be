"""JSON bodies over HTTP: reading a request's (bounded in size and time), writing a response's
and an error's (every protocol's handlers and the core write them, so they live here)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict

from ..base.errors import BodyTimeout, BodyTooLarge, InvalidRequest, ProxyError
from ..base.keys import SETTINGS, STATE
from ..base.log import exchange_logger as log
from .bounds import check_depth

__all__ = [
    "LARGE_BODY",
    "MEMORY_TRIM",
    "TRIM_DELAY",
    "MemoryTrim",
    "error_response",
    "json_response",
    "read_json",
]

# Its lines keep the logger name they had when this lived in the exchange (operators filter on it).

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
            return _parse(raw, settings.max_json_depth)
        request.app[MEMORY_TRIM].after()
        async with request.app[STATE].large_bodies:
            # In a thread the parse yields the GIL every switch interval, so the
            # loop keeps serving the other requests meanwhile.
            return await asyncio.to_thread(_parse, raw, settings.max_json_depth)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


# glibc keeps what a large body's parse freed in the middle of its heaps: 24
# requests with 3-6 MB tools left ~110 MB resident for good. malloc_trim hands
# it back; musl and others have no such call (and no such heaps).
_MALLOC_TRIM: Final = _find_malloc_trim()
TRIM_DELAY: Final = 0.5  # seconds after a large-body request ends; later ones join the same trim


class MemoryTrim:
    """Hand the memory large bodies took back to the system: one trim at a time, per app."""

    def __init__(self) -> None:
        self._pending = False

    def after(self) -> None:
        """Trim once the request is done (and TRIM_DELAY later); later ones join the same trim."""
        task = asyncio.current_task()
        if _MALLOC_TRIM is None or task is None:
            return
        loop = asyncio.get_running_loop()

        def schedule(_: object) -> None:
            if not self._pending:
                self._pending = True
                loop.call_later(TRIM_DELAY, run)

        def run() -> None:
            self._pending = False
            # In a thread: a trim walks every heap, and the loop has requests to serve.
            loop.run_in_executor(None, _MALLOC_TRIM, 0)

        task.add_done_callback(schedule)


MEMORY_TRIM: Final = web.AppKey("memory_trim", MemoryTrim)


def _parse(raw: bytes, max_depth: int) -> Any:
    """Return the body parsed, refused (400) when it nests deeper than MAX_JSON_DEPTH.

    Checked once here, for every protocol and every field: whatever is
    nested within the limit can be written back out, logged and validated.
    """
    body = orjson.loads(raw)
    # Each level of nesting needs a bracket: a body with no more brackets than
    # the limit (most requests) needs no walk, which costs more than the parse.
    if raw.count(b"{") + raw.count(b"[") > max_depth:
        check_depth(body, max_depth)
    return body


# The Response copies its headers: one made once, not a content type parsed per response.
_JSON_HEADERS: Final = CIMultiDict({hdrs.CONTENT_TYPE: "application/json"})


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """Return a JSON response."""
    if headers:
        return web.Response(body=orjson.dumps(data), status=status,
                            headers={**_JSON_HEADERS, **headers})  # fmt: skip
    return web.Response(body=orjson.dumps(data), status=status, headers=_JSON_HEADERS)


def error_response(error: ProxyError) -> web.Response:
    """Render a ProxyError as its HTTP status and OpenAI error object."""
    return json_response(error.body(), error.status, error.headers())
