"""The streamed answer: wait for SAI keeping the client's connection alive, then relay it.

:func:`respond_streamed` answers one exchange with an event stream; the
fan-out (:mod:`.fanout`) runs one :class:`Stream` per choice over a shared
response. Every piece of SAI's body goes through the answer filter (when
the conversation needs one) and out as the renderer's frames; the loop that
does it is the proxy's hottest code (see bench/RESULTS.md): one await per
piece, no work per piece that can be done once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from ..base.errors import StreamBroken, UpstreamError
from ..upstream.sai import SaiStream
from .conversation import Answer
from .ending import ERROR_HEADER, Ending
from .inflight import OpenStream, cut_short
from .render import Renderer
from .sse import KEEP_ALIVE, EventStream

if TYPE_CHECKING:
    from .exchange import Exchange

__all__ = ["EAGER_GRACE", "Stream", "respond_streamed"]

# The exchange's log lines keep its logger name, whichever module writes them.
log = logging.getLogger("saiproxy.exchange")

EAGER_GRACE: Final = 0.05  # seconds an eager stream waits for SAI before it opens anyway


async def respond_streamed(
    exchange: Exchange, renderer: Renderer
) -> tuple[web.StreamResponse, Ending]:
    """Answer ``exchange`` as an event stream; return the response and how the answer ended.

    A failure that must be a real HTTP status is raised. Shutdown's cut ends
    the stream as the error policy says; a client hanging up propagates.
    """
    response = EventStream(renderer.ping())
    stream = Stream(exchange, renderer, response)
    with OpenStream(exchange.request, response):
        try:
            # A task of its own: every piece then resumes the few frames of
            # the relay, not also the dozen of aiohttp's handler and the
            # middlewares above it (a cancellation still reaches it).
            ending = await exchange.loop.create_task(stream.run())
        except asyncio.CancelledError:
            ending = await stream.failed(
                cut_short(exchange.request, exchange.loop), relayed=stream.relayed
            )
        except Exception as exc:
            if isinstance(exc, UpstreamError) or not response.prepared:
                raise  # a real status still (nothing was sent), or the policy's to raise
            ending = await stream.broke(exc)
        await response.write_eof()
        return response, ending


class Stream:
    """The streamed answer of one exchange: started or not, what went out, how it ended."""

    __slots__ = ("answer", "exchange", "relayed", "renderer", "response", "started")

    def __init__(self, exchange: Exchange, renderer: Renderer, response: EventStream) -> None:
        self.exchange = exchange
        self.renderer = renderer
        self.response = response
        self.started = False
        self.relayed = False  # some of the answer went out
        self.answer: Answer | None = None  # the answer, once it has finished

    async def run(self, *, keep_alive: bool = True) -> Ending:
        """Wait for SAI (keeping the client's connection alive), then relay or fail.

        Of several streams sharing a response only one need send keep-alives:
        whichever way it stops waiting, the response has started (and the SSE
        response pings by itself from then on) or the request has failed.
        """
        exchange, renderer, response = self.exchange, self.renderer, self.response
        interval = exchange.settings.ping_interval if keep_alive else None
        loop = exchange.loop
        opening = loop.create_task(exchange.open())
        try:
            if renderer.eager and exchange.early is None:
                # These clients expect the opening event at once. A SAI that
                # answers within the grace opens the stream itself, with its
                # model name and no write of its own (a fast failure is then
                # still a real status in http mode).
                await _until_done(loop, opening, EAGER_GRACE)
                if not opening.done():
                    await self.start(exchange.model)
            # Until SAI answers 200 nothing need be sent, so a failure can still be a
            # real HTTP status; if the first keep-alive falls due first, the stream starts.
            while not opening.done():
                await _until_done(loop, opening, interval)
                if not opening.done():
                    await self.prepare()
                    await response.write(renderer.ping())
            try:
                upstream = opening.result()
            except UpstreamError as error:
                return await self.failed(error)
            return await self.relay(upstream)
        finally:
            if not opening.done():
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                    await opening

    async def prepare(self) -> None:
        """Send the status line and headers, if not yet sent; keep the stream alive from then on."""
        if not self.response.prepared:
            await self.response.prepare(self.exchange.request)
            self.exchange.request.app[KEEP_ALIVE].add(self.response)

    async def start(self, model: str) -> None:
        """Send the opening frames, if not yet sent."""
        await self.prepare()
        if not self.started:
            self.started = True
            await self.response.write(self.renderer.head(model))

    async def failed(self, error: UpstreamError, *, relayed: bool = False) -> Ending:
        """End the stream with ``error`` as the policy says; re-raise it for a real status.

        An in-band error (``http`` mode, the stream started) is the stream's
        last event: nothing may follow it, and its ending says so
        (:attr:`Ending.stops_stream`).
        """
        exchange, renderer, response = self.exchange, self.renderer, self.response
        policy = exchange.policy(prepared=response.prepared)
        if policy == "raise":
            raise error
        if policy == "in_band":
            await self.prepare()
            await response.write(renderer.failure(error))
            return Ending.in_band(error)
        answer = exchange.explained(error, relayed=relayed)
        if not response.prepared:
            response.headers[ERROR_HEADER] = answer.outcome
        await self.start(exchange.model)
        await response.write(renderer.text(answer.text))
        answer.text = ""
        self.answer = answer
        await response.write(renderer.finish(answer))
        return Ending.answered(answer)

    async def broke(self, exc: Exception) -> Ending:
        """End a started stream that saiproxy failed to relay: in-band, never a new response."""
        log.error("the stream failed after it started; ended in-band", exc_info=exc)
        try:
            return await self.failed(StreamBroken(), relayed=self.relayed)
        except Exception:  # the renderer failed again: the stream just ends
            log.error("the stream could not report its failure", exc_info=True)
            return Ending.in_band(StreamBroken())

    async def relay(self, upstream: SaiStream) -> Ending:
        """Forward SAI's body piece by piece as prose, then the calls and the finish."""
        exchange, renderer, response = self.exchange, self.renderer, self.response
        write = response.write
        answer_filter = exchange.stream_filter()
        chars = 0
        async with upstream:
            exchange.opened(upstream)
            await self.start(exchange.model)
            # The loop every token goes through: one await per piece.
            read, text_of, text = upstream.read_chunk, upstream.text_of, renderer.text
            try:
                while True:
                    try:
                        piece = text_of(await read())
                    except upstream.BROKEN as exc:
                        raise upstream.body_error(exc) from None
                    if piece is None:
                        break
                    if not piece:
                        continue  # a character still incomplete
                    if exchange.first_byte is None:
                        exchange.first_byte = time.monotonic()
                    chars += len(piece)
                    if answer_filter is not None:
                        piece = answer_filter.feed(piece)
                        if answer_filter.stopped:
                            if piece:
                                self.relayed = True
                                await write(text(piece))
                            break  # leaving closes SAI's answer: nobody reads the rest
                        if not piece:
                            continue
                    self.relayed = True
                    response.quiet = False
                    await write(text(piece))
            except UpstreamError as error:
                exchange.count(upstream.headers, chars)
                # Mid-stream: never let a broken body look like a clean stop.
                log.warning(
                    "upstream broke off mid-stream",
                    extra={"error": error.code, "chars_sent": chars},
                )
                if answer_filter is not None and (held := answer_filter.close()):
                    await write(renderer.text(held))
                return await self.failed(error, relayed=True)
            except BaseException:
                # The client is gone (or the request cancelled): the answer cost what SAI
                # said it did or, without its counts, what had arrived.
                exchange.count(upstream.headers, chars)
                raise
        exchange.count(upstream.headers, chars)
        if answer_filter is None:
            answer = Answer("", exchange.model, "stop", usage=exchange.usage)
        else:
            held = answer_filter.close()
            if held:
                await write(renderer.text(held))
            answer = exchange.answered(answer_filter, "")
            if answer.calls:
                await write(renderer.calls(answer.calls))
        self.answer = answer
        # A renderer that stores its answer (stored Responses) does so before the last
        # frames go out, so a client that has read them finds it stored on any replica.
        keep = getattr(renderer, "keep", None)
        if keep is not None and (closing := await keep(answer)):
            await write(closing)
        await write(renderer.finish(answer))
        return Ending.answered(answer)


async def _until_done(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], within: float | None
) -> None:
    """Wait until ``future`` is done or ``within`` seconds have passed, whichever is first.

    ``asyncio.wait({future}, timeout=within)`` with the loop at hand (see
    :attr:`Exchange.loop`) and no set, no task per wait; the future is never
    cancelled.
    """
    if future.done():
        return
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(within, wake) if within is not None else None
    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        future.remove_done_callback(wake)
