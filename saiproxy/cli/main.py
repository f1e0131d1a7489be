"""Command line: ``saiproxy [--demo]`` serves; ``saiproxy trace <id> [FILES...]`` reads logs;
``saiproxy check [--json]`` probes SAI with the system credentials before a rollout;
``saiproxy usage [--json]`` prints each client's use per day (docs/limits.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

from .. import __version__
from ..base.settings import SettingsError, load_settings, setting
from ..upstream.demo import DEMO_COOKIE, DEMO_KEY, DEMO_TEMPLATE, start_demo_upstream
from ..web import workers
from ..web.server import ListenError, check_open_relay, serve
from . import check, trace, usage

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saiproxy",
        description="OpenAI-compatible reverse proxy in front of SAI. "
        "'saiproxy trace <request-id> [LOG FILES...]' prints one request's timeline; "
        "'saiproxy check [--json]' validates the configuration and probes SAI with each "
        "system credential; 'saiproxy usage [--json]' prints each client's use per day.",
    )
    parser.add_argument("--version", action="version", version=f"saiproxy {__version__}")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="start an embedded fake SAI on loopback and point the proxy at it",
    )
    return parser


async def _run(demo: bool) -> int:
    env = dict(os.environ)
    demo_sai = None
    if demo:
        demo_sai, url = await start_demo_upstream()
        env.update(
            SAI_URL=url, SAI_KEY=DEMO_KEY, SAI_COOKIE=DEMO_COOKIE, SAI_TEMPLATE_ID=DEMO_TEMPLATE
        )
        print(
            f"saiproxy demo: fake SAI at {url}; a message starting with demo:429, "
            "demo:timeout, demo:tool ... scripts an outcome (docs/demo.md)",
            file=sys.stderr,
        )
    try:
        settings = load_settings(env)
        check_open_relay(settings)  # before any worker starts
        if settings.workers > 1 and not workers.is_worker():
            # Workers get the settings' sources, demo upstream included.
            return await workers.supervise(settings.workers, env)
        await serve(settings)
        return 0
    finally:
        if demo_sai is not None:
            await demo_sai.stop()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return uvloop's loop factory when installed (EVENT_LOOP=auto|uvloop), else None."""
    # Read alone: the loop runs before the settings load (the demo upstream
    # they may point at starts on it).
    choice = setting("event_loop")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SettingsError("EVENT_LOOP", "uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: list[str] | None = None) -> int:
    """Load the settings and run the proxy; exit 2 on a configuration error."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["trace"]:
        return trace.main(argv[1:])
    if argv[:1] == ["check"]:
        return check.main(argv[1:])
    if argv[:1] == ["usage"]:
        return usage.main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_run(args.demo))
    except SettingsError as error:
        print(f"saiproxy: configuration error: {error}", file=sys.stderr)
        return 2
    except ListenError as error:
        print(f"saiproxy: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
