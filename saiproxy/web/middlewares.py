"""Middlewares: request IDs, proxy access keys, and one way to render every error."""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Collection
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from ..base.errors import BodyTimeout, ClientError, ProxyAccessDenied, ProxyError
from ..base.keys import OUTCOME, REQUEST_ID, STREAM
from ..base.log import middlewares_logger as log
from ..base.metrics import Metrics
from ..base.settings import Secret
from ..core.render import ERROR_SHAPES
from ..limits.identity import KeyRing, presented_keys
from ..logs import request_id_var

__all__ = [
    "OPEN_PATHS",
    "REQUEST_ID_HEADER",
    "add_request_id_header",
    "count_request",
    "failure_response",
    "front_middleware",
    "new_request_id",
    "proxy_access_middleware",
    "request_id_for",
]


REQUEST_ID_HEADER: Final = "X-Request-ID"
_VALID_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
OPEN_PATHS: Final = frozenset({"/health", "/health/readiness", "/metrics", "/", "/openapi.json"})


def new_request_id() -> str:
    """Return a fresh request ID: 8 lowercase hex characters.

    IDs label log lines; they are not secrets, so no system entropy is drawn per request.
    """
    return f"{random.getrandbits(32):08x}"


def request_id_for(request: web.Request) -> str:
    """Give the request its ID: the client's if valid, else a new one."""
    incoming = request.headers.get(REQUEST_ID_HEADER)
    if incoming is not None and _VALID_REQUEST_ID.fullmatch(incoming):
        request_id = incoming
    else:
        request_id = new_request_id()
    request[REQUEST_ID] = request_id
    return request_id


async def add_request_id_header(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Return the request ID on every response, streams and errors included."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


class _HttpClientError(ClientError):
    """An HTTP-level client error raised by aiohttp (404, 405, ...)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _render(request: web.Request, error: ProxyError) -> web.Response:
    """Render ``error`` in the shape of the protocol the path belongs to."""
    shapes, default = request.app[ERROR_SHAPES]
    for prefix, shape in shapes:
        if request.path.startswith(prefix):
            return shape.response(error)
    return default.response(error)


async def failure_response(request: web.Request, failure: Exception) -> web.StreamResponse:
    """Render a failure as an error object of the path's protocol: every error a handler
    raises becomes HTTP here (the other two places are ``malformed.py``, for requests aiohttp
    cannot parse, and ``views.model``; docs/architecture.md). aiohttp's redirects (below
    400) are raised again.

    A request whose event stream has started already has its response: a
    second one would land inside its body. The failure is logged and that
    stream ends there (the exchange reports failures in-band before this).
    """
    started: web.StreamResponse | None = request.get(STREAM)
    if started is not None and started.prepared:
        log.error("the request failed after its stream started", exc_info=failure)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await started.write_eof()
        return started
    if isinstance(failure, ProxyError):
        if failure.status >= 500:
            log.error("request failed", extra={"status": failure.status, "code": failure.code})
        response = _render(request, failure)
        if isinstance(failure, BodyTimeout):
            # Answer and hang up at once: aiohttp would otherwise linger,
            # waiting for the rest of a body that is not coming.
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
        return response
    if isinstance(failure, web.HTTPException):
        if failure.status < 400:
            raise failure
        if failure.status == 404:
            error = _HttpClientError(
                404, "not_found", f"Unknown endpoint: {request.method} {request.path}"
            )
        elif failure.status == 405:
            error = _HttpClientError(
                405,
                "method_not_allowed",
                f"Method {request.method} is not allowed on {request.path}",
            )
        else:
            error = _HttpClientError(failure.status, "http_error", failure.reason)
        response = _render(request, error)
        if hdrs.ALLOW in failure.headers:
            response.headers[hdrs.ALLOW] = failure.headers[hdrs.ALLOW]
        return response
    log.error("unexpected error while serving the request", exc_info=failure)
    internal = ProxyError("Internal error in saiproxy; the request ID finds it in the logs")
    return _render(request, internal)


def count_request(metrics: Metrics, request: web.Request, status: int) -> None:
    """Count the request by route, final status and outcome."""
    route = request.match_info.route.resource
    # Unknown paths share one label so a scanner cannot grow the series.
    path = route.canonical if route is not None else "other"
    default = "ok" if status < 400 else "error"
    outcome = request.get(OUTCOME, default)
    metrics.child(metrics.requests, path, str(status), outcome).inc()


def front_middleware(*, metrics: Metrics) -> Middleware:
    """Tag the request with its ID, render whatever fails, count the outcome.

    Every request needs all three, in this order: the ID wraps everything, so
    every log line and response (errors included) carries it; the metrics see
    the status as rendered. They share one middleware because a middleware's
    frame lives as long as its request: ten thousand open streams held
    thirty thousand frames for three.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = request_id_var.set(request_id_for(request))
        status = 499  # the client went away before an answer
        try:
            try:
                response = await handler(request)
            except Exception as failure:
                response = await failure_response(request, failure)
            status = response.status
            return response
        finally:
            count_request(metrics, request, status)
            request_id_var.reset(token)

    return middleware


def proxy_access_middleware(
    *,
    keys: Collection[Secret],
    admin_keys: Collection[Secret] = (),
    admin_paths: Collection[str] = (),
) -> Middleware:
    """Require one of ``keys`` on every path but health checks; on ``admin_paths`` one of
    ``admin_keys`` will do too (the handler decides what each may see).

    The key comes as ``Authorization: Bearer <key>`` (OpenAI clients, Claude
    Code's ANTHROPIC_AUTH_TOKEN) or as ``x-api-key: <key>`` (Anthropic clients).
    """
    proxy_keys = [key.reveal().encode() for key in keys]
    allowed = KeyRing(proxy_keys)
    allowed_on_admin_paths = KeyRing(proxy_keys + [key.reveal().encode() for key in admin_keys])
    admin = frozenset(admin_paths)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        presented = presented_keys(request)
        if not (allowed_on_admin_paths if request.path in admin else allowed).matches(presented):
            log.info(
                "proxy access refused",
                extra={"reason": "unknown key" if any(presented) else "no proxy key"},
            )
            raise ProxyAccessDenied(
                "Invalid or missing proxy API key: send Authorization: Bearer <key> "
                "or x-api-key: <key>"
            )
        return await handler(request)

    return middleware
