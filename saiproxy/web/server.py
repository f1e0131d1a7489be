"""Run the application: listen, and drain gracefully on SIGTERM (docs/operations.md)."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import resource
import signal
from typing import Any

from aiohttp import web

from .. import __version__
from ..base.keys import STATE, ServingState
from ..base.log import server_logger as log
from ..base.settings import Settings, SettingsError
from .app import AccessLogger, create_app, log_setup_for
from .malformed import ProxyRunner

__all__ = [
    "CUT_GRACE",
    "GC_MIDDLE_THRESHOLD",
    "GC_YOUNG_THRESHOLD",
    "ListenError",
    "check_open_relay",
    "drain",
    "is_loopback",
    "raise_open_file_limit",
    "runner_options",
    "serve",
    "tune_garbage_collector",
]


CUT_GRACE = 1.0  # seconds a cut answer gets to write its ending (at most a quarter of the budget)


class ListenError(Exception):
    """The listening socket could not be opened (port taken, address not available)."""


def runner_options(settings: Settings) -> dict[str, Any]:
    """Return the AppRunner options production uses (tests start their servers with them)."""
    return {
        "handler_cancellation": True,  # a client that hangs up cancels its upstream call
        "access_log_class": AccessLogger,
        "shutdown_timeout": settings.shutdown_timeout,
        # An idle keep-alive connection is closed after this (aiohttp's default is an hour).
        "keepalive_timeout": settings.keepalive_timeout,
        # No SO_KEEPALIVE on accepted connections (one system call each): the kernel's
        # first probe comes after two hours, long after the keep-alive timeout
        # above closes an idle connection or a stream's ping finds a dead client.
        "tcp_keepalive": False,
    }


def is_loopback(host: str) -> bool:
    """Return True when ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a wildcard ("0.0.0.0", "::", "") or a host name: assume reachable


def raise_open_file_limit() -> None:
    """Lift the soft open-file limit to the hard one: every stream holds two sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


GC_YOUNG_THRESHOLD = 50_000
GC_MIDDLE_THRESHOLD = 20


def tune_garbage_collector() -> None:
    """Collect cycles less often, and never walk the objects made at startup again.

    With the default thresholds (700 net allocations, then every 10th
    collection of the middle generation) the collector ran about 150 times a
    second under load and took about 6 % of the CPU; most of what a request
    allocates is freed by reference counting anyway. Every collection walks
    the objects still alive, and a burst of new streams keeps thousands of
    them alive for seconds: with 10,000 and 10 the collector still took 8 %
    of the CPU of a 5,000-stream burst, with 50,000 and 20 about 3 %, the
    peak RSS of 10,000 open streams unchanged (bench/RESULTS.md). Freezing
    moves the modules, app and settings into a generation no collection visits.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_MIDDLE_THRESHOLD, gc.get_threshold()[2])


def check_open_relay(settings: Settings) -> None:
    """Refuse to serve beyond loopback without PROXY_API_KEYS, unless ALLOW_OPEN_RELAY says so.

    Anyone who reaches such a port spends the shared SAI credentials: that
    must be a decision, not an empty secret.
    """
    if settings.proxy_api_keys or settings.allow_open_relay or is_loopback(settings.host):
        return
    raise SettingsError(
        "PROXY_API_KEYS",
        f"is empty while HOST={settings.host} listens beyond loopback: anyone who reaches "
        "the port would use the shared SAI credentials. Set PROXY_API_KEYS, listen on "
        "127.0.0.1, or set ALLOW_OPEN_RELAY=true to serve without keys on purpose",
    )


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT (or ``stop``), then drain and return."""
    check_open_relay(settings)
    raise_open_file_limit()
    app = create_app(settings, log_setup=log_setup_for(settings))
    # drain() gives answers their budget; what aiohttp waits for afterwards is
    # only the grace for answers already ending.
    options = runner_options(settings)
    options["shutdown_timeout"] = min(CUT_GRACE, settings.shutdown_timeout / 4)
    runner = ProxyRunner(app, **options)
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
    _log_listening(settings)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state = app[STATE]
    try:
        await stop.wait()
        # Readiness turns 503 at once while we keep serving, so load balancers
        # notice and stop routing here before the listener goes away.
        state.ready = False
        log.info(
            "shutdown: readiness is now 503",
            extra={"delay_s": settings.shutdown_delay, "open_streams": state.open_streams},
        )
        await asyncio.sleep(settings.shutdown_delay)
        log.info(
            "shutdown: closing the listener, draining in-flight requests",
            extra={"timeout_s": settings.shutdown_timeout, "in_flight": state.in_flight},
        )
        await drain(runner, state, settings.shutdown_timeout)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # Everything has finished or been cut by now: this closes the idle
        # connections and the application within a short grace.
        await runner.cleanup()


def _log_listening(settings: Settings) -> None:
    """Say where the proxy listens and what it serves; warn when it is an open relay."""
    log.info(
        "saiproxy listening",
        extra={
            "version": __version__,
            "host": settings.host,
            "port": settings.port,
            "upstream": settings.loggable_sai_url,
            "models": list(settings.models),
            "error_mode": settings.error_mode,
        },
    )
    if not settings.proxy_api_keys and not is_loopback(settings.host):
        log.warning(
            "listening beyond loopback without PROXY_API_KEYS (ALLOW_OPEN_RELAY=true): "
            "anyone who can reach this port uses the shared SAI credentials",
            extra={"host": settings.host, "port": settings.port},
        )


async def drain(runner: web.BaseRunner, state: ServingState, budget: float) -> None:
    """Stop listening, let answers finish within ``budget`` seconds, then cut what is left.

    aiohttp's own drain waits its timeout twice (once for handlers, once more
    after cancelling them) and cancels a stream mid-frame; here the answers get
    the budget, and one that outlives it ends properly (an explanation or an
    error frame, then its terminator) within a short grace.
    """
    for site in list(runner.sites):
        await site.stop()  # closes the listener; connections stay
    grace = min(CUT_GRACE, budget / 4)
    if state.answering:
        await asyncio.wait(set(state.answering), timeout=budget - grace)
    if state.answering:
        log.warning("shutdown: budget spent, cutting answers short", extra={"cut": state.cut()})
        await asyncio.wait(set(state.answering), timeout=grace)
