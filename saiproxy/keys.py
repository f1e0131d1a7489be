"""Every typed key for state kept on the application and on requests."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .auth import AuthChain
from .core.render import ErrorShape
from .metrics import Metrics
from .sai import SaiClient
from .settings import Settings


@dataclass(slots=True)
class ServingState:
    """What the process is doing: serving, or draining for shutdown."""

    ready: bool = True
    in_flight: int = 0  # chat completions being answered
    open_streams: int = 0


SETTINGS = web.AppKey("settings", Settings)
AUTH_CHAIN = web.AppKey("auth_chain", AuthChain)
SAI = web.AppKey("sai", SaiClient)
STATE = web.AppKey("state", ServingState)
METRICS = web.AppKey("metrics", Metrics)
# Error shapes by path prefix, and the default: ((prefix, shape), ...), default.
ERROR_SHAPES = web.AppKey("error_shapes", tuple[tuple[tuple[str, ErrorShape], ...], ErrorShape])
REQUEST_ID = web.RequestKey("request_id", str)
OUTCOME = web.RequestKey("outcome", str)
