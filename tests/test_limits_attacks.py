"""The limits under attack: each test is a way a client could defeat a limit or turn it
against the others (issue "Fair share that no client can turn against the others"), run in
the process and against a real Valkey."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml

from bench.valkey import ValkeyServer
from saiproxy.base.metrics import Metrics
from saiproxy.base.settings import SettingsError, load_settings
from saiproxy.limits.base import Ask, Settlement
from saiproxy.limits.identity import Client, digest
from saiproxy.limits.limits import LIMITS, Limits
from saiproxy.limits.local import LocalLimiter
from saiproxy.limits.rules import Rules

from .conftest import ROOT, FakeSai, MakeProxy, Received, Reply, base_env, chat, log_lines

HI = chat(("user", "Hi"))


def keys_of(server: ValkeyServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5)


def leases(server: ValkeyServer) -> int:
    with keys_of(server) as db:
        return sum(int(db.zcard(key)) for key in db.scan_iter("saiproxy:c:*"))


async def settled(proxy: Any, server: ValkeyServer | None = None, within: float = 5.0) -> None:
    """Wait until the proxy's settlements (sent in the background) have landed."""
    limits = proxy.app[LIMITS]
    for _ in range(int(within / 0.02)):
        if not limits._tasks and (server is None or leases(server) == 0):
            return
        await asyncio.sleep(0.02)


# --- 1. Hanging up during admission


@pytest.mark.parametrize("flushed", [False, True], ids=["evalsha", "noscript-then-eval"])
async def test_an_admission_cancelled_at_any_await_ends_in_one_settlement(
    valkey: ValkeyServer, tmp_path: Path, flushed: bool
) -> None:
    """Cancel the admission after 0, 1, 2, … turns of the loop until one completes: every
    await point of the store's call is hit, and none may leave a lease or a budget spent."""
    env = {
        **base_env(FakeSai(), tmp_path), "SAI_URL": "http://127.0.0.1:9",
        "LIMITS_URL": valkey.url, "LIMITS_CLIENT_CONCURRENCY": "3",
        "LIMITS_CLIENT_BUDGET": "100000",
    }  # fmt: skip
    limits = Limits(load_settings(env), Metrics())
    await limits.start()
    client = Client(f"key-{'1' * 16}", "proxy_key", True)
    cancelled = 0
    try:
        for turns in range(1000):
            if flushed:
                valkey.command("SCRIPT", "FLUSH")
            task = asyncio.get_running_loop().create_task(limits.admit(client, 40_000))
            for _ in range(turns):
                await asyncio.sleep(0)
            if task.done():
                grant = task.result()
                assert grant.verdict.granted
                limits.settle(grant, Settlement(0, 0))
                break
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            cancelled += 1
            while limits._tasks:  # the store's call, then the settlement of what it granted
                await asyncio.wait(set(limits._tasks))
        assert cancelled >= 2  # the store's call was cut at its awaits, not only before it
        for _ in range(250):
            await asyncio.sleep(0.02)
            if not limits._tasks and leases(valkey) == 0:
                break
        assert leases(valkey) == 0
        with keys_of(valkey) as db:
            budgets = [int(db.get(key) or 0) for key in db.scan_iter("saiproxy:b:*")]
        assert budgets and all(used == 0 for used in budgets), budgets
    finally:
        await limits.close()


async def test_clients_hanging_up_during_admission_leave_no_lease_and_no_budget_spent(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    sai.default = Reply(delay=0.2, headers={"prompttokens": "1", "completiontokens": "1"})
    proxy = await make_proxy(
        LIMITS_URL=valkey.url, LIMITS_GLOBAL_CONCURRENCY="20", LIMITS_GLOBAL_BUDGET="100000"
    )
    url = proxy.make_url("/v1/chat/completions")
    rng = random.Random(7)
    async with aiohttp.ClientSession() as session:

        async def hang_up(after: float, body: dict[str, Any]) -> None:
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                async with asyncio.timeout(after):
                    await session.post(url, json=body)

        await asyncio.gather(*(hang_up(rng.uniform(0, 0.003), HI) for _ in range(300)))
        # Ten hang-ups each reserving what is left of the budget.
        big = {**HI, "max_tokens": 99_000}
        for _ in range(10):
            await hang_up(rng.uniform(0, 0.003), big)
    await asyncio.sleep(0.3)
    await settled(proxy, valkey)
    assert leases(valkey) == 0
    # Everyone else is still served: no lease and no budget left taken by the hang-ups.
    for _ in range(3):
        response = await proxy.post("/v1/chat/completions", json=HI)
        assert response.status == 200, await response.text()


# --- 3. The 429 fallback to the shared cookie


def sai_rate_limits_user_keys(call: Received) -> Reply | None:
    kind, _ = call.auth
    return Reply(status=429, body="Test template usage limit exceeded") if kind == "X-Api-Key" \
        else Reply(headers={"prompttokens": "5", "completiontokens": "5"})  # fmt: skip


async def test_a_user_key_rate_limited_by_sai_is_served_on_the_shared_cookie_only_within_the_global_limits(  # noqa: E501
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.answer = sai_rate_limits_user_keys
    sai.default = Reply(status=500)  # answer() decides every call
    proxy = await make_proxy(
        SAI_COOKIE="session=shared; Cookies=1", LIMITS_GLOBAL_RPM="5", ERROR_MODE="http", **store
    )
    statuses = []
    for index in range(40):
        headers = {"user-api-key": f"sk-user-{index % 4}"}
        response = await proxy.post("/v1/chat/completions", json=HI, headers=headers)
        statuses.append(response.status)
    assert statuses.count(200) == 5
    assert statuses.count(429) == 35
    on_cookie = [call for call in sai.received if call.auth[0] == "Cookie"]
    assert len(on_cookie) == 5  # the shared cookie was used 5 times, the global limit
    # The global counters saw them: a request on the shared key is refused now.
    refused = await proxy.post("/v1/chat/completions", json=HI)
    assert refused.status == 429


# --- 4. Identity rotation


def sai_knows(keys: set[str]) -> Any:
    def answer(call: Received) -> Reply:
        kind, value = call.auth
        if kind == "X-Api-Key" and value not in keys:
            return Reply(status=401, body="Unauthorized")
        return Reply()

    return answer


async def test_junk_cookies_appended_to_a_session_cookie_buy_no_new_client(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    proxy = await make_proxy(LIMITS_CLIENT_RPM="5", **store)
    admitted = 0
    for index in range(30):
        cookie = f".AspNetCore.Cookies=session-1; junk={index}"
        response = await proxy.post(
            "/v1/chat/completions", json=HI, headers={"user-api-key": cookie}
        )
        admitted += response.status == 200
        await settled(proxy)
    # The first request, before SAI accepted the session, counted as anonymous; then the
    # session is one client, whatever the other cookies say.
    assert admitted == 1 + 5
    rows = await proxy.app[LIMITS].usage([_today()])
    assert {row.client for row in rows} == {"anonymous", f"user-{digest('session-1')}"}


async def test_a_new_made_up_user_key_per_request_buys_no_new_limits(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.answer = sai_knows({"sk-real"})
    proxy = await make_proxy(LIMITS_CLIENT_RPM="5", ERROR_MODE="http", **store)
    statuses = []
    for index in range(30):
        headers = {"user-api-key": f"sk-made-up-{index}"}
        statuses.append((await proxy.post("/v1/chat/completions", json=HI, headers=headers)).status)
    assert statuses.count(429) == 25  # anonymous's 5, then refused
    assert len(sai.received) == 5
    await settled(proxy)
    rows = await proxy.app[LIMITS].usage([_today()])
    assert {row.client for row in rows} == {"anonymous"}  # no entry per invalid key


# --- 5. Abandoned requests


async def test_requests_abandoned_before_sai_counts_still_cost_their_prompt(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.default = Reply(delay=0.5, headers={"prompttokens": "4000", "completiontokens": "1"})
    proxy = await make_proxy(LIMITS_CLIENT_TPM="10000", **store)
    prompt = chat(("user", "x" * 16_000))  # about 4,000 tokens
    for _ in range(10):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.1):  # hang up after SAI was called
                await proxy.post("/v1/chat/completions", json=prompt)
        await asyncio.sleep(0.05)
    await settled(proxy)
    # Each abandoned request cost its prompt's 4,000: two fit in the 10,000 per minute.
    assert len(sai.received) == 2


# --- 6. Bounded state


async def test_in_process_state_expires_with_its_windows() -> None:
    now = [1_800_000_000_000]
    limiter = LocalLimiter("day", clock=lambda: now[0])
    rules = Rules(rpm=10, tpm=100_000, concurrency=2)
    for index in range(20_000):
        ask = Ask(f"r{index}", f"key-{index:016x}", False, 10, (("client", rules),))
        verdict = await limiter.admit(ask)
        limiter.settle_now(ask, verdict, Settlement(5, 5))
    assert limiter.entries() >= 20_000
    now[0] += 3_600_000 + 61_000  # past the window and the learned excess's hour
    ask = Ask("last", "anonymous", False, 10, (("client", rules),))
    await limiter.admit(ask)
    assert limiter.entries() <= 2
    # Today's usage is kept whole, however many clients.
    page = await limiter.usage_page(["2027-01-15"], limit=1000)
    rows = len(page.rows)
    while page.next is not None:
        page = await limiter.usage_page(["2027-01-15"], limit=1000, cursor=page.next)
        rows += len(page.rows)
    assert rows == 20_000 + 1


async def test_every_key_in_valkey_has_a_ttl(make_proxy: MakeProxy, valkey: ValkeyServer) -> None:
    proxy = await make_proxy(
        LIMITS_URL=valkey.url, LIMITS_CLIENT_RPM="100", LIMITS_CLIENT_TPM="100000",
        LIMITS_CLIENT_CONCURRENCY="5", LIMITS_CLIENT_BUDGET="1000000",
        LIMITS_GLOBAL_TPM="1000000",
    )  # fmt: skip
    for headers in ({}, {"user-api-key": "sk-1"}, {"user-api-key": "sk-1"}):
        assert (await proxy.post("/v1/chat/completions", json=HI, headers=headers)).status == 200
        await settled(proxy, valkey)
    with keys_of(valkey) as db:
        names = [key.decode() for key in db.scan_iter("saiproxy:*")]
        assert any(name.startswith("saiproxy:t:") for name in names)
        assert any(name.startswith("saiproxy:v:") for name in names)
        without = [name for name in names if db.pttl(name) < 0]
    assert without == []


def test_compose_and_stack_bound_valkey_memory_and_never_evict_silently() -> None:
    for name in ("docker-compose.yml", "docker-stack.yml"):
        spec = yaml.safe_load((ROOT / name).read_text())
        command = " ".join(map(str, spec["services"]["valkey"]["command"]))
        assert "--maxmemory " in command, name
        assert "--maxmemory-policy noeviction" in command, name


# --- 7. Numbers from SAI


async def test_token_counts_from_sai_beyond_the_ceiling_are_ignored(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str], tmp_path: Path
) -> None:
    sai.default = Reply(headers={"prompttokens": "1000000000000000", "completiontokens": "1"})
    proxy = await make_proxy(LIMITS_CLIENT_TPM="10000", LIMITS_CLIENT_BUDGET="100000", **store)
    for _ in range(3):
        response = await proxy.post("/v1/chat/completions", json=HI)
        assert response.status == 200
        assert (await response.json())["usage"]["prompt_tokens"] == 1  # the estimate
        await settled(proxy)
    assert proxy.app[LIMITS].mode == ("shared" if store else "local")
    await asyncio.sleep(0.2)  # the log's listener thread writes the lines
    warnings = [line for line in log_lines(tmp_path) if "token count ignored" in line]
    assert len(warnings) == 3


async def test_a_token_count_of_ten_to_the_thirty_is_not_a_500(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    sai.default = Reply(headers={"prompttokens": "1" + "0" * 30, "completiontokens": "2"})
    proxy = await make_proxy()
    response = await proxy.post("/v1/chat/completions", json=HI)
    assert response.status == 200
    assert (await response.json())["usage"]["completion_tokens"] == 2


# --- 9. Reservations larger than a limit, and whose excess


async def test_a_reservation_larger_than_the_whole_budget_runs_on_an_untouched_budget(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.default = Reply(headers={"prompttokens": "10", "completiontokens": "5"})
    proxy = await make_proxy(LIMITS_CLIENT_BUDGET="20000", **store)
    first = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 32_000})
    assert first.status == 200
    await settled(proxy)
    second = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 32_000})
    assert second.status == 429
    error = (await second.json())["error"]
    assert error["code"] == "insufficient_quota"
    assert "spent" not in error["message"]
    assert "19985 tokens left" in error["message"]
    small = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 100})
    assert small.status == 200


async def test_one_clients_huge_answer_does_not_raise_another_clients_reservation(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    proxy = await make_proxy(
        PROXY_API_KEYS="key-a,key-b", LIMITS_GLOBAL_TPM="100000", **store
    )  # fmt: skip
    sai.script(Reply(headers={"prompttokens": "90000", "completiontokens": "1"}))
    a = {"Authorization": "Bearer key-a"}
    b = {"Authorization": "Bearer key-b"}
    assert (await proxy.post("/v1/chat/completions", json=HI, headers=a)).status == 200
    await settled(proxy)
    statuses = []
    for _ in range(3):
        response = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 100},
                                    headers=b)  # fmt: skip
        statuses.append(response.status)
        await settled(proxy)
    assert statuses == [200, 200, 200]


# --- 10. Several workers without a store


def test_workers_without_a_store_refuse_to_start_when_limits_are_set(tmp_path: Path) -> None:
    env = {**base_env(FakeSai(), tmp_path), "SAI_URL": "http://127.0.0.1:9", "WORKERS": "2"}
    with pytest.raises(SettingsError, match=r"WORKERS.*LIMITS_URL"):
        load_settings({**env, "LIMITS_CLIENT_RPM": "5"})
    assert load_settings({**env, "LIMITS_CLIENT_RPM": "5", "LIMITS_URL": "redis://x:1/0"})
    assert load_settings(env).workers == 2


def _today() -> str:
    from saiproxy.limits.usage import dates

    return dates(1)[0]
