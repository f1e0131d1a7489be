"""The limits are written once: the process's store (local.py) and Valkey's (shared.py and
scripts/*.lua), driven with the same random sequences of admissions, settlements,
cancellations and clock steps, give the same verdicts, field by field, and the same usage.

Both stores take the same injected clock (epoch ms). It starts at the real time or later
(the budget keys expire at their period's end plus a day, by PEXPIREAT), sometimes just
before a day's or a month's end so that periods turn; it advances less than an hour in all,
since the learned excess and the accepted credentials expire in Valkey by real-time TTLs.
The lease is a day: the process has no lease expiry. ``EQ_EXAMPLES=<n>`` runs more
examples than the suite's 150.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bench.valkey import ValkeyServer
from saiproxy.limits.base import Ask, ScopeKind, Settlement
from saiproxy.limits.identity import ANONYMOUS
from saiproxy.limits.local import LocalLimiter
from saiproxy.limits.rules import MAX_TOKENS, Period, Rules, Verdict
from saiproxy.limits.shared import SharedLimiter, connect

# A proxy key's client (its own at once), two users' own credentials (anonymous's until
# SAI accepts them), and anonymous.
CLIENTS = ("key-0123456789abcdef", "user-00000000000000aa", "user-00000000000000bb", ANONYMOUS)
LEASE_S = 86_400.0
MAX_ADVANCE_MS = 3_500_000  # under the hour a learned excess is kept (a real-time TTL in Valkey)


@dataclass(frozen=True)
class Admit:
    client: int  # index into CLIENTS
    reserve: int
    shared: bool  # a proxy key's request on the shared SAI credentials (its global scope)
    fallback: bool  # a second admission, to the global scope only (the 429 fallback)
    known: bool  # a user's: the replica knows SAI accepted the credential (no check asked)


@dataclass(frozen=True)
class Settle:
    pick: int  # which grant still open (modulo their number)
    input_tokens: int
    output_tokens: int
    accepted: bool


@dataclass(frozen=True)
class Cancel:
    pick: int  # which grant still open: settled with 0 tokens, as a request that never ran


@dataclass(frozen=True)
class Step:
    ms: int


Op = Admit | Settle | Cancel | Step


@dataclass(frozen=True)
class Scenario:
    period: Period
    start: str  # "now", "day_end" or "month_end": where the clock starts
    before_ms: int  # how long before that end
    client: Rules
    shared: Rules  # the global scope's
    ops: list[Op]


def _limit(high: int) -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), st.integers(1, high), st.integers(1, high))


# Small limits, often reached: none at all, or each kind none or small.
RULES = st.one_of(
    st.just(Rules()),
    st.builds(Rules, rpm=_limit(5), tpm=_limit(4000), concurrency=_limit(3), budget=_limit(8000)),
    st.builds(Rules, rpm=_limit(5), tpm=_limit(4000), concurrency=_limit(3), budget=_limit(8000)),
)
TOKENS = st.one_of(st.integers(0, 50), st.integers(0, 5000), st.just(MAX_TOKENS))
ADMIT = st.builds(
    Admit,
    st.integers(0, len(CLIENTS) - 1),
    TOKENS,
    st.booleans(),
    st.booleans(),
    st.sampled_from([False, False, False, True]),
)
STEPS = st.one_of(
    st.integers(0, 2_000),
    st.integers(0, 70_000),
    st.sampled_from([1, 999, 1_000, 59_999, 60_000, 60_001]),
)
# Admissions most often (several between two settlements fill the limits), then
# settlements and cancellations of the grants still open, and clock steps.
OPS = st.one_of(
    ADMIT,
    ADMIT,
    ADMIT,
    st.builds(Settle, st.integers(0, 20), TOKENS, TOKENS, st.booleans()),
    st.builds(Settle, st.integers(0, 20), TOKENS, TOKENS, st.booleans()),
    st.builds(Cancel, st.integers(0, 20)),
    st.builds(Step, STEPS),
    st.builds(Step, STEPS),
)
SCENARIOS = st.builds(
    Scenario,
    st.sampled_from(["day", "month"]),
    st.sampled_from(["now", "day_end", "month_end"]),
    st.integers(0, 1_800_000),
    RULES,
    RULES,
    st.lists(OPS, min_size=10, max_size=80),
)


def start_ms(scenario: Scenario) -> int:
    """Return where the clock starts: the real time, or shortly before the next day's or
    month's end (never before the real time)."""
    real = time.time_ns() // 1_000_000
    if scenario.start == "now":
        return real
    moment = datetime.fromtimestamp(real / 1000, UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if scenario.start == "day_end":
        end = day + timedelta(days=1)
    else:
        year, month = moment.year + moment.month // 12, moment.month % 12 + 1
        end = day.replace(year=year, month=month, day=1)
    return max(real, int(end.timestamp() * 1000) - scenario.before_ms)


def ask_for(scenario: Scenario, op: Admit, number: int) -> Ask:
    """Return the Ask the limiter builds for ``op`` (as Limits.ask does)."""
    client = CLIENTS[op.client]
    # A user's own credential reaches SAI without the global scope unless it falls back to a
    # shared one; anonymous always uses the shared credentials.
    shared = op.fallback or client == ANONYMOUS or (client.startswith("key-") and op.shared)
    scopes: list[tuple[ScopeKind, Rules]] = []
    if not op.fallback and scenario.client.any:
        scopes.append(("client", scenario.client))
    if shared and scenario.shared.any:
        scopes.append(("global", scenario.shared))
    verify = client.startswith("user-") and not op.known
    return Ask(f"r{number}", client, verify, op.reserve, tuple(scopes), usage=not op.fallback)


async def run(url: str, scenario: Scenario) -> None:
    now = [start_ms(scenario)]
    advanced = 0

    def clock() -> int:
        return now[0]

    local = LocalLimiter(scenario.period, clock=clock)
    store = connect(url, 1.0)
    shared = SharedLimiter(
        store, f"eq-{uuid.uuid4().hex[:12]}:", scenario.period, LEASE_S, clock=clock
    )
    try:
        open_grants: list[tuple[Ask, Verdict]] = []
        dates: set[str] = set()
        # Every step, then a last admission of each client: the state both stores end with.
        probes = [Admit(index, 1, True, False, False) for index in range(len(CLIENTS))]
        for number, op in enumerate([*scenario.ops, *probes]):
            where = f"op {number} ({op}) at {now[0]}"
            if isinstance(op, Step):
                if advanced + op.ms <= MAX_ADVANCE_MS:
                    advanced += op.ms
                    now[0] += op.ms
            elif isinstance(op, Admit):
                ask = ask_for(scenario, op, number)
                in_process = await local.admit(ask)
                in_valkey = await shared.admit(ask)
                assert in_process == in_valkey, f"{where}: {ask}\n{in_process}\n{in_valkey}"
                dates.add(in_process.date)
                event(f"{in_process.reason or 'granted'} as {in_process.client[:4]}")
                if in_process.granted:
                    open_grants.append((ask, in_process))
            elif open_grants:
                ask, verdict = open_grants.pop(op.pick % len(open_grants))
                ended = (
                    Settlement(op.input_tokens, op.output_tokens, op.accepted)
                    if isinstance(op, Settle)
                    else Settlement(0, 0)
                )
                local.settle_now(ask, verdict, ended)
                await shared.settle_many([(ask, verdict, ended)])
        days = sorted(dates, reverse=True)
        event(f"{len(days)} days")
        for client in (None, *CLIENTS):
            pages = [
                await limiter.usage_page(days, limit=1000, client=client)
                for limiter in (local, shared)
            ]
            assert [page.next for page in pages] == [None, None]
            rows = [sorted(page.rows, key=lambda row: (row.date, row.client)) for page in pages]
            assert rows[0] == rows[1], f"usage of {client or 'every client'}"
    finally:
        await store.aclose()


@settings(
    max_examples=int(os.environ.get("EQ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=SCENARIOS)
def test_both_stores_give_the_same_verdicts(valkey: ValkeyServer, scenario: Scenario) -> None:
    # A loop of its own per example, closed here; not asyncio.run, which would also unset the
    # thread's current loop (pytest-asyncio's, left unclosed on older releases).
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run(valkey.url, scenario))
    finally:
        loop.close()
