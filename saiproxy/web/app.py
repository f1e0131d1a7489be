"""The application: middlewares, routes and long-lived objects, from settings alone."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Middleware

from ..base.keys import METRICS, OUTCOME, REQUEST_ID, SETTINGS, STATE, ServingState
from ..base.metrics import Metrics
from ..base.settings import Settings
from ..core.answer import SCHEMA_CHECKER
from ..core.bodies import MEMORY_TRIM, MemoryTrim
from ..core.render import ERROR_SHAPES
from ..core.schemacheck import SchemaChecker
from ..core.sse import KEEP_ALIVE, KeepAlive
from ..core.toolcache import TOOL_CACHES, ToolCaches
from ..limits.gate import ANTHROPIC_PREFIXES, add_limit_headers
from ..limits.limits import LIMITS, Limits, enabled
from ..limits.usage import USAGE_PATH
from ..logs import LogSetup, write_failures
from ..protocols import anthropic, conversations
from ..protocols.chat import chat_completions
from ..protocols.completions import completions
from ..protocols.openai import OpenAIErrors
from ..protocols.responses import background, compaction, input_tokens, responses, stored
from ..state import state_ctx
from ..tracing.hooks import TRACING, Tracing
from ..upstream.auth import AUTH_CHAIN, AuthChain
from ..upstream.sai import SAI, SaiClient, client_timeout
from .landing import landing
from .middlewares import (
    add_request_id_header,
    front_middleware,
    proxy_access_middleware,
)
from .openapi import openapi
from .usage import usage_view
from .views import health, model, models, prometheus, readiness

__all__ = ["AccessLogger", "create_app", "log_setup_for"]


class AccessLogger(AbstractAccessLogger):
    """One line per HTTP request, tagged with its request ID like every other line."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if OUTCOME in request:
            return  # a chat completion: its "response finished" line says all this and more
        request_id = request.get(REQUEST_ID)
        self.logger.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status,
            extra={
                "request_id": request_id,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000, 1),
                "remote": request.remote,
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _logging_ctx(
    log_setup: LogSetup,
) -> Callable[[web.Application], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        log_setup.start()
        yield
        log_setup.stop()

    return ctx


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """One pooled upstream session for the whole process, closed on shutdown."""
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(
        limit=settings.upstream_connections, limit_per_host=0, keepalive_timeout=30
    )
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=client_timeout(settings),
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        app[SAI] = SaiClient(
            session, settings, app[AUTH_CHAIN], app[METRICS], tracing=app.get(TRACING)
        )
        yield


def _limits_ctx(limits: Limits) -> Callable[[web.Application], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await limits.start()
        yield
        await limits.close()  # after the drain: this replica's leases end at once

    return ctx


async def _schema_ctx(app: web.Application) -> AsyncIterator[None]:
    """The process's schema checker; its child process (started on first use) stops with it."""
    app[SCHEMA_CHECKER] = checker = SchemaChecker(app[SETTINGS].schema_check_timeout)
    try:
        yield
    finally:
        await checker.close()


def create_app(
    settings: Settings, *, log_setup: LogSetup | None = None, span_exporter: Any = None
) -> web.Application:
    """Build the saiproxy application; reads nothing but ``settings``.

    ``span_exporter`` replaces the exporter the OTEL_* variables name (tests, benchmarks).
    """
    metrics = Metrics()
    tracing = _tracing(settings, span_exporter)
    app = web.Application(
        middlewares=_middlewares(settings, metrics, tracing),
        client_max_size=settings.max_body_bytes,
    )
    _objects(app, settings, metrics)
    _lifetimes(app, settings, log_setup, tracing)
    _routes(app)
    return app


def _tracing(settings: Settings, span_exporter: Any) -> Tracing | None:
    """Return the tracing hooks when OTEL_* turns tracing on, else None."""
    if settings.tracing is None:
        return None
    return Tracing(
        settings.tracing,
        secrets=[secret.reveal() for secret in settings.secrets()],
        exporter=span_exporter,
    )


def _middlewares(settings: Settings, metrics: Metrics, tracing: Tracing | None) -> list[Middleware]:
    """Return the middlewares, outermost first.

    The front middleware gives every request its ID (so every log line and
    response carries it), renders whatever fails inside it (access refused,
    bad body, 404, 405, SAI's outcomes in http mode) one way, and counts the
    status as rendered. Access control runs before anything reads the body
    (handlers read it under BODY_READ_TIMEOUT).
    """
    middlewares: list[Middleware] = [front_middleware(metrics=metrics)]
    if tracing is not None:
        # Outside the front middleware: the server span covers the rendered error
        # and the request ID, and every log line inside carries its trace ID.
        middlewares.insert(0, tracing.middleware())
    if settings.proxy_api_keys:
        middlewares.append(
            proxy_access_middleware(
                keys=settings.proxy_api_keys,
                # The admin keys read usage, and nothing else, without being proxy keys.
                admin_keys=settings.admin_api_keys,
                admin_paths=(USAGE_PATH,),
            )
        )
    return middlewares


def _objects(app: web.Application, settings: Settings, metrics: Metrics) -> None:
    """Give the app its settings, serving state, metrics, auth chain, memory trim, task set."""
    app[SETTINGS] = settings
    app[STATE] = state = ServingState()
    app[METRICS] = metrics
    app[MEMORY_TRIM] = MemoryTrim()
    app[background.RUNNING] = background.Running()
    # Gauges read the serving state when scraped: no lock taken per request.
    metrics.open_streams.set_function(lambda: state.open_streams)
    metrics.in_flight.set_function(lambda: state.in_flight)
    metrics.log_write_failures.set_function(write_failures)
    app[AUTH_CHAIN] = AuthChain.from_settings(settings)
    app.on_response_prepare.append(add_request_id_header)


def _lifetimes(
    app: web.Application, settings: Settings, log_setup: LogSetup | None, tracing: Tracing | None
) -> None:
    """Add the long-lived objects, each born and closed in a cleanup context, in order."""
    if log_setup is not None:
        app.cleanup_ctx.append(_logging_ctx(log_setup))
    if tracing is not None:
        # Each process's own provider, made when its app starts (after a fork)
        # and flushed after the drain; before the upstream session that uses it.
        app[TRACING] = tracing
        app.cleanup_ctx.append(tracing.running)
        app[METRICS].trace_spans_dropped.set_function(tracing.dropped)
    app.cleanup_ctx.append(_upstream_ctx)
    if enabled(settings):
        app[LIMITS] = limits = Limits(settings, app[METRICS])
        app.cleanup_ctx.append(_limits_ctx(limits))
        app.on_response_prepare.append(add_limit_headers)
    app.cleanup_ctx.append(_schema_ctx)
    app.cleanup_ctx.append(state_ctx)  # stored Responses and conversations
    app[KEEP_ALIVE] = keep_alive = KeepAlive(settings.ping_interval)
    app[TOOL_CACHES] = ToolCaches()  # parsed tools and their instructions
    app.cleanup_ctx.append(lambda _: keep_alive.running())


def _routes(app: web.Application) -> None:
    """Add every route, and the error shape of the paths under each protocol's."""
    app.router.add_get("/health", health)
    app.router.add_get("/health/readiness", readiness)
    app.router.add_get("/metrics", prometheus)
    # For people and API tools: open even with PROXY_API_KEYS (see OPEN_PATHS).
    app.router.add_get("/", landing)
    app.router.add_get("/openapi.json", openapi)
    # Usage: an admin key reads every client's, a proxy key its own (docs/limits.md).
    app.router.add_get(USAGE_PATH, usage_view)
    # Each protocol's routes, and the error shape of the paths under them
    # (first matching prefix wins; OpenAI's shape everywhere else).
    anthropic_errors = anthropic.AnthropicErrors()
    app[ERROR_SHAPES] = (
        tuple((prefix, anthropic_errors) for prefix in ANTHROPIC_PREFIXES),
        OpenAIErrors(),
    )
    for prefix in ("", "/v1"):
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/completions", completions)
        app.router.add_post(f"{prefix}/responses", responses)
        app.router.add_post(f"{prefix}/responses/input_tokens", input_tokens)
        app.router.add_post(f"{prefix}/responses/compact", compaction.compact)
        app.router.add_get(f"{prefix}/responses/{{response_id}}", stored.get_response)
        app.router.add_delete(f"{prefix}/responses/{{response_id}}", stored.delete_response)
        app.router.add_get(f"{prefix}/responses/{{response_id}}/input_items", stored.input_items)
        app.router.add_post(f"{prefix}/responses/{{response_id}}/cancel", background.cancel)
        conversations.add_routes(app.router, prefix)
        app.router.add_get(f"{prefix}/models", models)
        # Model IDs may contain "/" (``org/model``).
        app.router.add_get(f"{prefix}/models/{{model:.+}}", model)
        app.router.add_post(f"{prefix}/messages", anthropic.messages)
        app.router.add_post(f"{prefix}/messages/count_tokens", anthropic.count_tokens)


def log_setup_for(settings: Settings) -> LogSetup:
    """Return the process's logging, as the settings describe it."""
    return LogSetup(
        fmt=settings.log_format,
        level=logging.DEBUG
        if settings.verbose_logging
        else logging.getLevelNamesMapping()[settings.log_level.upper()],
        log_dir=(settings.log_dir or None) if settings.log_file else None,
        max_bytes=settings.log_max_bytes,
        backups=settings.log_backups,
        secrets=[secret.reveal() for secret in settings.secrets()],
    )
