"""Several conversations answered in one response: one choice each, their SAI calls at once.

Each exchange makes its own SAI call (concurrently), with its own credential
decision, log lines (same request ID, ``choice`` = its index) and error
policy; streamed, their frames interleave in one stream with one
terminator. A failure that must be a real HTTP status, or an in-band error
that ends the stream, stops the other choices (their ending: ``cancelled``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from aiohttp import web

from ..base.errors import StreamBroken, UpstreamError
from ..tracing import hooks as tracing
from .bodies import json_response
from .ending import CLIENT_GONE, ERROR_HEADER, Ending
from .exchange import Exchange, admit, conclude
from .inflight import InFlight, OpenStream, cut_short
from .relay import Stream
from .render import Choices
from .sse import EventStream

__all__ = ["respond_all"]

log = logging.getLogger("saiproxy.exchange")
_T = TypeVar("_T")


async def respond_all(exchanges: Sequence[Exchange], choices: Choices) -> web.StreamResponse:
    """Answer one request from several conversations at once: one choice each, in one response."""
    for index, exchange in enumerate(exchanges):
        exchange.choice = index
    fan_out = _FanOut(exchanges)
    first = exchanges[0]
    # Shutdown waits for it within its budget (a cut past it closes the connection).
    with InFlight(first.request, first.loop):
        try:
            try:
                for exchange in exchanges:
                    exchange.begin()
                with tracing.admission(first.span, first.request):
                    await admit(exchanges)  # the limits, once, before SAI
            except BaseException as exc:
                # e.g. no credential: the request ends for every choice
                fan_out.endings[:] = [Ending.failed(exc)] * len(exchanges)
                raise
            if first.conversation.stream:
                return await fan_out.stream(choices)
            return await fan_out.complete(choices)
        finally:
            conclude(exchanges, fan_out.endings)


class _Stopped(Exception):
    """One choice's stream ended with an in-band error: the others stop there."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.outcome)
        self.ending = ending


class _FanOut:
    """The exchanges of one response, and how each one ended."""

    __slots__ = ("endings", "exchanges")

    def __init__(self, exchanges: Sequence[Exchange]) -> None:
        self.exchanges = exchanges
        self.endings = [Ending()] * len(exchanges)

    async def complete(self, choices: Choices) -> web.Response:
        """Return the non-streamed response: every answer (or failure explained) a choice."""
        answers = await self._together(lambda _, exchange: exchange.answer(), Ending.answered)
        failed = next((answer.outcome for answer in answers if answer.outcome != "ok"), None)
        headers = {ERROR_HEADER: failed} if failed is not None else None
        return json_response(choices.body(answers), headers=headers)

    async def stream(self, choices: Choices) -> web.StreamResponse:
        """Return the event stream the choices' frames interleave in, with one terminator."""
        first = self.exchanges[0]
        response = EventStream(choices.choice(0).ping())
        streams = [
            Stream(exchange, choices.choice(index), response)
            for index, exchange in enumerate(self.exchanges)
        ]
        with OpenStream(first.request, response):
            try:
                await self._together(
                    lambda index, _: streams[index].run(keep_alive=index == 0), _ending_itself
                )
            except _Stopped:
                pass
            except asyncio.CancelledError:
                first = self.exchanges[0]
                await self._end(streams, choices, cut_short(first.request, first.loop))
            except Exception as exc:
                if isinstance(exc, UpstreamError) or not response.prepared:
                    raise  # a real status still (nothing was sent), or the policy's to raise
                # saiproxy itself failed after the stream started: the choices end
                # in-band as a single stream's do, never as a second response.
                log.error("the stream failed after it started; ended in-band", exc_info=exc)
                await self._end(streams, choices, StreamBroken())
            else:
                await response.write(choices.finish([s.answer for s in streams if s.answer]))
            await response.write_eof()
            return response

    async def _end(self, streams: Sequence[Stream], choices: Choices, cut: UpstreamError) -> None:
        """End the unfinished choices of a stream with ``cut``, as a single stream ends.

        ``cut`` is shutdown's (``cut_short``: a cancellation that is not
        shutdown's, the client hanging up, propagates from there) or saiproxy's
        own failure after the start. Each unfinished choice gets its ending
        (``message`` mode: the explanation and a truncated finish); an in-band
        error ends them all at once. With nothing sent yet, the cut is a real
        status.
        """
        response = streams[0].response
        unfinished = [index for index, stream in enumerate(streams) if stream.answer is None]
        endings = self.endings
        for index in unfinished:
            endings[index] = Ending(200, cut.code or "error")
        try:
            for index in unfinished:
                stream = streams[index]
                endings[index] = ending = await stream.failed(cut, relayed=stream.relayed)
                if ending.stops_stream:
                    return
        except UpstreamError as error:
            for index in unfinished:
                endings[index] = Ending.failed(error)
            raise
        await response.write(choices.finish([s.answer for s in streams if s.answer]))

    async def _together(
        self,
        work: Callable[[int, Exchange], Awaitable[_T]],
        ending_of: Callable[[_T], Ending],
    ) -> list[_T]:
        """Run ``work`` for every exchange concurrently (PROMPT_CONCURRENCY at most at once);
        return the results, in order.

        Each exchange's ending is noted as its work ends. The first failure,
        or an ending that stops the stream (raised as :class:`_Stopped`),
        cancels the others, whose ending is then ``cancelled`` with the
        status the response got.
        """
        endings = self.endings
        stopped_by: list[Ending] = []  # the ending that stopped the others, once one did
        # At most PROMPT_CONCURRENCY of them call SAI at once: one small request
        # must not turn into as many concurrent SAI calls as it has prompts.
        slots = asyncio.Semaphore(self.exchanges[0].settings.prompt_concurrency)

        async def one(index: int, exchange: Exchange) -> _T:
            try:
                async with slots:
                    result = await work(index, exchange)
            except asyncio.CancelledError:
                endings[index] = (
                    Ending(stopped_by[0].status, "cancelled") if stopped_by else CLIENT_GONE
                )
                raise
            except BaseException as exc:
                endings[index] = Ending.failed(exc)
                raise
            endings[index] = ending = ending_of(result)
            if ending.stops_stream:
                raise _Stopped(ending)
            return result

        loop = self.exchanges[0].loop
        tasks = [loop.create_task(one(i, e)) for i, e in enumerate(self.exchanges)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failure = next(
                (t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()),
                None,
            )
            if failure is None:
                return [task.result() for task in tasks]
            stopped_by.append(
                failure.ending if isinstance(failure, _Stopped) else Ending.failed(failure)
            )
            pending = [task for task in tasks if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            raise failure
        finally:
            # The client went away (or this task was cancelled): so do the SAI calls.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _ending_itself(ending: Ending) -> Ending:
    return ending
