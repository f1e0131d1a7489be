"""The in-process limits' CPU per request: admission, the headers, settlement.

    python -m bench.limits_cpu [--requests 20000]

What ``core/exchange.py`` asks of ``limits/gate.py`` per client request, in
the process (no store): ``gate.admit`` (the client's identity, the
admission, its headers), ``add_limit_headers`` on the response, then
``gate.settle``. Every limit of bench/limits.py is set, high enough that
nothing is refused, so each request checks and takes every window, lease and
budget. One request at a time, on one event loop; the CPU time of the loop
(``time.process_time``) divided by the requests. Target: at most 20 us.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Final

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from bench.limits import LIMITS
from saiproxy.base.metrics import Metrics
from saiproxy.base.settings import Secret, load_settings
from saiproxy.limits import gate
from saiproxy.limits.limits import LIMITS as LIMITS_KEY
from saiproxy.limits.limits import Limits
from saiproxy.upstream.auth import Credential

__all__ = ["TARGET_US", "cpu_per_request", "main"]

TARGET_US: Final = 20.0


async def cpu_per_request(requests: int) -> float:
    """Return the CPU microseconds one admission, its headers and its settlement take."""
    env = {
        "SAI_URL": "http://127.0.0.1:9",
        "SAI_KEY": "bench-key",
        "SAI_TEMPLATE_ID": "bench",
        **LIMITS,
    }
    settings = load_settings(env)
    app = web.Application()
    limits = Limits(settings, Metrics())
    app[LIMITS_KEY] = limits
    credential = Credential("key", "SAI_KEY", Secret("bench-key"), user=False)

    # One mocked request, emptied between uses: making one costs far more than the limits.
    request = make_mocked_request("POST", "/v1/chat/completions", app=app)
    response = web.StreamResponse()

    async def one() -> None:
        for key in list(request):
            del request[key]
        await gate.admit(request, credential, 40, [None])
        await gate.add_limit_headers(request, response)
        gate.settle(request, 12, 50, False)

    for _ in range(1000):  # warm up
        await one()
    started = time.process_time()
    for _ in range(requests):
        await one()
    spent = time.process_time() - started
    return spent / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    rounds = [asyncio.run(cpu_per_request(args.requests)) for _ in range(3)]
    best = min(rounds)
    print(
        f"in-process limits, admission + headers + settlement: {best:.1f} us CPU per request "
        f"(best of 3 rounds: {', '.join(f'{r:.1f}' for r in rounds)}; target <= {TARGET_US:g} us;"
        f" load average {os.getloadavg()[0]:.2f})"
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
