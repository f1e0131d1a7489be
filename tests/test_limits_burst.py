"""The limits' breaker judges the store, not the replica's loop: a cold burst of agent-sized
streams on 8 replicas with the store healthy, a loop blocked past LIMITS_TIMEOUT, and what
an admission that timed out for real took in the store (its late grant), reconciled with the
request admitted locally."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from bench.fake_sai import raise_nofile
from bench.limits_cluster import FALLBACK_LOG, Cluster, cold_burst
from bench.valkey import ValkeyServer
from saiproxy.limits.base import Settlement
from saiproxy.limits.identity import Client
from saiproxy.limits.limits import LIMITS

from .conftest import FakeSai, MakeProxy, Reply, chat

LIMIT = 4
TOKENS = {"prompttokens": "7", "completiontokens": "3"}


@pytest.mark.parametrize("burst", [1, 2])
async def test_a_cold_burst_of_agent_streams_admits_none_over_the_limit_with_the_store_healthy(
    tmp_path: Path, burst: int
) -> None:
    # 500 streams at once of one client on 8 fresh replicas, each carrying an 80-turn
    # conversation (about 80 KB): parsing them keeps every replica's loop busy past
    # LIMITS_TIMEOUT (0.25 s, the default), while the store answers in milliseconds.
    raise_nofile()
    cluster = Cluster(tmp_path, 8, {"LIMITS_CLIENT_CONCURRENCY": str(LIMIT)})
    try:
        cluster.start()
        result = await cold_burst(cluster, 500, "sk-burst", LIMIT)
    except BaseException:
        print(cluster.tail())
        raise
    finally:
        cluster.stop()
    print(f"burst {burst}: {result.line()}")
    assert result.failed == 0
    assert result.admitted == LIMIT and result.peak == LIMIT  # 0 over, at SAI too
    assert result.fallback_answers == 0  # no replica took the busy loop for an outage
    assert cluster.logged(FALLBACK_LOG) == 0


async def test_an_admission_that_timed_out_keeps_its_late_grant_until_the_request_ends(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    # The store stalls during an admission: the call times out for real and the request is
    # admitted by the replica's share. The store then answers: its grant (a lease) belongs
    # to the running request, which the probe must not end when the store is back; the
    # request's settlement ends it, with the request's tokens.
    sai.script(Reply(headers=TOKENS))  # the first request: the scripts get loaded
    sai.default = Reply(body=["a"] * 60, chunk_delay=0.1, headers=TOKENS)
    proxy = await make_proxy(
        LIMITS_URL=valkey.url, LIMITS_CLIENT_CONCURRENCY="5",
        LIMITS_TIMEOUT="0.2", LIMITS_PROBE_INTERVAL="0.5",
    )  # fmt: skip
    limits = proxy.app[LIMITS]
    assert (await proxy.post("/v1/chat/completions", json=chat(("user", "Hi")))).status == 200
    store = redis.Redis.from_url(valkey.url, socket_timeout=5)
    key = "saiproxy:c:client:anonymous"
    usage = f"saiproxy:usage:{datetime.now(UTC):%Y-%m-%d}"
    for _ in range(50):  # its settlement has landed: the store stalls for the next one only
        if store.hget(usage, "anonymous:input") == b"7":
            break
        await asyncio.sleep(0.02)
    assert valkey.process is not None
    valkey.process.send_signal(signal.SIGSTOP)
    try:
        stream = await proxy.post("/v1/chat/completions", json=chat(("user", "Hi"), stream=True))
        assert stream.status == 200
        assert stream.headers["X-Saiproxy-Limits"] == "fallback"
        await stream.content.readany()
    finally:
        valkey.process.send_signal(signal.SIGCONT)  # the admission the store held runs now
    try:
        for _ in range(50):
            if limits.mode == "shared":
                break
            await asyncio.sleep(0.1)
        assert limits.mode == "shared"  # the probe found the store and ended its orphans
        for _ in range(10):  # the request runs: its lease stays, once, under its own id
            assert store.zcard(key) == 1
            assert store.zrange(key, 0, -1) == [lease.encode() for lease in limits.leases]
            await asyncio.sleep(0.1)
    finally:
        stream.close()  # the request ends: its settlement ends the store's grant
    for _ in range(50):
        if store.zcard(key) == 0:
            break
        await asyncio.sleep(0.1)
    assert store.zcard(key) == 0
    # Settled in the store with the request's tokens (SAI's counts), not dropped.
    assert store.hmget(usage, "anonymous:requests", "anonymous:input", "anonymous:output") == [
        b"2",
        b"14",
        b"6",
    ]
    store.close()


async def test_a_loop_busy_past_the_timeout_is_not_a_dead_store(
    make_proxy: MakeProxy, valkey: ValkeyServer
) -> None:
    # The replica's loop is blocked for longer than LIMITS_TIMEOUT while an admission is on
    # its way, the store answering at once: the timer and the reply are due in the same
    # turn. The admission gets its reply; the breaker stays closed.
    proxy = await make_proxy(LIMITS_URL=valkey.url, LIMITS_CLIENT_CONCURRENCY="5")
    limits = proxy.app[LIMITS]
    client = Client("anonymous", "anonymous", True)
    loop = asyncio.get_running_loop()
    for _ in range(4):
        loop.call_soon(time.sleep, 0.4)  # a turn of the loop parsing a burst, say
        grant = await limits.admit(client, 10)
        assert grant.verdict.granted and limits.mode == "shared"
        limits.settle(grant, Settlement(1, 1))
    # A store that stops answering is still an outage, found within two windows.
    assert valkey.process is not None
    valkey.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        grant = await limits.admit(client, 10)
        waited = time.monotonic() - started
    finally:
        valkey.process.send_signal(signal.SIGCONT)
    assert grant.verdict.granted and limits.mode == "fallback"
    assert 0.25 <= waited < 0.6, waited


async def test_a_late_grant_for_a_request_that_already_ended_is_settled_at_once(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    # As above, but the request ends while the store still stalls: when its grant lands it
    # is settled at once, with the tokens the request was settled with.
    sai.script(Reply(headers=TOKENS))
    sai.default = Reply(body=["a"] * 60, chunk_delay=0.1, headers=TOKENS)
    proxy = await make_proxy(
        LIMITS_URL=valkey.url, LIMITS_CLIENT_CONCURRENCY="5",
        LIMITS_TIMEOUT="0.2", LIMITS_PROBE_INTERVAL="0.5",
    )  # fmt: skip
    limits = proxy.app[LIMITS]
    assert (await proxy.post("/v1/chat/completions", json=chat(("user", "Hi")))).status == 200
    store = redis.Redis.from_url(valkey.url, socket_timeout=5)
    usage = f"saiproxy:usage:{datetime.now(UTC):%Y-%m-%d}"
    for _ in range(50):
        if store.hget(usage, "anonymous:input") == b"7":
            break
        await asyncio.sleep(0.02)
    assert valkey.process is not None
    valkey.process.send_signal(signal.SIGSTOP)
    try:
        stream = await proxy.post("/v1/chat/completions", json=chat(("user", "Hi"), stream=True))
        assert stream.headers["X-Saiproxy-Limits"] == "fallback"
        await stream.content.readany()
        stream.close()  # the request ends (SAI's counts came with the first piece)
        await asyncio.sleep(0.1)
    finally:
        valkey.process.send_signal(signal.SIGCONT)
    for _ in range(50):
        if limits.mode == "shared" and store.hget(usage, "anonymous:input") == b"14":
            break
        await asyncio.sleep(0.1)
    assert store.zcard("saiproxy:c:client:anonymous") == 0
    assert store.hmget(usage, "anonymous:requests", "anonymous:input", "anonymous:output") == [
        b"2",
        b"14",
        b"6",
    ]
    store.close()
