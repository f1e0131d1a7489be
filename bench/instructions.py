"""Instructions per non-streamed request, through saiproxy and the floor: a count, not a time.

    python -m bench.instructions [--requests 2000] [--concurrency 16] [--via saiproxy floor]
                                 [--level INFO] [--limits local] [--smoke]

The CPU figures of bench/run.py and bench.hop move by 10-30 % between runs of
the same code on a shared machine. Valgrind's callgrind counts the
instructions the process executes (its threads included), which repeats
within a fraction of a percent whatever else the machine does, so a change
of a few microseconds per request shows. Each process under test runs under
callgrind (about 50 times slower) behind one fake SAI, twice: sent a fifth
of the requests, then all of them; the difference of the two counts divided
by the difference of the requests is printed per process, with the ratio to
the floor's. An instruction is not a microsecond (caches and branches differ),
so the targets are still judged by bench/run.py; this is what shows where a
change moved the work. Needs valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

from bench import load
from bench.fake_sai import free_port
from bench.limits import LIMITS
from bench.processes import ROOT, proxy_env, start_fake_sai, stop
from bench.run import wait_ready

__all__ = ["count", "main"]

_TOTALS: Final = re.compile(rb"^(?:totals|summary): (\d+)", re.MULTILINE)
READY_SECONDS: Final = 300.0  # an import under callgrind takes a while


def _instructions(out: Path) -> int:
    """Return the instructions counted in the callgrind dumps under ``out``'s name."""
    total = 0
    for dump in out.parent.glob(out.name + "*"):
        found = _TOTALS.search(dump.read_bytes())
        total += int(found[1]) if found else 0
    return total


async def _run(
    via: str, requests: int, concurrency: int, level: str, limits: str
) -> tuple[int, int]:
    """Start ``via`` under callgrind, send ``requests``, stop it; return the requests
    and the instructions counted."""
    workdir = Path(tempfile.mkdtemp(prefix="instructions-"))
    sai_port, port = free_port(), free_port()
    sai = start_fake_sai(sai_port, "--chars", "200")
    sai_url = f"http://127.0.0.1:{sai_port}/api/templates/bench/execute"
    extra = {"PORT": str(port), "LOG_LEVEL": level, "PYTHONHASHSEED": "0",
             **(LIMITS if limits != "off" else {})}  # fmt: skip
    env = proxy_env(sai_port, workdir, extra)
    argv = ["-m", "saiproxy"] if via == "saiproxy" else ["-m", "bench.floor", "--port", str(port),
                                                          "--upstream", sai_url]  # fmt: skip
    out = workdir / "callgrind.out"
    grind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    log = (workdir / "proxy.out").open("wb")
    process = subprocess.Popen([*grind, sys.executable, *argv], env=env, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip
    try:
        await wait_ready(sai_url, sai)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        await wait_ready(url, process, within=READY_SECONDS)
        body = load.chat_body(False)
        results, _ = await load.run(url, body, concurrency=concurrency, requests=requests)
        errors = sum(1 for result in results if result.error or result.status != 200)
        if errors:
            raise RuntimeError(f"{errors} of {len(results)} requests failed through {via}")
    finally:
        stop(process)
        stop(sai)
        log.close()
    return len(results), _instructions(out)


async def count(via: str, requests: int, concurrency: int, level: str, limits: str) -> float:
    """Return the instructions per request of ``via`` ("saiproxy" or "floor").

    Two processes, one sent a fifth of the requests and one all of them: the
    difference of their counts is what the extra requests took (the start,
    the warm-up and the shutdown cancel out).
    """
    few = await _run(via, requests // 5, concurrency, level, limits)
    many = await _run(via, requests, concurrency, level, limits)
    return (many[1] - few[1]) / (many[0] - few[0])


async def _main(args: argparse.Namespace) -> int:
    counted: dict[str, float] = {}
    for via in args.via:
        counted[via] = await count(via, args.requests, args.concurrency, args.level, args.limits)
        ratio = f"  {counted[via] / counted['floor']:.2f} x the floor" if "floor" in counted else ""
        print(f"{via:<9} {counted[via] / 1000:8.1f} k instructions per request{ratio}", flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--via", nargs="+", choices=("saiproxy", "floor"),
                        default=["floor", "saiproxy"])  # fmt: skip
    parser.add_argument("--level", default="INFO", help="saiproxy's LOG_LEVEL")
    parser.add_argument("--limits", choices=("off", "local"), default="off")
    parser.add_argument(
        "--smoke", action="store_true", help="saiproxy alone, 100 requests: it only has to run"
    )
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.via = 100, ["saiproxy"]
    if shutil.which("valgrind") is None:
        sys.exit("bench.instructions needs valgrind")
    sys.exit(asyncio.run(_main(args)))


if __name__ == "__main__":
    main()
