"""Token streams at scale: CPU per relayed piece, against the fake SAI's own.

    python -m bench.tokens                       # 500 streams x 200 pieces at 50/s
    python -m bench.tokens --streams 10000 --pieces 20 --rate 5
    python -m bench.tokens --smoke               # a few seconds

A real model streams token by token, so SAI's body arrives as many small
pieces and each becomes one frame to the client. Each run starts a fake SAI
that sends ``--pieces`` pieces of 5 characters at ``--rate`` pieces a second
per stream, and opens ``--streams`` streams at once: straight at the fake
SAI, through saiproxy, and through bench/floor.py's bare streaming relay
(read a piece, write a frame, nothing else, on the same stack). For the
proxied runs it reports the relay's CPU per piece, the fake SAI's CPU per
piece in the same run, their ratio, the frames each client received (pieces
that arrive apart must not be merged), peak RSS, and how much later than
direct the streams end (p99) and show their first token (p50).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import load
from bench.fake_sai import free_port, raise_nofile
from bench.processes import proxy_env, stop
from bench.run import ROOT, SMOKE_NOTE, Usage, verdict, wait_ready

PIECE_CHARS = 5


async def _run(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    sai_port = free_port()
    seconds = args.pieces / args.rate
    out = (workdir / "sai.out").open("wb")
    sai = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_sai", "--port", str(sai_port),
         "--chars", str(args.pieces * PIECE_CHARS), "--drip-chunks", str(args.pieces),
         "--drip-seconds", str(seconds)],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        sai_url = f"http://127.0.0.1:{sai_port}/api/templates/bench/execute"
        await wait_ready(sai_url, sai)
        common = {"concurrency": args.streams, "requests": args.streams}
        sai_usage = Usage(sai.pid)
        results, elapsed = await load.run(sai_url, load.sai_body(), mode="raw", **common)
        rows.append(_row("direct", results, elapsed, sai_cpu=sai_usage.cpu() - sai_usage.cpu_start))
        env = proxy_env(sai_port, workdir)
        relays = [
            ("saiproxy", ["-m", "saiproxy"]),
            ("floor", ["-m", "bench.floor", "--upstream", sai_url]),
        ]
        # In turns, the order flipped every round: the machine's speed drifts.
        relays = [relay for relay in relays if relay[0] in args.relays]
        for round_ in range(args.rounds):
            for via, argv in relays if round_ % 2 == 0 else relays[::-1]:
                rows.append(await _relayed(args, via, argv, env, sai, workdir, common))
    finally:
        stop(sai)
        out.close()
    return rows


async def _relayed(
    args: argparse.Namespace,
    via: str,
    argv: list[str],
    env: dict[str, str],
    sai: subprocess.Popen[bytes],
    workdir: Path,
    common: dict[str, Any],
) -> dict[str, Any]:
    """Run the streams through one relay process; return its row."""
    port = free_port()
    argv = [*argv, "--port", str(port)] if via == "floor" else argv
    log = (workdir / f"{via}-{port}.out").open("wb")
    process = subprocess.Popen(
        [sys.executable, *argv], env={**env, "PORT": str(port)}, cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        await wait_ready(url, process)
        proxy_usage, sai_usage = Usage(process.pid), Usage(sai.pid)
        results, elapsed = await load.run(url, load.chat_body(stream=True), mode="sse", **common)
        return _row(
            via, results, elapsed,
            sai_cpu=sai_usage.cpu() - sai_usage.cpu_start,
            proxy_cpu=proxy_usage.cpu() - proxy_usage.cpu_start,
            rss=proxy_usage.peak_rss_mb(),
        )  # fmt: skip
    finally:
        stop(process)
        log.close()


def _row(via: str, results: list[load.Result], elapsed: float, **extra: Any) -> dict[str, Any]:
    good = [r for r in results if r.ok]
    ends = [r.latency for r in good]
    firsts = [r.first_content for r in good if r.first_content is not None]
    return {
        "via": via,
        "streams": len(results),
        "errors": len(results) - len(good),
        "frames": sum(r.frames for r in good) / len(good) if good else 0.0,
        "end_p99_ms": (load.percentile(ends, 99) or 0.0) * 1000,
        "first_p50_ms": (load.percentile(firsts, 50) or 0.0) * 1000,
        "elapsed_s": elapsed,
        **extra,
    }


def report(rows: list[dict[str, Any]], pieces: int) -> list[tuple[str, str, bool]]:
    """Print every run; return (target, measured, met), judged on each relay's median round."""
    print(
        f"{'via':<9} {'streams':>7} {'errors':>6} {'frames':>7} {'end p99':>9} {'first p50':>9} "
        f"{'relay us/piece':>14} {'SAI us/piece':>12} {'ratio':>6} {'RSS MB':>7}"
    )
    for row in rows:
        relayed = row["streams"] * pieces
        row["sai_us"] = row["sai_cpu"] / relayed * 1e6
        if "proxy_cpu" in row:
            row["relay_us"] = row["proxy_cpu"] / relayed * 1e6
            row["ratio"] = row["proxy_cpu"] / row["sai_cpu"]
        frames = f"{row['frames']:.0f}" if row["via"] != "direct" else "-"
        print(
            f"{row['via']:<9} {row['streams']:>7} {row['errors']:>6} {frames:>7} "
            f"{row['end_p99_ms']:>7.0f}ms {row['first_p50_ms']:>7.0f}ms "
            f"{row.get('relay_us', 0.0):>14.1f} {row['sai_us']:>12.1f} "
            f"{row.get('ratio', 0.0):>6.2f} {row.get('rss', 0.0):>7.0f}"
        )
    direct = rows[0]
    proxy = _median([row for row in rows if row["via"] == "saiproxy"])
    floors = [row for row in rows if row["via"] == "floor"]
    floor = _median(floors) if floors else {**proxy, "ratio": float("inf")}
    late = proxy["end_p99_ms"] / direct["end_p99_ms"] - 1
    first = proxy["first_p50_ms"] - direct["first_p50_ms"]
    print(
        f"median rounds: saiproxy {proxy['ratio']:.2f} x the fake SAI's CPU per piece "
        f"({proxy['relay_us']:.1f} us), bare relay {floor['ratio']:.2f} x "
        f"({floor['relay_us']:.1f} us); first token +{first:.0f} ms over direct"
    )
    return [
        (
            "saiproxy CPU per piece <= 1.2 x the fake SAI's, or within 10 % of the bare relay's",
            f"{proxy['ratio']:.2f} x (bare relay {floor['ratio']:.2f} x: "
            f"{proxy['ratio'] / floor['ratio']:.2f} of it)",
            proxy["ratio"] <= 1.2 or proxy["ratio"] <= floor["ratio"] * 1.1,
        ),
        ("p99 end latency within 10 % of direct", f"{late * 100:+.1f} %", late <= 0.10),
        (
            "0 failed streams; pieces not merged by the client (>= 98 % of them are frames)",
            f"{sum(r['errors'] for r in rows)} errors, {proxy['frames']:.0f} frames of {pieces}",
            all(r["errors"] == 0 for r in rows) and proxy["frames"] >= 0.98 * pieces,
        ),
    ]


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the round with the median ratio."""
    return sorted(rows, key=lambda row: float(row["ratio"]))[len(rows) // 2]


async def main_async(args: argparse.Namespace) -> int:
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="saiproxy-tokens-") as tmp:
        rows = await _run(args, Path(tmp))
    print(f"{args.streams} streams x {args.pieces} pieces at {args.rate}/s")
    checks = report(rows, args.pieces)
    for target, measured, met in checks:
        print(f"{verdict(met, smoke=args.smoke)}  {target}: {measured}")
    if args.smoke:
        print(SMOKE_NOTE)
    return 0 if all(row["errors"] == 0 for row in rows) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--pieces", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="pieces a second per stream")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each relay, in turns")
    parser.add_argument(
        "--relays", nargs="+", default=["saiproxy", "floor"], help="which relays to run"
    )
    parser.add_argument("--smoke", action="store_true", help="20 streams x 20 pieces")
    args = parser.parse_args()
    if args.smoke:
        args.streams, args.pieces, args.rate, args.rounds = 20, 20, 100.0, 1
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
