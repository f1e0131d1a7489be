"""In-flight accounting: what shutdown waits for, counts and may cut short.

Answers being given are counted (``in_flight``, ``open_streams``: the
metrics' gauges, shutdown's log lines) and their tasks registered, so that a
shutdown whose budget ran out can cancel them (:meth:`ServingState.cut`);
:func:`cut_short` tells that cancellation from a client hanging up.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..base.errors import ShutdownCut
from ..base.keys import SETTINGS, STATE
from ..base.log import exchange_logger as log
from .sse import KEEP_ALIVE, EventStream

__all__ = ["InFlight", "OpenStream", "cut_short"]

# The exchange's log lines keep its logger name, whichever module writes them.


class InFlight:
    """A request being answered: counted in flight, its task known to shutdown."""

    __slots__ = ("_state", "_task")

    def __init__(self, request: web.Request, loop: asyncio.AbstractEventLoop) -> None:
        self._state = request.app[STATE]
        self._task = asyncio.current_task(loop)

    def __enter__(self) -> None:
        self._state.in_flight += 1
        if self._task is not None:
            self._state.answering.add(self._task)

    def __exit__(self, *exc_info: object) -> None:
        self._state.in_flight -= 1
        if self._task is not None:
            self._state.answering.discard(self._task)


class OpenStream:
    """A streamed response being written: counted open, no longer kept alive once it ends."""

    __slots__ = ("_app", "_response", "_state")

    def __init__(self, request: web.Request, response: EventStream) -> None:
        self._app = request.app
        self._state = request.app[STATE]
        self._response = response

    def __enter__(self) -> None:
        self._state.open_streams += 1

    def __exit__(self, *exc_info: object) -> None:
        self._state.open_streams -= 1
        self._app[KEEP_ALIVE].discard(self._response)


def cut_short(request: web.Request, loop: asyncio.AbstractEventLoop) -> ShutdownCut:
    """Take back shutdown's cancellation of the current task and return the error it means.

    Called where a task answering ``request`` caught a cancellation. One from
    anywhere else (the client hung up) propagates: CancelledError is raised again.
    """
    task = asyncio.current_task(loop)
    if not request.app[STATE].cutting or task is None:
        raise asyncio.CancelledError
    task.uncancel()
    log.warning(
        "answer cut by shutdown", extra={"timeout_s": request.app[SETTINGS].shutdown_timeout}
    )
    return ShutdownCut()
