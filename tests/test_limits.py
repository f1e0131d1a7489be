"""Per-client and global limits, budgets and usage: in the process and in a real Valkey."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path
from typing import Any

import redis

from bench.valkey import ValkeyServer
from saiproxy.limits.gate import duration
from saiproxy.limits.identity import digest
from saiproxy.limits.limits import LIMITS

from .conftest import CONFIG, FakeSai, MakeProxy, Reply, chat, log_lines

HI = chat(("user", "Hi"))
TOKENS = {"prompttokens": "10", "completiontokens": "5"}


def limits_of(proxy: Any) -> Any:
    return proxy.app[LIMITS]


async def test_requests_per_minute_refused_in_openai_shape(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    proxy = await make_proxy(LIMITS_CLIENT_RPM="2", **store)
    for left in ("1", "0"):
        response = await proxy.post("/v1/chat/completions", json=HI)
        assert response.status == 200
        assert response.headers["x-ratelimit-limit-requests"] == "2"
        assert response.headers["x-ratelimit-remaining-requests"] == left
        assert re.fullmatch(r"\d+(ms|s|m\d+s)", response.headers["x-ratelimit-reset-requests"])
    response = await proxy.post("/v1/chat/completions", json=HI)
    assert response.status == 429
    body = await response.json()
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "requests per minute" in body["error"]["message"]
    wait_ms = int(response.headers["retry-after-ms"])
    assert 55_000 < wait_ms <= 60_000
    assert response.headers["Retry-After"] == str(-(-wait_ms // 1000))
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in response.headers
    mode = "shared" if store else "local"
    assert response.headers["X-Saiproxy-Limits"] == mode
    assert len(sai.received) == 2  # the refused request never reached SAI


async def test_messages_headers_on_streams_and_refusal_in_anthropic_shape(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    proxy = await make_proxy(LIMITS_CLIENT_RPM="1", LIMITS_CLIENT_TPM="100000", **store)
    body = {"model": "m", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    response = await proxy.post("/v1/messages", json=body)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", response.headers["anthropic-ratelimit-requests-reset"]
    )
    assert response.headers["anthropic-ratelimit-tokens-limit"] == "100000"
    # Reserved: the prompt's estimate (1 token) and max_tokens.
    assert response.headers["anthropic-ratelimit-tokens-remaining"] == str(100000 - 101)
    assert "x-ratelimit-limit-requests" not in response.headers
    await response.read()
    refused = await proxy.post("/v1/messages", json=body)
    assert refused.status == 429
    error = await refused.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "rate_limit_error"
    assert "requests per minute" in error["error"]["message"]
    assert refused.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert int(refused.headers["retry-after-ms"]) > 0


async def test_tokens_corrected_to_the_real_count(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.default = Reply(headers=TOKENS)
    proxy = await make_proxy(LIMITS_CLIENT_TPM="1000", **store)
    first = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 500})
    assert first.status == 200
    # Reserved 1 + 500 at admission.
    assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - 501)
    await asyncio.sleep(0.1)  # the correction is sent once the answer is out
    second = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 500})
    assert second.status == 200
    # Corrected to SAI's 10 + 5, then 501 more reserved.
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 15 - 501)
    await asyncio.sleep(0.1)
    # 30 used: 981 more do not fit.
    refused = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 980})
    assert refused.status == 429
    assert "tokens per minute" in (await refused.json())["error"]["message"]
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(1000 - 30)


async def test_reservations_learn_what_answers_cost_beyond_them(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    # SAI counts the template's text and ignores max_tokens: 100 + 50 against 1 + 10 reserved.
    sai.default = Reply(headers={"prompttokens": "100", "completiontokens": "50"})
    proxy = await make_proxy(LIMITS_CLIENT_TPM="10000", **store)

    async def remaining_after_one() -> int:
        response = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 10})
        assert response.status == 200
        await asyncio.sleep(0.1)  # settled
        return int(response.headers["x-ratelimit-remaining-tokens"])

    assert await remaining_after_one() == 10000 - 11  # nothing learned yet
    # 150 used; the next reserves its own 11 and the excess seen, 139.
    assert await remaining_after_one() == 10000 - 150 - 150
    sai.default = Reply(headers={"prompttokens": "3", "completiontokens": "2"})
    assert await remaining_after_one() == 10000 - 300 - 150  # this one costs 5
    # A smaller excess (0) brings the learned one down by a quarter: 139 - 35.
    assert await remaining_after_one() == 10000 - 305 - (11 + 104)
    sai.default = Reply(headers={"prompttokens": "400", "completiontokens": "11"})
    assert await remaining_after_one() == 10000 - 310 - (11 + 78)
    # A larger one is learned at once: 411 - 11.
    assert await remaining_after_one() == 10000 - 721 - (11 + 400)


async def test_a_stream_cut_by_its_client_costs_what_sai_counted(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.default = Reply(
        body=["a" * 40] * 5,
        chunk_delay=0.3,
        headers={"prompttokens": "100", "completiontokens": "50"},
    )
    proxy = await make_proxy(LIMITS_CLIENT_TPM="10000", **store)
    stream = await proxy.post("/v1/chat/completions", json={**HI, "stream": True, "max_tokens": 10})
    assert stream.status == 200
    assert await stream.content.readany()
    stream.close()  # the client hangs up after the first piece
    await asyncio.sleep(0.3)
    sai.default = Reply(headers=TOKENS)
    response = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 10})
    # The cut stream cost SAI's 150 (not the prompt's estimate, 1), and the next request
    # reserves its 11 and the 139 that one cost beyond its reservation.
    assert response.headers["x-ratelimit-remaining-tokens"] == str(10000 - 150 - 150)


async def test_output_floor_without_max_tokens(
    make_proxy: MakeProxy, store: dict[str, str]
) -> None:
    proxy = await make_proxy(LIMITS_CLIENT_TPM="1000", LIMITS_OUTPUT_RESERVE="600", **store)
    response = await proxy.post("/v1/chat/completions", json=HI)
    assert response.headers["x-ratelimit-remaining-tokens"] == str(1000 - 601)


async def test_concurrency_counts_streams_until_they_end(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.default = Reply(body=["a", "b", "c"], chunk_delay=0.3)
    proxy = await make_proxy(LIMITS_CLIENT_CONCURRENCY="1", **store)
    stream = await proxy.post("/v1/chat/completions", json={**HI, "stream": True})
    assert stream.status == 200
    refused = await proxy.post("/v1/chat/completions", json=HI)
    assert refused.status == 429
    assert "concurrent requests" in (await refused.json())["error"]["message"]
    await stream.read()
    await asyncio.sleep(0.1)
    sai.default = Reply()
    assert (await proxy.post("/v1/chat/completions", json=HI)).status == 200


async def test_budget_spent_is_final(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.default = Reply(headers={"prompttokens": "300", "completiontokens": "300"})
    proxy = await make_proxy(
        LIMITS_CLIENT_BUDGET="1000", LIMITS_OUTPUT_RESERVE="100", LIMITS_BUDGET_PERIOD="month",
        **store,
    )  # fmt: skip
    assert (await proxy.post("/v1/chat/completions", json=HI)).status == 200
    await asyncio.sleep(0.1)
    # 600 spent: 101 more fit.
    assert (await proxy.post("/v1/chat/completions", json=HI)).status == 200
    await asyncio.sleep(0.1)
    refused = await proxy.post("/v1/chat/completions", json=HI)
    assert refused.status == 429
    assert refused.headers["x-should-retry"] == "false"
    error = (await refused.json())["error"]
    assert error["type"] == error["code"] == "insufficient_quota"
    assert int(refused.headers["retry-after-ms"]) > 60_000  # the end of the month


async def test_clients_are_counted_apart_by_hashed_key(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path, store: dict[str, str]
) -> None:
    proxy = await make_proxy(LIMITS_CLIENT_RPM="1", PROXY_API_KEYS="team-a-key,team-b-key", **store)
    for key in ("team-a-key", "team-b-key"):
        ok = await proxy.post("/v1/chat/completions", json=HI, headers={"x-api-key": key})
        assert ok.status == 200
    refused = await proxy.post(
        "/v1/chat/completions", json=HI, headers={"Authorization": "Bearer team-a-key"}
    )
    assert refused.status == 429
    # A user's own SAI key is a client of its own (no proxy key required here).
    await asyncio.sleep(0.1)
    rows = await limits_of(proxy).usage([_today()])
    by_client = {row.client: row for row in rows}
    a, b = f"key-{digest('team-a-key')}", f"key-{digest('team-b-key')}"
    assert by_client[a].requests == 1 and by_client[a].limited == 1
    assert by_client[b].requests == 1 and by_client[b].limited == 0
    metrics = await (await proxy.get("/metrics", headers={"x-api-key": "team-a-key"})).text()
    assert f'saiproxy_client_requests_total{{client="{a}"}} 1.0' in metrics
    assert f'saiproxy_client_limited_requests_total{{client="{a}"}} 1.0' in metrics
    await proxy.close()  # the log writer writes everything queued
    lines = log_lines(tmp_path)
    assert any(f'"client": "{a}"' in line and "request limited" in line for line in lines)
    assert not any("team-a-key" in line for line in lines)  # the key never


async def test_user_keys_and_anonymous_and_global(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    proxy = await make_proxy(LIMITS_CLIENT_RPM="1", LIMITS_GLOBAL_RPM="3", **store)
    user = {"user-api-key": "sk-user-secret-1"}
    # Until SAI has accepted the user's key, its requests are anonymous's.
    assert (await proxy.post("/v1/chat/completions", json=HI, headers=user)).status == 200
    await asyncio.sleep(0.1)  # settled: SAI accepted the key
    # Now the key is its own client, and not the shared credentials: the global limit is
    # not touched.
    assert (await proxy.post("/v1/chat/completions", json=HI, headers=user)).status == 200
    refused = await proxy.post("/v1/chat/completions", json=HI)  # anonymous: 1 per minute
    assert refused.status == 429
    await asyncio.sleep(0.1)
    rows = {row.client: row for row in await limits_of(proxy).usage([_today()])}
    assert set(rows) == {"anonymous", f"user-{digest('sk-user-secret-1')}"}
    assert rows["anonymous"].requests == 1 and rows["anonymous"].limited == 1
    assert rows[f"user-{digest('sk-user-secret-1')}"].requests == 1


async def test_limits_off_by_default_no_headers(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    response = await proxy.post("/v1/chat/completions", json=HI)
    assert response.status == 200
    assert LIMITS not in proxy.app
    assert not [name for name in response.headers if "ratelimit" in name.lower()]


def test_reset_durations() -> None:
    assert duration(20) == "20ms"
    assert duration(1000) == "1s"
    assert duration(1001) == "2s"
    assert duration(360_000) == "6m0s"
    assert duration(3_723_000) == "1h2m3s"


def _today() -> str:
    from saiproxy.limits.usage import dates

    return dates(1)[0]


async def test_usage_endpoint_json(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.default = Reply(headers=TOKENS)
    proxy = await make_proxy(LIMITS_CLIENT_RPM="10", ADMIN_API_KEYS="admin-key", **store)
    await proxy.post("/v1/chat/completions", json=HI)
    await asyncio.sleep(0.1)
    admin = {"Authorization": "Bearer admin-key"}
    data = await (await proxy.get("/limits/usage", headers=admin)).json()
    assert data["rows"] == [
        {"date": _today(), "client": "anonymous", "requests": 1, "input_tokens": 10,
         "output_tokens": 5, "limited": 0}
    ]  # fmt: skip
    assert data["next_cursor"] is None
    json.dumps(data)


async def test_limits_table_in_the_toml_file(make_proxy: MakeProxy, tmp_path: Path) -> None:
    config = tmp_path / "limits.toml"
    config.write_text('[limits]\nclient_rpm = 1\nbudget_period = "month"\n')
    proxy = await make_proxy(SAIPROXY_CONFIG=str(config))
    assert (await proxy.post("/v1/chat/completions", json=HI)).status == 200
    assert (await proxy.post("/v1/chat/completions", json=HI)).status == 429
    assert limits_of(proxy).config.period == "month"


async def test_store_unreachable_from_the_start_uses_the_local_share(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    from bench.fake_sai import free_port

    proxy = await make_proxy(
        LIMITS_URL=f"redis://127.0.0.1:{free_port()}/0", LIMITS_CLIENT_RPM="4",
        LIMITS_REPLICAS="2", LIMITS_PROBE_INTERVAL="30",
    )  # fmt: skip
    statuses = []
    for _ in range(3):
        response = await proxy.post("/v1/chat/completions", json=HI)
        statuses.append(response.status)
        assert response.headers["X-Saiproxy-Limits"] == "fallback"
    assert statuses == [200, 200, 429]  # 4 / 2 replicas
    metrics = await (await proxy.get("/metrics")).text()
    assert 'saiproxy_limits_mode{mode="fallback"} 1.0' in metrics
    await proxy.close()  # the log writer writes everything queued
    assert any("limits store unreachable" in line for line in log_lines(tmp_path))


async def _usage_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    import os
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "saiproxy", "usage", *args,
        env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_usage_command_reads_the_store_or_the_process(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str], tmp_path: Path
) -> None:
    sai.default = Reply(headers=TOKENS)
    proxy = await make_proxy(
        LIMITS_CLIENT_RPM="1", PROXY_API_KEYS="cli-key", ADMIN_API_KEYS="admin-key", **store
    )
    for _ in range(2):
        await proxy.post("/v1/chat/completions", json=HI, headers={"x-api-key": "cli-key"})
    await asyncio.sleep(0.1)
    env = {
        "SAIPROXY_CONFIG": CONFIG,
        "PORT": str(proxy.port),
        "PROXY_API_KEYS": "cli-key",
        "ADMIN_API_KEYS": "admin-key",
        **store,
    }
    code, out, err = await _usage_cli(env, "--json")
    assert code == 0, err
    data = json.loads(out)
    client = f"key-{digest('cli-key')}"
    assert data["rows"] == [
        {"date": _today(), "client": client, "requests": 1, "input_tokens": 10,
         "output_tokens": 5, "limited": 1}
    ]  # fmt: skip
    assert data["source"] == (
        "the limits store" if store else f"the proxy on 127.0.0.1:{proxy.port}"
    )
    code, out, _ = await _usage_cli(env)
    assert code == 0 and client in out and "requests" in out.splitlines()[1]
    assert "cli-key" not in out and "admin-key" not in out


async def test_scripts_flushed_from_the_store_are_sent_again(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    sai.default = Reply(headers=TOKENS)
    proxy = await make_proxy(LIMITS_URL=valkey.url, LIMITS_CLIENT_TPM="1000")
    first = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 100})
    assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - 101)
    await asyncio.sleep(0.1)
    valkey.command("SCRIPT", "FLUSH")  # as after a restart: EVALSHA answers NOSCRIPT
    second = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 100})
    assert second.status == 200
    assert second.headers["X-Saiproxy-Limits"] == "shared"
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 15 - 101)
    await asyncio.sleep(0.1)
    valkey.command("SCRIPT", "FLUSH")
    third = await proxy.post("/v1/chat/completions", json={**HI, "max_tokens": 100})
    # The second's correction went through although the script had to be loaded again.
    assert third.headers["x-ratelimit-remaining-tokens"] == str(1000 - 30 - 101)


async def test_several_prompts_are_one_admission(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.default = Reply(headers=TOKENS)
    proxy = await make_proxy(LIMITS_CLIENT_RPM="1", LIMITS_CLIENT_TPM="10000", **store)
    body = {"model": "sai-model", "prompt": ["one", "two"], "max_tokens": 50}
    first = await proxy.post("/v1/completions", json=body)
    assert first.status == 200
    assert len((await first.json())["choices"]) == 2
    # One request: both prompts' reservations (1 + 50 each).
    assert first.headers["x-ratelimit-remaining-tokens"] == str(10000 - 102)
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    refused = await proxy.post("/v1/completions", json=body)
    assert refused.status == 429
    assert len(sai.received) == 2
    await asyncio.sleep(0.1)
    rows = await limits_of(proxy).usage([_today()])
    assert [(r.requests, r.input_tokens, r.output_tokens, r.limited) for r in rows] == [
        (1, 20, 10, 1)
    ]


async def test_a_lease_whose_settlement_failed_ends_when_the_store_is_back(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    # The store stalls while a stream's client hangs up: the settlement times out.
    # Its lease must not wait out LIMITS_LEASE (30 s): it ends once the store answers.
    sai.default = Reply(body=["a"] * 40, chunk_delay=0.1)
    proxy = await make_proxy(
        LIMITS_URL=valkey.url, LIMITS_CLIENT_CONCURRENCY="5",
        LIMITS_TIMEOUT="0.2", LIMITS_PROBE_INTERVAL="0.2",
    )  # fmt: skip
    stream = await proxy.post("/v1/chat/completions", json={**HI, "stream": True})
    assert stream.status == 200
    await stream.content.readany()
    store = redis.Redis.from_url(valkey.url, socket_timeout=5)
    (key,) = store.keys("saiproxy:c:*")
    assert store.zcard(key) == 1
    assert valkey.process is not None
    valkey.process.send_signal(signal.SIGSTOP)
    try:
        stream.close()  # the client hangs up: the request ends, its settlement times out
        await asyncio.sleep(0.8)
    finally:
        valkey.process.send_signal(signal.SIGCONT)
    for _ in range(50):
        if store.zcard(key) == 0:
            break
        await asyncio.sleep(0.1)
    assert store.zcard(key) == 0
    store.close()


def test_the_calendar_of_a_second_is_reused_and_turns_at_midnight() -> None:
    from datetime import UTC, datetime

    from saiproxy.limits.local import Calendar

    night = int(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()) * 1000
    day, month = Calendar("day"), Calendar("month")
    # Twice within one second (the second time from the cache), then past midnight.
    assert day.at(night + 250) == ("2026-12-31", "2026-12-31", 750)
    assert day.at(night + 750) == ("2026-12-31", "2026-12-31", 250)
    assert month.at(night + 500) == ("2026-12-31", "2026-12", 500)
    assert day.at(night + 1250) == ("2027-01-01", "2027-01-01", 86_400_000 - 250)
    assert month.at(night + 1000) == ("2027-01-01", "2027-01", 31 * 86_400_000)
