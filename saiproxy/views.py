"""Handlers that speak no completion protocol: health, readiness, metrics, models."""

from __future__ import annotations

import os
import time
from typing import Any

from aiohttp import web

from . import __version__
from .core.exchange import json_response
from .keys import METRICS, SETTINGS, STATE
from .metrics import metrics_response


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers; no upstream call."""
    return json_response({"status": "ok", "version": __version__, "pid": os.getpid()})


async def readiness(request: web.Request) -> web.Response:
    """Readiness: 200 while serving, 503 once shutdown has begun."""
    if request.app[STATE].ready:
        return json_response({"status": "ready"})
    return json_response({"status": "shutting down"}, status=503)


async def prometheus(request: web.Request) -> web.Response:
    """Prometheus metrics of this process."""
    return metrics_response(request.app[METRICS])


def model_object(name: str, created: int) -> dict[str, Any]:
    """Return one OpenAI model object."""
    return {"id": name, "object": "model", "created": created, "owned_by": "sai"}


async def models(request: web.Request) -> web.Response:
    """List the configured models in OpenAI's shape."""
    created = int(time.time())
    names = request.app[SETTINGS].models
    return json_response({"object": "list", "data": [model_object(n, created) for n in names]})
