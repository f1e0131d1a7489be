"""Several conversations answered in one response: one choice each, their SAI calls at once.

Each exchange makes its own SAI call (concurrently), with its own credential
decision, log lines (same request ID, ``choice`` = its index) and error
policy; streamed, their frames interleave in one stream with one
terminator. A failure that must be a real HTTP status, or an in-band error
that ends the stream, stops the other choices (their ending: ``cancelled``).
The fan-out returns every choice's ending; the exchange records them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

from aiohttp import web

from ..base.errors import UpstreamError
from .bodies import json_response
from .conversation import Answer
from .ending import CLIENT_GONE, ERROR_HEADER, Done, Ending
from .exchange import Exchange, answer_request
from .relay import Ran, Stream, guarded
from .render import Choices
from .sse import EventStream

__all__ = ["respond_all"]

_T = TypeVar("_T")


async def respond_all(exchanges: Sequence[Exchange], choices: Choices) -> web.StreamResponse:
    """Answer one request from several conversations at once: one choice each, in one response."""
    return await answer_request(exchanges, _FanOut(exchanges, choices).respond, choices=True)


class _Stopped(Exception):
    """One choice's stream ended with an in-band error: the others stop there."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.outcome)
        self.ending = ending


@dataclass(frozen=True, slots=True)
class _Together(Generic[_T]):
    """How the choices' work went: the results (when all succeeded), each ending, what failed."""

    results: list[_T]
    endings: list[Ending]
    failure: BaseException | None


class _FanOut:
    """The exchanges of one response, and the shapes of its choices."""

    __slots__ = ("choices", "exchanges")

    def __init__(self, exchanges: Sequence[Exchange], choices: Choices) -> None:
        self.exchanges = exchanges
        self.choices = choices

    async def respond(self) -> Done:
        """Return the response, streamed or not, and every choice's ending."""
        if self.exchanges[0].conversation.stream:
            return await self.stream()
        return await self.complete()

    async def complete(self) -> Done:
        """Return the non-streamed response: every answer (or failure explained) a choice."""
        together = await self._together(lambda _, exchange: exchange.answer(), Ending.answered)
        if together.failure is not None:
            return Done(None, together.endings, together.failure)
        answers = together.results
        failed = next((answer.outcome for answer in answers if answer.outcome != "ok"), None)
        headers = {ERROR_HEADER: failed} if failed is not None else None
        return Done(json_response(self.choices.body(answers), headers=headers), together.endings)

    async def stream(self) -> Done:
        """Return the event stream the choices' frames interleave in, with one terminator."""
        choices = self.choices
        response = EventStream(choices.choice(0).ping())
        streams = [
            Stream(exchange, choices.choice(index), response)
            for index, exchange in enumerate(self.exchanges)
        ]
        try:
            return await guarded(streams[0], self._run(streams), partial(self._end, streams))
        finally:
            for exchange, stream in zip(self.exchanges, streams, strict=True):
                exchange.record(stream.learned)

    async def _run(self, streams: Sequence[Stream]) -> Ran:
        """Run every choice's stream, then write the end of the stream; return how they ended."""
        try:
            together = await self._together(
                lambda index, _: streams[index].run(keep_alive=index == 0), _ending_itself
            )
        except BaseException as exc:  # a second cancellation while the choices were stopped
            return [Ending.failed(exc)] * len(streams), exc
        if isinstance(together.failure, _Stopped):
            return together.endings, None  # an in-band error was the stream's last event
        if together.failure is None:
            try:
                await streams[0].response.write(self.choices.finish(_answers(streams)))
            except BaseException as exc:
                return together.endings, exc
        return together.endings, together.failure

    async def _end(
        self, streams: Sequence[Stream], cut: UpstreamError, endings: list[Ending]
    ) -> list[Ending]:
        """End the unfinished choices with ``cut``, as a single stream ends; return the endings.

        ``cut`` is shutdown's or saiproxy's own failure after the start. Each
        unfinished choice gets its ending (``message`` mode: the explanation
        and a truncated finish); an in-band error ends them all at once. With
        nothing sent yet, the cut is raised: a real status.
        """
        ended = list(endings)
        for index, stream in enumerate(streams):
            if stream.answer is None:
                ended[index] = ending = await stream.failed(cut, relayed=stream.relayed)
                if ending.stops_stream:
                    return ended
        await streams[0].response.write(self.choices.finish(_answers(streams)))
        return ended

    async def _together(
        self,
        work: Callable[[int, Exchange], Awaitable[_T]],
        ending_of: Callable[[_T], Ending],
    ) -> _Together[_T]:
        """Run ``work`` for every exchange concurrently (PROMPT_CONCURRENCY at most at once);
        return the results, in order, and each exchange's ending.

        The first failure, or an ending that stops the stream (raised as
        :class:`_Stopped`), cancels the others, whose ending is then
        ``cancelled`` with the status the response got. This task cancelled
        (the client went away, or shutdown's cut) cancels them all.
        """
        # At most PROMPT_CONCURRENCY of them call SAI at once: one small request
        # must not turn into as many concurrent SAI calls as it has prompts.
        slots = asyncio.Semaphore(self.exchanges[0].settings.prompt_concurrency)

        async def one(index: int, exchange: Exchange) -> _T:
            async with slots:
                result = await work(index, exchange)
            ending = ending_of(result)
            if ending.stops_stream:
                raise _Stopped(ending)
            return result

        loop = self.exchanges[0].loop
        tasks = [loop.create_task(one(i, e)) for i, e in enumerate(self.exchanges)]
        failure: BaseException | None = None
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failure = next(
                (t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()),
                None,
            )
        except asyncio.CancelledError as exc:
            failure = exc
        finally:
            # A failure, or the client gone (this task cancelled): so go the SAI calls.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        stopped_by = None
        if isinstance(failure, _Stopped):
            stopped_by = failure.ending
        elif failure is not None and not isinstance(failure, asyncio.CancelledError):
            stopped_by = Ending.failed(failure)
        endings = [_ending(task, ending_of, stopped_by) for task in tasks]
        results = [task.result() for task in tasks] if failure is None else []
        return _Together(results, endings, failure)


def _ending(
    task: asyncio.Task[_T], ending_of: Callable[[_T], Ending], stopped_by: Ending | None
) -> Ending:
    """Return how one choice's work ended: its result, its failure, or cancelled."""
    if task.cancelled():
        return Ending(stopped_by.status, "cancelled") if stopped_by is not None else CLIENT_GONE
    exc = task.exception()
    if exc is None:
        return ending_of(task.result())
    if isinstance(exc, _Stopped):
        return exc.ending
    return Ending.failed(exc)


def _answers(streams: Sequence[Stream]) -> list[Answer]:
    return [stream.answer for stream in streams if stream.answer is not None]


def _ending_itself(ending: Ending) -> Ending:
    return ending
