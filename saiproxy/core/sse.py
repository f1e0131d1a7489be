"""Server-sent events: the response, and one keep-alive for every open stream.

A stream that SAI leaves silent still gets a keep-alive frame every
PING_INTERVAL, so proxies and clients with idle timeouts keep it open. One
task per process does this for all streams: ten thousand open streams would
otherwise hold ten thousand sleeping tasks (about 0.7 KB each).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from ..base.keys import STREAM

__all__ = ["COMMENT_PING", "KEEP_ALIVE", "SSE_HEADERS", "EventStream", "KeepAlive"]

SSE_HEADERS: Final = {
    hdrs.CONTENT_TYPE: "text/event-stream",
    hdrs.CACHE_CONTROL: "no-cache",
    "X-Accel-Buffering": "no",  # nginx would otherwise hold frames back
}
COMMENT_PING: Final = b": ping\n\n"


class EventStream(web.StreamResponse):
    """An event stream: SSE headers, chunked, kept alive by the process's :class:`KeepAlive`."""

    def __init__(self, ping: bytes = COMMENT_PING) -> None:
        super().__init__(headers=SSE_HEADERS)
        self.ping = ping  # the protocol's keep-alive frame
        self.quiet = True  # nothing written since the keep-alive last looked

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Send the status line and headers; the body is chunked."""
        self.enable_chunked_encoding()
        if isinstance(request, web.Request):
            # From now on a failure must end this stream, never start a response.
            request[STREAM] = self
        return await super().prepare(request)


class KeepAlive:
    """Pings every open stream that stayed silent for a whole interval."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._streams: set[EventStream] = set()
        self._writes: set[asyncio.Task[None]] = set()

    def add(self, stream: EventStream) -> None:
        """Keep ``stream`` alive from now on (its headers are sent)."""
        self._streams.add(stream)

    def discard(self, stream: EventStream) -> None:
        """Stop keeping ``stream`` alive (it is ending)."""
        self._streams.discard(stream)

    async def run(self) -> None:
        """Ping the silent streams every interval, until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            for stream in list(self._streams):
                if stream.quiet:
                    self._ping(stream)
                stream.quiet = True

    def _ping(self, stream: EventStream) -> None:
        write = asyncio.ensure_future(self._write(stream))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _write(self, stream: EventStream) -> None:
        # A client that went away: its handler notices and ends the stream.
        with contextlib.suppress(ConnectionError, RuntimeError):
            await stream.write(stream.ping)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the keep-alive while the application runs."""
        task = asyncio.ensure_future(self.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


KEEP_ALIVE: Final = web.AppKey("keep_alive", KeepAlive)
