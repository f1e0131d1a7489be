"""The typed keys of the base layer's state on the application and on requests.

A key lives in the module of its type's layer, as aiohttp's do: the SAI
client's in upstream/sai.py, the limits' in limits/, the keep-alive's in
core/sse.py. This module names only what the base layer defines.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from .metrics import Metrics
from .settings import Settings

__all__ = [
    "METRICS",
    "OUTCOME",
    "REQUEST_ID",
    "SETTINGS",
    "STATE",
    "STREAM",
    "ServingState",
]


@dataclass(slots=True)
class ServingState:
    """What the process is doing: serving, or draining for shutdown."""

    ready: bool = True
    in_flight: int = 0  # completions being answered
    open_streams: int = 0
    # The tasks answering completions, so shutdown can cut what outlives its budget.
    answering: set[asyncio.Task[object]] = field(default_factory=set)
    cutting: bool = False
    large_bodies: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))

    def cut(self) -> int:
        """Cut every answer still in progress short (shutdown's budget ran out); return how many."""
        self.cutting = True
        for task in self.answering:
            task.cancel()
        return len(self.answering)


SETTINGS = web.AppKey("settings", Settings)
STATE = web.AppKey("state", ServingState)
METRICS = web.AppKey("metrics", Metrics)
REQUEST_ID = web.RequestKey("request_id", str)
# The event stream a request has started, once it has (core/sse.py sets it; see
# middlewares.failure_response).
STREAM = web.RequestKey("stream", web.StreamResponse)
OUTCOME = web.RequestKey("outcome", str)
