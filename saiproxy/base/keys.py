"""Every typed key for state kept on the application and on requests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from ..upstream.auth import AuthChain
from ..upstream.sai import CallBudget, SaiClient
from .metrics import Metrics
from .settings import Settings

if TYPE_CHECKING:
    # The core imports this module; this one names the core's types for the
    # type checker only, so at run time no import runs back up into core/.
    from ..core.render import ErrorShape
    from ..core.schemacheck import SchemaChecker
    from ..core.sse import KeepAlive
    from ..limits.identity import Identify
    from ..limits.limits import Limits
    from ..state.store import State
    from ..tracing.hooks import Tracing

__all__ = [
    "AUTH_CHAIN",
    "CALL_BUDGET",
    "ERROR_SHAPES",
    "KEEP_ALIVE",
    "LIMITS",
    "METRICS",
    "OUTCOME",
    "OWNERS",
    "REQUEST_ID",
    "SAI",
    "SCHEMA_CHECKER",
    "SETTINGS",
    "STATE",
    "STATE_STORE",
    "STREAM",
    "TRACING",
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
AUTH_CHAIN = web.AppKey("auth_chain", AuthChain)
SAI = web.AppKey("sai", SaiClient)
STATE = web.AppKey("state", ServingState)
KEEP_ALIVE: web.AppKey[KeepAlive] = web.AppKey("keep_alive")
METRICS = web.AppKey("metrics", Metrics)
LIMITS: web.AppKey[Limits] = web.AppKey("limits")  # absent when no limit is configured
SCHEMA_CHECKER: web.AppKey[SchemaChecker] = web.AppKey("schema_checker")
TRACING: web.AppKey[Tracing] = web.AppKey("tracing")  # absent when tracing is off
# Error shapes by path prefix, and the default: ((prefix, shape), ...), default.
ERROR_SHAPES: web.AppKey[tuple[tuple[tuple[str, ErrorShape], ...], ErrorShape]] = web.AppKey(
    "error_shapes"
)
REQUEST_ID = web.RequestKey("request_id", str)
# The event stream a request has started, once it has (core/sse.py sets it; see
# middlewares.failure_response).
STREAM = web.RequestKey("stream", web.StreamResponse)
OUTCOME = web.RequestKey("outcome", str)
# The SAI calls a request may still make beyond one per prompt (REQUEST_EXTRA_CALLS).
CALL_BUDGET = web.RequestKey("call_budget", CallBudget)
# Stored Responses and conversations (saiproxy/state/), and who owns them.
STATE_STORE: web.AppKey[State] = web.AppKey("state_store")
OWNERS: web.AppKey[Identify] = web.AppKey("owners")
