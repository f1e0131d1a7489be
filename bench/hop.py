"""Where a non-streamed request's CPU goes, layer by layer, through saiproxy and the floor.

    python -m bench.hop [--seconds 8] [--concurrency 64] [--limits local] [--via floor]
                        [--no-profile] [--level WARNING]

One fake SAI, then the process under test (saiproxy at INFO, as bench/run.py
starts it, or ``--via floor``: bench/floor.py), 64 clients at once. A
sampling profiler (py-spy, installed apart: ``pip install py-spy``) records
the process while the load runs; each sample is put in the layer of the
innermost frame that names one (the rules in ``LAYERS``), and the layer's
share of the samples times the process's CPU per request (from /proc) is its
cost in microseconds per request. Without py-spy only the totals print.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Final

from bench import load
from bench.fake_sai import free_port
from bench.limits import LIMITS
from bench.processes import ROOT, proxy_env, start_fake_sai, stop
from bench.run import Usage, wait_ready

__all__ = ["LAYERS", "layer_of", "main"]

# (layer, a fragment of the frame: "function (path"). A sample counts for the
# innermost frame of saiproxy's own code (or of a library it calls for one job:
# logging, metrics); the aiohttp code a layer calls (the SAI call's client, the
# body's read) counts for that layer. A sample with none of these is the stack's
# own work: aiohttp's server and the event loop, which the floor has too.
LAYERS: Final = (
    ("logging", "saiproxy/logs/"),
    ("logging", "logging/__init__.py"),
    ("metrics", "saiproxy/base/metrics.py"),
    ("metrics", "prometheus_client/"),
    ("limits", "saiproxy/limits/"),
    ("auth chain", "saiproxy/upstream/auth.py"),
    ("body read and validation", "read_json (saiproxy/core/bodies.py"),
    ("body read and validation", "_parse (saiproxy/core/bodies.py"),
    ("body read and validation", "saiproxy/protocols/openai.py"),
    ("body read and validation", "parse (saiproxy/protocols/chat.py"),
    ("body read and validation", "_turn (saiproxy/protocols/chat.py"),
    ("rendering", "body (saiproxy/protocols/chat.py"),
    ("rendering", "json_response (saiproxy/"),
    ("logs and latency (the ledger)", "saiproxy/core/ledger.py"),
    ("conversation and SAI payload", "saiproxy/core/prompt.py"),
    ("conversation and SAI payload", "saiproxy/core/conversation.py"),
    ("conversation and SAI payload", "_new_call (saiproxy/core/exchange.py"),
    ("SAI call", "saiproxy/upstream/sai.py"),
    ("answer filter", "saiproxy/core/answer.py"),
    ("tracing hooks", "saiproxy/tracing/"),
    ("middlewares", "saiproxy/web/middlewares.py"),
    ("access log, response hooks", "saiproxy/web/app.py"),
    ("exchange", "saiproxy/core/"),
    ("handler", "saiproxy/protocols/"),
)
# Outer frames that are no layer's: the process's main function runs the loop.
_NO_LAYER: Final = (
    "saiproxy/__main__.py",
    "saiproxy/cli/",
    "saiproxy/web/server.py",
    "saiproxy/web/workers.py",
)
STACK: Final = (
    ("SAI call", "aiohttp/client"),
    ("SAI call", "aiohttp/connector.py"),
    ("floor handler", "bench/floor.py"),
    ("aiohttp server", "aiohttp/"),
)


# Leaf frames where the process wakes another (a socket send wakes the peer, the log
# batch's hand-over wakes the writer thread): on 2 shared cores the woken one often
# preempts this process right there, and a sampling profiler counts the wait as
# work. Reported apart, as a share of the samples, and left out of the microseconds.
WAKE_UPS: Final = ("_writelines (aiohttp/http_writer.py", "flush (saiproxy/logs/batch.py")
WAKING: Final = "(waking a peer: wall time, not CPU)"


def layer_of(stack: str) -> str:
    """Return the layer of one collapsed stack (outermost frame first, ``;`` between)."""
    frames = stack.split(";")
    if any(fragment in frames[-1] for fragment in WAKE_UPS):
        return WAKING
    for frame in reversed(frames):
        if any(fragment in frame for fragment in _NO_LAYER):
            continue
        for layer, fragment in LAYERS:
            if fragment in frame:
                return layer
    for frame in reversed(frames):
        for layer, fragment in STACK:
            if fragment in frame:
                return layer
    return "event loop and other"


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "500", "--duration", str(int(seconds)),
         "--format", "raw", "--output", str(out), "--nonblocking", "--gil"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _layers(raw: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[layer_of(stack)] += int(count)
    return counts


async def hop(
    seconds: float, concurrency: int, via: str, limits: str, profile: bool = True,
    level: str = "INFO",
) -> int:  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="hop-"))
    sai_port, port = free_port(), free_port()
    sai = start_fake_sai(sai_port, "--chars", "200")
    sai_url = f"http://127.0.0.1:{sai_port}/api/templates/bench/execute"
    extra = {"PORT": str(port), "LOG_LEVEL": level, **(LIMITS if limits != "off" else {})}
    env = proxy_env(sai_port, workdir, extra)
    argv = ["-m", "saiproxy"] if via == "saiproxy" else ["-m", "bench.floor", "--port", str(port),
                                                          "--upstream", sai_url]  # fmt: skip
    out = (workdir / "proxy.out").open("wb")
    process = subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT)  # fmt: skip
    try:
        await wait_ready(sai_url, sai)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        await wait_ready(url, process)
        body = load.chat_body(False)
        await load.run(url, body, concurrency=concurrency, duration=1.0)  # warm up
        usage = Usage(process.pid)
        spy = _profile(process.pid, seconds, workdir / "raw.txt") if profile else None
        results, elapsed = await load.run(url, body, concurrency=concurrency, duration=seconds)
        cpu_us = (usage.cpu() - usage.cpu_start) / len(results) * 1e6
        if spy is not None:
            spy.wait(timeout=60)
        summary = load.summary(results, elapsed)
        print(f"{via} (limits {limits}, {level}), c={concurrency}: {summary['rps']:,.0f} req/s, "
              f"{summary['errors']} errors, {cpu_us:.0f} us CPU per request, "
              f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
        raw = workdir / "raw.txt"
        if spy is None or not raw.exists():
            print("(not sampled: no breakdown)" if not profile else "(no py-spy: no breakdown)")
            return 0
        counts = _layers(raw)
        total = sum(counts.values())
        waking = counts.pop(WAKING, 0)
        for layer, count in counts.most_common():
            share = count / (total - waking)
            print(f"  {layer:<30} {share * cpu_us:7.1f} us  {share * 100:5.1f} %")
        print(
            f"  {total} samples, {waking / total * 100:.0f} % of them {WAKING}; raw stacks: {raw}"
        )
    finally:
        stop(process)
        stop(sai)
        out.close()

    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--via", choices=("saiproxy", "floor"), default="saiproxy")
    parser.add_argument("--limits", choices=("off", "local"), default="off")
    parser.add_argument(
        "--no-profile", action="store_true", help="totals only: the process is not sampled"
    )
    parser.add_argument("--level", default="INFO", help="saiproxy's LOG_LEVEL")
    args = parser.parse_args()
    profile = not args.no_profile
    sys.exit(
        asyncio.run(hop(args.seconds, args.concurrency, args.via, args.limits, profile, args.level))
    )


if __name__ == "__main__":
    main()
