"""Benchmark saiproxy against direct calls to a fake SAI, in the same run.

    python -m bench.run            # every scenario, about nine minutes
    python -m bench.run --smoke    # a few seconds: checks the bench still works

Each scenario starts a fresh fake SAI (bench/fake_sai.py) and a fresh
saiproxy (one worker, JSON logs at INFO unless the scenario says otherwise,
stdout and the log file on disk), runs the load once straight at the fake SAI
and once through the proxy, and records the proxy's peak RSS and CPU time.
Speed is judged by the ratios in one run, never by absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import load, responses
from bench.fake_sai import free_port, raise_nofile
from bench.processes import proxy_env, stop

ROOT = Path(__file__).resolve().parent.parent
SMOKE_NOTE = "(a smoke run only checks that the benchmark works: too small to judge targets)"


def verdict(met: bool, *, smoke: bool = False) -> str:
    """Return how a target fared: MET or MISS; a smoke run is too small to judge (--)."""
    if smoke:
        return "--  "
    return "MET " if met else "MISS"


@dataclass(frozen=True)
class Scenario:
    """One load shape: what SAI does, what the clients do."""

    name: str
    mode: load.Mode  # json (non-streaming) or sse (streaming)
    concurrency: int
    duration: float | None = None
    requests: int | None = None
    chars: int = 200
    delay: float = 0.0
    drip_chunks: int = 1
    drip_seconds: float = 0.0
    proxy_env: dict[str, str] = field(default_factory=dict)
    direct: bool = True
    rounds: int = 1  # >1: run in turns with the other repeated scenarios; the median run counts
    floor: bool = False  # also through bench/floor.py, a bare aiohttp proxy (Chat only)
    tools: bool = False  # the request offers tools: the answer goes through the call-block filter


def scenarios(smoke: bool) -> list[Scenario]:
    """Return the scenarios of the issue; tiny ones in smoke mode."""
    if smoke:
        return [
            Scenario("non-stream c=4", "json", 4, requests=40, floor=True),
            Scenario("stream c=4", "sse", 4, requests=40, drip_chunks=4),
            Scenario("stream c=4, tools", "sse", 4, requests=40, drip_chunks=4, tools=True),
            Scenario("first chunk, drip", "sse", 1, requests=2, drip_chunks=4, drip_seconds=0.2),
            Scenario("responses stream c=4", "responses", 4, requests=40, drip_chunks=4),
        ]
    seconds = 5.0
    return [
        Scenario("non-stream c=1", "json", 1, duration=seconds, rounds=3, floor=True),
        Scenario("non-stream c=64", "json", 64, duration=seconds, rounds=3, floor=True),
        Scenario("non-stream c=256", "json", 256, duration=seconds),
        Scenario("stream c=1", "sse", 1, duration=seconds, drip_chunks=10),
        Scenario("stream c=64", "sse", 64, duration=seconds, drip_chunks=10, rounds=3),
        # The same stream offering three tools: prose relayed through the call-block filter.
        Scenario(
            "stream c=64, tools", "sse", 64, duration=seconds, drip_chunks=10, rounds=3,
            direct=False, tools=True,
        ),
        # Judged against Chat's stream c=64, in turns with it (bench/responses.py).
        Scenario("responses stream c=64", "responses", 64, duration=seconds, drip_chunks=10,
                 rounds=3, direct=False),
        Scenario("stream c=256", "sse", 256, duration=seconds, drip_chunks=10),
        Scenario("first chunk, 2 s drip", "sse", 1, requests=5, drip_chunks=10, drip_seconds=2),
        Scenario("2,000 x 1 s calls, c=1,000", "json", 1000, requests=2000, delay=1.0),
        # Through the bare relay too: what opening 5,000 streams costs the stack itself.
        Scenario(
            "5,000 streams x 2 s", "sse", 5000, requests=5000, drip_chunks=10, drip_seconds=2,
            floor=True,
        ),
        # The logging cost is a small difference between two throughputs, so the
        # two run alternately, six times each; the median of the six rounds' costs counts.
        Scenario(
            "non-stream c=64, INFO", "json", 64, duration=3, proxy_env={"LOG_LEVEL": "info"},
            direct=False, rounds=6,
        ),
        Scenario(
            "non-stream c=64, WARNING", "json", 64, duration=3,
            proxy_env={"LOG_LEVEL": "warning"}, direct=False, rounds=6,
        ),
    ]  # fmt: skip


class Usage:
    """Peak RSS and CPU seconds of a process, read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu_start = self.cpu()

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


async def wait_ready(url: str, process: subprocess.Popen[bytes], within: float = 20) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{url}: process exited with {process.returncode}")
            try:
                async with session.post(url, data=b"{}") as response:
                    await response.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def run_scenario(scenario: Scenario, workdir: Path) -> list[dict[str, Any]]:
    """Run one scenario directly and through the proxy; return the table rows."""
    rows: list[dict[str, Any]] = []
    sai_port, proxy_port = free_port(), free_port()
    out = (workdir / f"sai-{sai_port}.out").open("wb")
    sai = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_sai", "--port", str(sai_port),
         "--chars", str(scenario.chars), "--delay", str(scenario.delay),
         "--drip-chunks", str(scenario.drip_chunks),
         "--drip-seconds", str(scenario.drip_seconds)],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        sai_url = f"http://127.0.0.1:{sai_port}/api/templates/bench/execute"
        await wait_ready(sai_url, sai)
        common: dict[str, Any] = {
            "concurrency": scenario.concurrency,
            "requests": scenario.requests,
            "duration": scenario.duration,
        }
        if scenario.direct:
            results, elapsed = await load.run(sai_url, load.sai_body(), mode="raw", **common)
            rows.append({"scenario": scenario.name, "via": "direct",
                         **load.summary(results, elapsed)})  # fmt: skip

        env = proxy_env(sai_port, workdir, {"PORT": str(proxy_port), **scenario.proxy_env})
        rows.append(await _through(
            scenario, "saiproxy", ["-m", "saiproxy"], proxy_port, workdir, common, env=env,
        ))  # fmt: skip
        if scenario.floor:
            # bench/floor.py: the least an aiohttp proxy does (non-streaming only).
            floor_port = free_port()
            argv = ["-m", "bench.floor", "--port", str(floor_port), "--upstream", sai_url]
            rows.append(await _through(scenario, "floor", argv, floor_port, workdir, common))
    finally:
        stop(sai)
        out.close()
    return rows


async def _through(
    scenario: Scenario,
    via: str,
    argv: list[str],
    port: int,
    workdir: Path,
    common: dict[str, Any],
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start a proxy process, run the scenario's load through it, stop it; return the row."""
    process_out = (workdir / f"{via}-{port}.out").open("wb")
    process = subprocess.Popen(
        [sys.executable, *argv], env=env, cwd=ROOT, stdout=process_out, stderr=subprocess.STDOUT
    )
    try:
        if scenario.mode == "responses":
            path, body = responses.PATH, responses.body(stream=True)
        else:
            path = "/v1/chat/completions"
            body = load.chat_body(scenario.mode == "sse", tools=scenario.tools)
        url = f"http://127.0.0.1:{port}{path}"
        await wait_ready(url, process)
        usage = Usage(process.pid)
        results, elapsed = await load.run(url, body, mode=scenario.mode, **common)
        return {
            "scenario": scenario.name, "via": via, **load.summary(results, elapsed),
            "rss_mb": usage.peak_rss_mb(), "cpu_s": usage.cpu() - usage.cpu_start,
        }  # fmt: skip
    finally:
        stop(process)
        process_out.close()


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"| {'scenario':<28} | {'via':<8} | {'requests':>8} | {'errors':>6} | {'RPS':>8} "
        f"| {'p50 ms':>8} | {'p99 ms':>8} | {'first ms':>8} | {'elapsed s':>9} "
        f"| {'peak RSS MB':>11} | {'CPU s':>6} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(
            f"| {row['scenario']:<28} | {row['via']:<8} | {_fmt(row['requests']):>8} "
            f"| {_fmt(row['errors']):>6} | {_fmt(row['rps'], 0):>8} | {_fmt(row['p50_ms'], 2):>8} "
            f"| {_fmt(row['p99_ms'], 2):>8} | {_fmt(row['first_ms'], 2):>8} "
            f"| {_fmt(row['elapsed_s'], 2):>9} | {_fmt(row.get('rss_mb')):>11} "
            f"| {_fmt(row.get('cpu_s'), 2):>6} |"
        )


INFO_RUN = ("non-stream c=64, INFO", "saiproxy")
WARNING_RUN = ("non-stream c=64, WARNING", "saiproxy")


def logging_costs(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[float]:
    """Return the INFO logging cost of each round: 1 - INFO RPS / WARNING RPS.

    The two sides of a round ran one right after the other, so they share
    the machine's mood of the moment far better than medians taken apart.
    """
    return [
        1 - info["rps"] / warning["rps"]
        for info, warning in zip(runs.get(INFO_RUN, []), runs.get(WARNING_RUN, []), strict=False)
    ]


def check_targets(
    rows: list[dict[str, Any]], costs: list[float] | None = None
) -> list[tuple[str, str, bool]]:
    """Return (target, measured, met) for every target the rows can judge.

    ``costs`` are the per-round logging costs; their median judges that target.
    """
    by = {(r["scenario"], r["via"]): r for r in rows}
    checks: list[tuple[str, str, bool]] = []

    def pair(name: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        if (name, "direct") in by and (name, "saiproxy") in by:
            return by[(name, "direct")], by[(name, "saiproxy")]
        return None

    def floor(name: str) -> dict[str, Any] | None:
        return by.get((name, "floor"))

    if found := pair("non-stream c=64"):
        ratio = found[1]["rps"] / found[0]["rps"]
        figure = f"{ratio:.2f} x"
        if bare := floor("non-stream c=64"):
            figure += f" (bare aiohttp proxy: {bare['rps'] / found[0]['rps']:.2f} x)"
        checks.append(("non-streaming RPS c=64 >= 0.30 x direct", figure, ratio >= 0.30))
    if found := pair("stream c=64"):
        ratio = found[1]["rps"] / found[0]["rps"]
        checks.append(("streaming RPS c=64 >= 0.25 x direct", f"{ratio:.2f} x", ratio >= 0.25))
    for name in ("stream c=64", "stream c=4"):
        plain, tools = by.get((name, "saiproxy")), by.get((f"{name}, tools", "saiproxy"))
        if plain and tools:
            # Same pieces per stream in both runs, so CPU per request compares CPU per piece.
            cost = (tools["cpu_s"] / tools["requests"]) / (plain["cpu_s"] / plain["requests"]) - 1
            checks.append((
                "a stream offering tools costs <= 10 % more CPU per piece",
                f"{cost * 100:+.1f} % ({name})", cost <= 0.10,
            ))  # fmt: skip
            break
    chat_stream = by.get(("stream c=64", "saiproxy"))
    if chat_stream and (found_responses := by.get(("responses stream c=64", "saiproxy"))):
        ratio = found_responses["rps"] / chat_stream["rps"]
        checks.append(
            ("Responses streaming RPS c=64 >= 0.90 x Chat's", f"{ratio:.2f} x", ratio >= 0.90)
        )
    if found := pair("non-stream c=1"):
        cost = found[1]["p50_ms"] - found[0]["p50_ms"]
        figure = f"{cost:.2f} ms"
        if bare := floor("non-stream c=1"):
            figure += f" (bare aiohttp proxy: {bare['p50_ms'] - found[0]['p50_ms']:.2f} ms)"
        checks.append(("hop p50 cost at c=1 <= 0.6 ms", figure, cost <= 0.6))
    if found := pair("first chunk, 2 s drip"):
        extra = found[1]["first_ms"] - found[0]["first_ms"]
        checks.append(("first content <= SAI first byte + 5 ms", f"+{extra:.2f} ms", extra <= 5))
    if found := pair("2,000 x 1 s calls, c=1,000"):
        ratio = found[1]["elapsed_s"] / found[0]["elapsed_s"]
        ok = ratio <= 1.25 and found[1]["errors"] == 0
        checks.append(("2,000 x 1 s at c=1,000 <= 1.25 x direct", f"{ratio:.2f} x", ok))
    if found := pair("5,000 streams x 2 s"):
        ratio = found[1]["elapsed_s"] / found[0]["elapsed_s"]
        figure = f"{ratio:.2f} x"
        if bare := floor("5,000 streams x 2 s"):
            figure += f" (bare aiohttp relay: {bare['elapsed_s'] / found[0]['elapsed_s']:.2f} x)"
        checks.append(("5,000 streams x 2 s take <= 1.3 x direct", figure, ratio <= 1.3))
    if ("5,000 streams x 2 s", "saiproxy") in by:
        row = by[("5,000 streams x 2 s", "saiproxy")]
        ok = row["errors"] == 0 and row["rss_mb"] <= 250
        measured = f"{row['errors']} errors, {row['rss_mb']:.0f} MB"
        checks.append(("5,000 streams: 0 errors, RSS <= 250 MB", measured, ok))
    if ("non-stream c=256", "saiproxy") in by:
        rss = by[("non-stream c=256", "saiproxy")]["rss_mb"]
        checks.append(("RSS under c=256 <= 80 MB", f"{rss:.0f} MB", rss <= 80))
    info, warning = by.get(INFO_RUN), by.get(WARNING_RUN)
    if info and warning:
        if costs:
            ordered = sorted(costs)
            middle = len(ordered) // 2
            cost = (ordered[middle] + ordered[~middle]) / 2
            spread = f"; rounds {ordered[0] * 100:.0f} to {ordered[-1] * 100:.0f} %"
        else:
            cost, spread = 1 - info["rps"] / warning["rps"], ""
        # The proxy is CPU-bound here, so CPU per request tells the same story.
        per_request = (info["cpu_s"] / info["requests"]) / (warning["cpu_s"] / warning["requests"])
        measured = f"{cost * 100:.1f} % (CPU per request {(per_request - 1) * 100:+.1f} %{spread})"
        checks.append(("INFO logging costs <= 10 % of WARNING RPS", measured, cost <= 0.10))
    return checks


def _median_row(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the median run (sorted by RPS); with an even count, the two middle runs averaged."""
    middle = len(measured) // 2
    if len(measured) % 2:
        return measured[middle]
    low, high = measured[middle - 1], measured[middle]
    merged: dict[str, Any] = {}
    for key, value in low.items():
        other = high[key]
        if isinstance(value, int) and isinstance(other, int):
            merged[key] = round((value + other) / 2)
        elif isinstance(value, float) and isinstance(other, float):
            merged[key] = (value + other) / 2
        else:
            merged[key] = value
    return merged


async def main_async(smoke: bool, only: list[str]) -> int:
    raise_nofile()
    rows: list[dict[str, Any]] = []
    chosen = [
        scenario
        for scenario in scenarios(smoke)
        if not only or any(word in scenario.name for word in only)
    ]
    with tempfile.TemporaryDirectory(prefix="saiproxy-bench-") as tmp:
        single = [scenario for scenario in chosen if scenario.rounds == 1]
        paired = [scenario for scenario in chosen if scenario.rounds > 1]
        for scenario in single:
            print(f"running: {scenario.name}", file=sys.stderr, flush=True)
            rows.extend(await run_scenario(scenario, Path(tmp)))
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for round_ in range(max((scenario.rounds for scenario in paired), default=0)):
            # Every other round runs in reverse order, so neither side of a pair
            # always goes first (on this machine, order alone can move a run by 10 %).
            for scenario in paired if round_ % 2 == 0 else paired[::-1]:
                if round_ >= scenario.rounds:
                    continue
                print(f"running: {scenario.name} (round {round_ + 1})", file=sys.stderr, flush=True)
                for row in await run_scenario(scenario, Path(tmp)):
                    runs.setdefault((row["scenario"], row["via"]), []).append(row)
        costs = logging_costs(runs)
        for measured in runs.values():
            rows.append(_median_row(sorted(measured, key=lambda row: row["rps"])))
    order = {scenario.name: index for index, scenario in enumerate(chosen)}
    via = {"direct": 0, "saiproxy": 1, "floor": 2}
    rows.sort(key=lambda row: (order[row["scenario"]], via[row["via"]]))
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    loop = os.environ.get("EVENT_LOOP", "auto") if os.environ.get("EVENT_LOOP") else loop
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, proxy event loop: {loop}\n")  # fmt: skip
    print_table(rows)
    checks = check_targets(rows, costs)
    if checks:
        print()
        for target, figure, met in checks:
            print(f"{verdict(met, smoke=smoke)}  {target:<44} {figure}")
        if smoke:
            print(SMOKE_NOTE)
    errors = sum(r["errors"] for r in rows if r["via"] == "saiproxy")
    print(f"\n{len(rows)} measurements, {errors} proxy errors")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run: a few seconds")
    parser.add_argument("--only", nargs="*", default=[], help="run scenarios whose name has a word")
    args = parser.parse_args()
    sys.exit(asyncio.run(main_async(args.smoke, args.only)))


if __name__ == "__main__":
    main()
