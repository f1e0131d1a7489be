"""Run the application: listen, and drain gracefully on SIGTERM (§7)."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
from typing import Any

from aiohttp import web

from . import __version__
from .app import AccessLogger, create_app, log_setup_for
from .keys import STATE
from .settings import Settings

log = logging.getLogger(__name__)


class ListenError(Exception):
    """The listening socket could not be opened (port taken, address not available)."""


def runner_options(settings: Settings) -> dict[str, Any]:
    """Return the AppRunner options production uses (tests start their servers with them)."""
    return {
        "handler_cancellation": True,  # a client that hangs up cancels its upstream call
        "access_log_class": AccessLogger,
        "shutdown_timeout": settings.shutdown_timeout,
    }


def raise_open_file_limit() -> None:
    """Lift the soft open-file limit to the hard one: every stream holds two sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Collect cycles less often, and never walk the objects made at startup again.

    With the default threshold (700 net allocations) the collector ran about
    150 times a second under load and took about 6 % of the CPU; most of what
    a request allocates is freed by reference counting anyway. Freezing moves
    the modules, app and settings into a generation no collection visits.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT (or ``stop``), then drain and return."""
    raise_open_file_limit()
    app = create_app(settings, log_setup=log_setup_for(settings))
    runner = web.AppRunner(app, **runner_options(settings))
    await runner.setup()
    # A burst of new clients (1,000 at once is normal here) must not overflow the
    # accept queue: a dropped SYN costs the client a one-second retransmit.
    site = web.TCPSite(
        runner, settings.host, settings.port, reuse_port=settings.workers > 1, backlog=4096
    )
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise ListenError(
            f"cannot listen on {settings.host}:{settings.port}: {error.strerror}"
        ) from None
    tune_garbage_collector()
    log.info(
        "saiproxy listening",
        extra={
            "version": __version__,
            "host": settings.host,
            "port": settings.port,
            "upstream": str(settings.sai_url),
            "models": list(settings.models),
            "error_mode": settings.error_mode,
        },
    )

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        # Readiness turns 503 at once while we keep serving, so load balancers
        # notice and stop routing here before the listener goes away.
        app[STATE].ready = False
        log.info(
            "shutdown: readiness is now 503",
            extra={
                "delay_s": settings.shutdown_delay,
                "open_streams": app[STATE].open_streams,
            },
        )
        await asyncio.sleep(settings.shutdown_delay)
        log.info(
            "shutdown: closing the listener, draining in-flight requests",
            extra={"timeout_s": settings.shutdown_timeout},
        )
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # Closes the listener and idle keep-alive connections, waits up to
        # shutdown_timeout for in-flight requests and streams, then cleans up.
        await runner.cleanup()
