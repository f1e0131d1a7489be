"""What tracing costs: off against the code before tracing, on at ratio 1.0, a dead collector.

    python -m bench.tracing                      # the cost, about three minutes
    python -m bench.tracing --smoke              # a few seconds: checks the bench still works
    python -m bench.tracing --dead 100000        # 100,000 requests, the collector down

The cost: one fake SAI (bench/fake_sai.py) and three saiproxy processes run
the same loads in alternating rounds (the median round counts):

- ``before``: saiproxy as it was before tracing (``--base``, by default the
  parent of the commit that added saiproxy/tracing), from ``git archive``;
- ``off``: this code with no OTEL_* variable (the default);
- ``on 1.0``: this code, every request sampled (``always_on``), the spans sent
  over OTLP/HTTP to a sink on loopback that answers 200 (a collector that
  keeps up; its own CPU is not counted).

Loads: non-streamed chat completions and a token stream (10 pieces), 64
clients at once. ``cpu us`` is the proxy's CPU time per request (from
/proc), the figure to judge: the machine's other work moves throughput
more than it moves CPU per request. ``off`` is judged against ``before``
(target: within 2 %); ``on 1.0`` states the CPU a traced request adds.

The dead collector: this code with OTLP pointed at a closed port, the given
number of non-streamed requests at 64 at once; it prints failures (the
target is 0), the dropped-span count the proxy reports, and its RSS along the
way (bounded: it must stop growing once the export queue is full).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench import load
from bench.fake_sai import free_port, raise_nofile
from bench.processes import proxy_env, start_fake_sai, stop
from bench.run import Usage, wait_ready

ROOT = Path(__file__).resolve().parent.parent
LOADS: dict[str, tuple[load.Mode, int]] = {
    "non-stream c=64": ("json", 64),
    "stream c=64": ("sse", 64),
}


def base_commit() -> str:
    """Return the parent of the commit that added saiproxy/tracing: the code before tracing."""
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "saiproxy/tracing/hooks.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    if not added:
        raise SystemExit("bench.tracing: no commit adds saiproxy/tracing; give --base")
    return f"{added[-1]}^"


@contextmanager
def checkout(rev: str, into: Path) -> Iterator[Path]:
    """Extract ``rev``'s tree (git archive) into ``into``; yield it."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", rev], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    yield into


async def _sink(port: int) -> web.AppRunner:
    """An OTLP/HTTP receiver that takes every batch and keeps nothing (a collector keeping up)."""
    received = {"requests": 0}

    async def traces(request: web.Request) -> web.Response:
        await request.read()
        received["requests"] += 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def _env(
    sai_port: int, port: int, workdir: Path, code: Path, extra: dict[str, str]
) -> dict[str, str]:
    env = proxy_env(
        sai_port, workdir, {"PYTHONPATH": str(code), "PORT": str(port), **extra}, code=code
    )
    return {k: v for k, v in env.items() if not k.startswith("OTEL_") or k in extra}


async def _run(
    workdir: Path, sai_port: int, code: Path, extra: dict[str, str], seconds: float
) -> dict[str, dict[str, Any]]:
    """Start a saiproxy from ``code`` with ``extra`` in its environment; run every load."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "saiproxy"], env=_env(sai_port, port, workdir, code, extra),
        cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        await wait_ready(url, process)
        usage = Usage(process.pid)
        rows: dict[str, dict[str, Any]] = {}
        for name, (mode, size) in LOADS.items():
            body = load.chat_body(mode == "sse")
            await load.run(url, body, mode=mode, concurrency=size, requests=300)  # warm up
            cpu = usage.cpu()
            results, elapsed = await load.run(
                url, body, mode=mode, concurrency=size, duration=seconds
            )
            cpu = usage.cpu() - cpu
            rows[name] = {
                **load.summary(results, elapsed),
                "cpu_us": cpu / max(1, len(results)) * 1e6,
            }
        return rows
    finally:
        stop(process)


async def cost(smoke: bool, base: str, only: tuple[str, ...], rounds: int) -> int:
    raise_nofile()
    rounds, seconds = (1, 1.0) if smoke else (rounds, 6.0)
    with tempfile.TemporaryDirectory(prefix="saiproxy-bench-tracing-") as tmp:
        workdir = Path(tmp)
        sai_port, sink_port = free_port(), free_port()
        sai = start_fake_sai(sai_port, "--drip-chunks", "10")
        sink = await _sink(sink_port)
        on = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "OTEL_TRACES_SAMPLER": "always_on",
        }
        measured: dict[tuple[str, str], list[dict[str, Any]]] = {}
        try:
            with checkout(base, workdir / "before") as before:
                # This code runs from a copy beside the other: where a tree lies
                # moved the throughput by 20 % here (a run of the same code both ways).
                current = workdir / "current"
                for part in ("saiproxy", "config"):
                    shutil.copytree(ROOT / part, current / part)
                configs = {"before": (before, {}), "off": (current, {}), "on 1.0": (current, on)}
                configs = {name: configs[name] for name in ("before", *only)}
                for round_ in range(rounds):
                    # Every other round in the reverse order: no config always goes first.
                    order = list(configs.items())
                    for name, (code, extra) in order[:: -1 if round_ % 2 else 1]:
                        rows = await _run(workdir, sai_port, code, extra, seconds)
                        for load_name, row in rows.items():
                            measured.setdefault((name, load_name), []).append(row)
        finally:
            stop(sai)
            await sink.cleanup()
    print(f"base: {base}; {rounds} rounds of {seconds:g} s, the median round")
    print(f"{'tracing':<8} {'load':<16} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'cpu us':>8}  cpu vs before, per round: median (range)")  # fmt: skip
    failed = 0
    for load_name in LOADS:
        base_cpu = _median(measured[("before", load_name)], "cpu_us")
        for name in ("before", *only):
            runs = measured[(name, load_name)]
            row = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
            cpu = _median(runs, "cpu_us")
            failed += sum(r["errors"] for r in runs)
            # Each round's run against the "before" run of the same round: the
            # median of those ratios, and their spread (the machine's noise).
            ratios = sorted(
                r["cpu_us"] / b["cpu_us"] - 1
                for r, b in zip(runs, measured[("before", load_name)], strict=True)
            )
            change = (
                f"{statistics.median(ratios) * 100:+.1f} % "
                f"({ratios[0] * 100:+.0f}..{ratios[-1] * 100:+.0f})"
                if name != "before"
                else ""
            )
            print(
                f"{name:<8} {load_name:<16} {row['rps']:>8.0f} {row['p50_ms']:>8.2f} "
                f"{row['p99_ms']:>8.2f} {cpu:>8.0f}  {change}"
            )
        if "on 1.0" in only:
            added = _median(measured[("on 1.0", load_name)], "cpu_us") - base_cpu
            print(f"{'':<8} {load_name:<16} tracing on at 1.0 adds {added:.0f} us CPU a request")
    print(f"failed requests: {failed}")
    return 1 if failed else 0


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(row[key] for row in rows))


async def dead_collector(requests: int) -> int:
    """Send ``requests`` requests with the collector down; print failures, drops, RSS."""
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="saiproxy-bench-tracing-") as tmp:
        workdir = Path(tmp)
        sai_port, port = free_port(), free_port()
        sai = start_fake_sai(sai_port)
        extra = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nobody listens
            "OTEL_TRACES_SAMPLER": "always_on",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "saiproxy"], env=_env(sai_port, port, workdir, ROOT, extra),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        failed = 0
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            await wait_ready(url, process)
            usage = Usage(process.pid)
            body = load.chat_body(False)
            step = max(1, requests // 10)
            print(f"{'requests':>9} {'failed':>7} {'rss MB':>7} {'peak MB':>8} {'dropped':>9}")
            done = 0
            while done < requests:
                count = min(step, requests - done)
                results, _ = await load.run(url, body, mode="json", concurrency=64, requests=count)
                done += count
                failed += sum(1 for r in results if not r.ok)
                print(
                    f"{done:>9} {failed:>7} {_rss_mb(process.pid):>7.1f} "
                    f"{usage.peak_rss_mb():>8.1f} {await _dropped(port):>9.0f}"
                )
        finally:
            stop(process)
            stop(sai)
    print(f"failed requests: {failed}")
    return 1 if failed else 0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _dropped(port: int) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        for line in (await response.text()).splitlines():
            if line.startswith("saiproxy_trace_spans_dropped "):
                return float(line.split()[1])
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: checks it works")
    parser.add_argument("--base", help="the code before tracing (a git revision)")
    parser.add_argument("--dead", type=int, metavar="N", help="N requests, the collector down")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds [5]")
    parser.add_argument(
        "--off-only", action="store_true", help="before and off only (the 2 %% target)"
    )
    args = parser.parse_args()
    if args.dead:
        sys.exit(asyncio.run(dead_collector(args.dead)))
    only = ("off",) if args.off_only else ("off", "on 1.0")
    sys.exit(asyncio.run(cost(args.smoke, args.base or base_commit(), only, args.rounds)))


if __name__ == "__main__":
    main()
