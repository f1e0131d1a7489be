"""``WORKERS`` > 1: several processes serve one port, each its own event loop.

Every worker binds the port with SO_REUSEPORT, so the kernel spreads new
connections across them. This process only supervises: it forwards SIGTERM
and SIGINT so each worker drains on its own, and exits 0 when all did.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from typing import Final

__all__ = ["WORKER_ENV", "is_worker", "supervise"]

WORKER_ENV: Final = "SAIPROXY_WORKER"


def is_worker() -> bool:
    """Return True in a process started by the supervisor."""
    return os.environ.get(WORKER_ENV) == "1"


async def supervise(count: int, env: Mapping[str, str]) -> int:
    """Run ``count`` workers until they stop; return the exit status."""
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "saiproxy", env={**env, WORKER_ENV: "1"}
        )
        for _ in range(count)
    ]
    pids = ", ".join(str(child.pid) for child in children)
    print(f"saiproxy: supervising {count} workers (pids {pids})", file=sys.stderr, flush=True)
    stopping = False

    def forward(sig: signal.Signals) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.returncode is None:
                child.send_signal(sig)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, forward, sig)

    waits = {asyncio.ensure_future(child.wait()): child for child in children}
    pending = set(waits)
    failed = False
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.result() != 0 or not stopping:
                # A worker that dies on its own takes the group down, so the
                # container's restart policy brings back a whole, healthy set.
                failed = True
                print(
                    f"saiproxy: worker {waits[task].pid} exited with {task.result()}",
                    file=sys.stderr,
                    flush=True,
                )
                forward(signal.SIGTERM)
    return 1 if failed else 0
