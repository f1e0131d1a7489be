"""Anthropic Messages streaming against Chat Completions streaming, through one saiproxy.

    python -m bench.messages            # c=64, 5 s a run, 5 rounds each side
    python -m bench.messages --smoke    # a few seconds: checks the bench still works

One fake SAI (bench/fake_sai.py: 200 characters in 10 pieces) and one
saiproxy serve both protocols; the two loads run in turns (the order flips
every round) with the same client loop, and the median round of each counts.
The target: Messages streaming within 10 % of Chat Completions streaming's RPS.
The proxy's CPU time per stream is shown too: on a shared machine it is the
steadier figure of the two. Messages streams send ``message_start`` before SAI
answers (Anthropic's clients expect it at once), Chat streams their first
chunk only once SAI answered: against this fake SAI, which answers within a
millisecond, that early write is most of the difference between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import aiohttp
import orjson

from bench.fake_sai import free_port, raise_nofile
from bench.processes import proxy_env, start_fake_sai, stop
from bench.run import ROOT, SMOKE_NOTE, Usage, verdict, wait_ready

TARGET: Final = 0.90
PROMPT: Final = "Say something about load testing."
SYSTEM: Final = "You are a benchmark."

# Per protocol: path, body, and the last frame of a stream that ended cleanly.
PROTOCOLS: Final = {
    "chat": (
        "/v1/chat/completions",
        orjson.dumps({"model": "sai-model", "stream": True, "messages": [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]}),
        b"data: [DONE]\n\n",
    ),
    "messages": (
        "/v1/messages",
        orjson.dumps({"model": "sai-model", "stream": True, "max_tokens": 1024,
                      "system": SYSTEM, "messages": [{"role": "user", "content": PROMPT}]}),
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ),
}  # fmt: skip


async def one(session: aiohttp.ClientSession, url: str, body: bytes, end: bytes) -> bool:
    """Stream one answer to its end; return whether it ended cleanly.

    The body is read in chunks, not lines: the client shares the machine with
    the proxy, and parsing more SSE lines for one protocol would tilt the scales.
    """
    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as response:
            tail = b""
            async for chunk in response.content.iter_any():
                tail = (tail + chunk)[-128:]
            return response.status == 200 and end in tail
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


async def load(
    url: str, body: bytes, end: bytes, concurrency: int, seconds: float
) -> tuple[float, int]:
    """Return clean streams per second of ``concurrency`` clients over ``seconds``, and how many."""
    good = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal good
        while time.perf_counter() < deadline:
            # Not ``good += await ...``: that reads ``good`` before the await and
            # would lose the other workers' counts.
            ended = await one(session, url, body, end)
            good += ended

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return good / (time.perf_counter() - started), good


async def main_async(smoke: bool) -> int:
    raise_nofile()
    concurrency, seconds, rounds = (4, 0.5, 1) if smoke else (64, 5.0, 5)
    sai_port, proxy_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="saiproxy-bench-") as tmp:
        sai = start_fake_sai(sai_port, "--chars", "200", "--drip-chunks", "10")
        env = proxy_env(sai_port, Path(tmp), {"PORT": str(proxy_port)})
        proxy = subprocess.Popen(
            [sys.executable, "-m", "saiproxy"], env=env, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            await wait_ready(f"http://127.0.0.1:{sai_port}/api/templates/bench/execute", sai)
            base = f"http://127.0.0.1:{proxy_port}"
            await wait_ready(f"{base}/v1/messages", proxy)
            rps: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
            cpu: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
            usage = Usage(proxy.pid)
            for round_ in range(rounds):
                order = list(PROTOCOLS) if round_ % 2 == 0 else list(PROTOCOLS)[::-1]
                for name in order:
                    path, body, end = PROTOCOLS[name]
                    print(f"running: {name} streams, c={concurrency} (round {round_ + 1})",
                          file=sys.stderr, flush=True)  # fmt: skip
                    before = usage.cpu()
                    streams_per_second, streams = await load(
                        base + path, body, end, concurrency, seconds
                    )
                    rps[name].append(streams_per_second)
                    cpu[name].append((usage.cpu() - before) / max(1, streams) * 1e6)
        finally:
            stop(proxy)
            stop(sai)
    chat, messages = (statistics.median(rps[name]) for name in ("chat", "messages"))
    for name, runs in rps.items():
        shown = ", ".join(f"{value:,.0f}" for value in runs)
        print(f"{name:<9} streaming RPS, c={concurrency}: median {statistics.median(runs):,.0f}"
              f" (rounds: {shown}); proxy CPU per stream: median "
              f"{statistics.median(cpu[name]):,.0f} µs")  # fmt: skip
    ratio = messages / chat if chat else 0.0
    met = ratio >= TARGET
    print(f"{verdict(met, smoke=smoke)}  Messages streaming RPS >= {TARGET:.2f} x Chat Completions"
          f" streaming: {ratio:.2f} x")  # fmt: skip
    if smoke:
        print(SMOKE_NOTE)
    return 0 if met or smoke else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run: a few seconds")
    args = parser.parse_args()
    sys.exit(asyncio.run(main_async(args.smoke)))


if __name__ == "__main__":
    main()
