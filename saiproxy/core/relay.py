"""The streamed answer: wait for SAI keeping the client's connection alive, then relay it.

A :class:`Stream` answers one exchange (its :class:`Source`) with a
renderer's frames over an event stream; several streams may share one
response (the fan-out, :mod:`.fanout`). Every piece of SAI's body goes
through the answer filter (when the conversation needs one) and out as the
renderer's frames; the loop that does it is the proxy's hottest code (see
bench/RESULTS.md): one await per piece, no work per piece that can be done
once. A stream writes nothing of its exchange's: what it learned (the model
SAI named, when its first piece came, the tokens) is its :class:`Learned`,
which the exchange records. :func:`guarded` is the one place a stream's
failures are turned into its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol

from aiohttp import web

from ..base.errors import StreamBroken, UpstreamError
from ..base.log import exchange_logger as log
from ..base.settings import Settings
from ..upstream.sai import SaiStream
from .answer import AnswerFilter
from .conversation import Answer, Usage
from .ending import ERROR_HEADER, Done, Ending, Policy
from .inflight import OpenStream, cut_short
from .prompt import header_tokens
from .render import Renderer
from .sse import KEEP_ALIVE, EventStream

__all__ = ["EAGER_GRACE", "Learned", "Ran", "Source", "Stream", "guarded", "streamed", "usage_of"]

# The exchange's log lines keep its logger name, whichever module writes them.

EAGER_GRACE: Final = 0.05  # seconds an eager stream waits for SAI before it opens anyway

# How a response's streams ran: each answer's ending, and what failed (None: nothing).
Ran = tuple[list[Ending], BaseException | None]


class Source(Protocol):
    """What a stream reads of the exchange it answers (core/exchange.py's Exchange)."""

    request: web.Request
    loop: asyncio.AbstractEventLoop
    settings: Settings
    model: str
    chars: int  # the prompt's, for the token estimate without SAI's counts

    @property
    def early(self) -> UpstreamError | None: ...
    def open(self) -> Coroutine[Any, Any, SaiStream]:
        """Return the call that opens SAI's answer."""

    def let_go(self, upstream: SaiStream) -> None:
        """SAI answered: the prompt need not stay for the length of the stream."""

    def policy(self, *, prepared: bool) -> Policy:
        """Return what an upstream failure becomes."""

    def explained(self, error: UpstreamError, *, relayed: bool, model: str) -> Answer:
        """Return the answer that explains ``error``."""

    def stream_filter(self) -> AnswerFilter | None:
        """Return the filter the answer goes through; None when nothing needs filtering."""

    def answered(self, answer_filter: AnswerFilter, text: str, model: str, usage: Usage) -> Answer:
        """Return the finished answer the filter found."""


@dataclass(slots=True)
class Learned:
    """What relaying SAI's answer learned, for the exchange to record."""

    model: str | None = None  # the model SAI's answer names
    first_byte: float | None = None  # when the body's first piece arrived
    usage: Usage | None = None  # once SAI's body ended or broke off


def usage_of(headers: Mapping[str, str], prompt_chars: int, completion_chars: int) -> Usage:
    """Return one SAI answer's tokens: its headers, else estimates from the characters."""
    return Usage(
        header_tokens(headers, "prompttokens", prompt_chars),
        header_tokens(headers, "completiontokens", completion_chars),
    )


async def guarded(
    stream: Stream,
    run: Awaitable[Ran],
    end: Callable[[UpstreamError, list[Ending]], Awaitable[list[Ending]]],
) -> Done:
    """Run a response's streams (``run``: each answer's ending, and what failed) and end it.

    The one place a streamed response's failures become its end. A failure
    that must be a real HTTP status, and a client hanging up, are returned
    for the caller to raise. Shutdown's cut, or saiproxy failing after the
    stream started, ends the unfinished answers with ``end`` (as the error
    policy says, in-band: never a new response).
    """
    source, response = stream.source, stream.response
    with OpenStream(source.request, response):
        endings, failure = await run
        if isinstance(failure, asyncio.CancelledError):
            try:
                cut = cut_short(source.request, source.loop)
            except asyncio.CancelledError as gone:
                return Done(response, endings, gone)  # the client hung up
            try:
                endings, failure = await end(cut, endings), None
            except UpstreamError as error:  # nothing was sent: a real status
                return Done(response, [Ending.failed(error)] * len(endings), error)
        elif failure is not None:
            ours = isinstance(failure, Exception) and not isinstance(failure, UpstreamError)
            if not ours or not response.prepared:
                return Done(response, endings, failure)  # a real status still, or the policy's
            log.error("the stream failed after it started; ended in-band", exc_info=failure)
            try:
                endings, failure = await end(StreamBroken(), endings), None
            except Exception:  # the renderer failed again: the stream just ends
                log.error("the stream could not report its failure", exc_info=True)
                endings, failure = [Ending.in_band(StreamBroken())] * len(endings), None
        await response.write_eof()
        return Done(response, endings, None)


async def streamed(stream: Stream) -> Done:
    """Answer one exchange with ``stream``: the response, its ending, what failed."""
    return await guarded(stream, _run_alone(stream), partial(_end_alone, stream))


async def _run_alone(stream: Stream) -> Ran:
    try:
        # A task of its own: every piece then resumes the few frames of the
        # relay, not also the dozen of aiohttp's handler and the middlewares
        # above it (a cancellation still reaches it).
        return [await stream.source.loop.create_task(stream.run())], None
    except BaseException as exc:
        return [Ending.failed(exc)], exc


async def _end_alone(stream: Stream, cut: UpstreamError, endings: list[Ending]) -> list[Ending]:
    return [await stream.failed(cut, relayed=stream.relayed)]


class Stream:
    """The streamed answer of one exchange: started or not, what went out, how it ended."""

    __slots__ = ("answer", "learned", "relayed", "renderer", "response", "source", "started")

    def __init__(self, source: Source, renderer: Renderer, response: EventStream) -> None:
        self.source = source
        self.renderer = renderer
        self.response = response
        self.started = False
        self.relayed = False  # some of the answer went out
        self.answer: Answer | None = None  # the answer, once it has finished
        self.learned = Learned()

    @property
    def model(self) -> str:
        """Return the model the answer names: SAI's, once it said, else the exchange's."""
        return self.learned.model or self.source.model

    async def run(self, *, keep_alive: bool = True) -> Ending:
        """Wait for SAI (keeping the client's connection alive), then relay or fail.

        Of several streams sharing a response only one need send keep-alives:
        whichever way it stops waiting, the response has started (and the SSE
        response pings by itself from then on) or the request has failed.
        """
        source, renderer, response = self.source, self.renderer, self.response
        interval = source.settings.ping_interval if keep_alive else None
        loop = source.loop
        opening = loop.create_task(source.open())
        relaying = False
        try:
            if renderer.eager and source.early is None:
                # These clients expect the opening event at once. A SAI that
                # answers within the grace opens the stream itself, with its
                # model name and no write of its own (a fast failure is then
                # still a real status in http mode).
                await _until_done(loop, opening, EAGER_GRACE)
                if not opening.done():
                    await self.start(source.model)
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
            relaying = True  # the relay closes SAI's answer however it ends
            return await self.relay(upstream)
        finally:
            if not opening.done():
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                    await opening
            elif not relaying and not opening.cancelled() and opening.exception() is None:
                opening.result().close()  # SAI answered as the client left: nobody will read

    async def prepare(self) -> None:
        """Send the status line and headers, if not yet sent; keep the stream alive from then on."""
        if not self.response.prepared:
            await self.response.prepare(self.source.request)
            self.source.request.app[KEEP_ALIVE].add(self.response)

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
        source, renderer, response = self.source, self.renderer, self.response
        policy = source.policy(prepared=response.prepared)
        if policy == "raise":
            raise error
        if policy == "in_band":
            await self.prepare()
            await response.write(renderer.failure(error))
            return Ending.in_band(error)
        answer = source.explained(error, relayed=relayed, model=self.model)
        if not response.prepared:
            response.headers[ERROR_HEADER] = answer.outcome
        await self.start(self.model)
        await response.write(renderer.text(answer.text))
        answer.text = ""
        self.answer = answer
        await response.write(renderer.finish(answer))
        return Ending.answered(answer)

    async def relay(self, upstream: SaiStream) -> Ending:
        """Forward SAI's body piece by piece as prose, then the calls and the finish.

        However it stops, what the answer cost is learned: SAI's counts or,
        without them, what had arrived (the client gone, the body broken).
        """
        response, learned, source = self.response, self.learned, self.source
        write, text = response.write, self.renderer.text
        answer_filter = source.stream_filter()
        chars = 0
        with upstream:
            learned.model = upstream.headers.get("model") or None
            source.let_go(upstream)
            await self.start(self.model)
            # The loop every token goes through: one await per piece.
            read, text_of = upstream.read_chunk, upstream.text_of
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
                    if learned.first_byte is None:
                        learned.first_byte = time.monotonic()
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
                return await self._broke_off(error, chars, answer_filter)
            finally:
                learned.usage = usage_of(upstream.headers, source.chars, chars)
        return await self._finish(answer_filter)

    async def _broke_off(
        self, error: UpstreamError, chars: int, answer_filter: AnswerFilter | None
    ) -> Ending:
        """End a stream whose body broke off: what the filter held, then the error."""
        # Mid-stream: never let a broken body look like a clean stop.
        log.warning(
            "upstream broke off mid-stream", extra={"error": error.code, "chars_sent": chars}
        )
        if answer_filter is not None and (held := answer_filter.close()):
            await self.response.write(self.renderer.text(held))
        return await self.failed(error, relayed=True)

    async def _finish(self, answer_filter: AnswerFilter | None) -> Ending:
        """Send the held text, the calls and the closing frames; return the ending."""
        renderer, write = self.renderer, self.response.write
        usage = self.learned.usage or Usage()
        if answer_filter is None:
            answer = Answer("", self.model, "stop", usage=usage)
        else:
            held = answer_filter.close()
            if held:
                await write(renderer.text(held))
            answer = self.source.answered(answer_filter, "", self.model, usage)
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
