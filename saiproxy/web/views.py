"""Handlers that speak no completion protocol: health, readiness, metrics, models."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from .. import __version__
from ..base.errors import ModelNotFound
from ..base.keys import METRICS, SETTINGS, STATE
from ..base.metrics import metrics_response
from ..core.bodies import json_response
from ..protocols.anthropic import AnthropicErrors

__all__ = [
    "ANTHROPIC_VERSION",
    "health",
    "model",
    "model_object",
    "models",
    "prometheus",
    "readiness",
]


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
    return metrics_response(request.app[METRICS], request.headers.get("Accept", ""))


def model_object(name: str, created: int) -> dict[str, Any]:
    """Return one OpenAI model object."""
    return {"id": name, "object": "model", "created": created, "owned_by": "sai"}


async def models(request: web.Request) -> web.Response:
    """List the configured models in OpenAI's shape."""
    created = int(time.time())
    names = request.app[SETTINGS].models
    return json_response({"object": "list", "data": [model_object(n, created) for n in names]})


ANTHROPIC_VERSION: Final = "anthropic-version"


async def model(request: web.Request) -> web.Response:
    """Return one configured model, in Anthropic's shape when the caller speaks Anthropic's API.

    Only configured names are found here, although completion requests map
    unknown names to the default model: a client looking a model up wants to
    know whether it exists.
    """
    name = request.match_info["model"]
    anthropic = ANTHROPIC_VERSION in request.headers
    if name not in request.app[SETTINGS].models:
        error = ModelNotFound(name)
        if anthropic:  # the same path serves both protocols: the header chooses the shape
            return AnthropicErrors().response(error)
        raise error
    created = int(time.time())
    if anthropic:
        created_at = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json_response(
            {"type": "model", "id": name, "display_name": name, "created_at": created_at}
        )
    return json_response(model_object(name, created))
