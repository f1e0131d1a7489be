"""Background Responses with the openai Python SDK (saiproxy/protocols/background.py).

Create and poll, cancel from another replica, stream and resume with
``starting_after``, another client's 404; and 8 saiproxy processes on
one real Valkey, one SIGKILLed with background responses in flight: every
one ends ``failed`` within the lease, read from a replica alive.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from bench.limits_cluster import Cluster
from bench.valkey import ValkeyServer

from .conftest import FakeSai, MakeProxy, Received, Reply, openai_url, run_node

KEY_A, KEY_B = "bg-key-a", "bg-key-b"
LEASE = 2.0  # BACKGROUND_LEASE of these tests


def _client(proxy: Any, key: str = KEY_A) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=openai_url(proxy), api_key=key, max_retries=0)


def echo(call: Received) -> Reply:
    return Reply(body=f"re: {call.user}")


async def _until_ended(client: openai.AsyncOpenAI, response_id: str) -> Any:
    for _ in range(300):
        response = await client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        await asyncio.sleep(0.05)
    raise AssertionError(f"{response_id} did not end")


async def test_create_then_poll_on_another_replica(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    env = {"STATE_URL": valkey.url, "PROXY_API_KEYS": f"{KEY_A},{KEY_B}"}
    first, second = await make_proxy(**env), await make_proxy(**env)
    sai.answer = lambda call: Reply(body=f"re: {call.user}", delay=0.3)
    async with _client(first) as a, _client(second) as elsewhere:
        created = await a.responses.create(model="sai-model", input="hello", background=True)
        assert created.status == "queued" and created.background is True
        ended = await _until_ended(elsewhere, created.id)
        assert ended.status == "completed" and ended.output_text == "re: hello"
        # It continues like any stored response, on any replica.
        later = await elsewhere.responses.create(
            model="sai-model", input="again", previous_response_id=created.id
        )
        assert later.output_text == "re: again"
    async with _client(second, KEY_B) as b:
        with pytest.raises(openai.NotFoundError):
            await b.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await b.responses.cancel(created.id)


async def test_cancel_from_another_replica(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    env = {"STATE_URL": valkey.url, "PROXY_API_KEYS": KEY_A, "BACKGROUND_LEASE": str(LEASE)}
    first, second = await make_proxy(**env), await make_proxy(**env)
    sai.default = Reply(body="too late", delay=30)
    async with _client(first) as a, _client(second) as elsewhere:
        created = await a.responses.create(model="sai-model", input="slow", background=True)
        for _ in range(100):  # SAI has it
            if sai.received:
                break
            await asyncio.sleep(0.02)
        cancelled = await elsewhere.responses.cancel(created.id)
        assert cancelled.status == "cancelled"
        assert (await a.responses.retrieve(created.id)).status == "cancelled"
        # Cancelling what has ended answers it as it is.
        assert (await elsewhere.responses.cancel(created.id)).status == "cancelled"
        done = await a.responses.create(model="sai-model", input="x", store=True)
        with pytest.raises(openai.BadRequestError):
            await a.responses.cancel(done.id)  # not a background response


async def test_stream_then_resume_after_a_sequence_number(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(PROXY_API_KEYS=KEY_A)
    sai.answer = echo
    async with _client(proxy) as client:
        stream = await client.responses.create(
            model="sai-model", input="stream me", background=True, stream=True
        )
        events = [event async for event in stream]
        numbers = [event.sequence_number for event in events]
        assert numbers == list(range(len(events)))
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        response_id = events[0].response.id
        assert events[-1].response.output_text == "re: stream me"
        resumed = await client.responses.retrieve(response_id, stream=True, starting_after=2)
        again = [event async for event in resumed]
        assert [e.sequence_number for e in again] == numbers[3:]
        assert [e.type for e in again] == [e.type for e in events[3:]]
        with pytest.raises(openai.BadRequestError):  # created without stream: nothing to replay
            plain = await client.responses.create(model="sai-model", input="x", background=True)
            await _until_ended(client, plain.id)
            await client.responses.retrieve(plain.id, stream=True)


async def test_background_work_counts_against_the_clients_limits(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    """One request at a time for this client: a running background response is that one."""
    proxy = await make_proxy(PROXY_API_KEYS=KEY_A, LIMITS_CLIENT_CONCURRENCY="1")
    sai.default = Reply(body="slow answer", delay=1.5)
    async with _client(proxy) as client:
        created = await client.responses.create(model="sai-model", input="x", background=True)
        for _ in range(100):  # SAI has it: the background response holds the client's slot
            if sai.received:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(openai.RateLimitError):
            await client.responses.create(model="sai-model", input="y", store=False)
        assert (await _until_ended(client, created.id)).status == "completed"
        sai.default = Reply(body="fast")
        assert (await client.responses.create(model="sai-model", input="z")).output_text == "fast"


async def test_the_node_sdk_polls_cancels_and_resumes(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.answer = lambda call: Reply(body=f"re: {call.user}", delay=30 if call.user == "slow" else 0)
    result = await run_node("responses_background.mjs", openai_url(proxy))
    assert result["first"] == "queued"
    assert result["polled"] == ["completed", "re: poll me"]
    assert result["cancelled"] == "cancelled"
    assert result["numbers"] == list(range(len(result["numbers"])))
    assert result["last"] == ["response.completed", "re: stream me"]
    assert result["resumed"] == result["numbers"][3:]


async def test_background_needs_store(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    async with _client(proxy) as client:
        with pytest.raises(openai.BadRequestError, match="store"):
            await client.responses.create(
                model="sai-model", input="x", background=True, store=False
            )
    assert not sai.received


# --- a replica killed


REPLICAS = 8  # as the service runs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    group = Cluster(
        tmp_path_factory.mktemp("background"),
        REPLICAS,
        {"BACKGROUND_LEASE": str(LEASE), "SHUTDOWN_TIMEOUT": "0.5"},
    )
    try:
        group.start()
        yield group
    except BaseException:
        print(group.tail())
        raise
    finally:
        group.stop()


async def test_a_killed_replicas_background_responses_end_failed_within_the_lease(
    cluster: Cluster,
) -> None:
    killed = 2
    async with openai.AsyncOpenAI(
        base_url=cluster.url(killed) + "/v1", api_key="sk-user", max_retries=0
    ) as victim, openai.AsyncOpenAI(
        base_url=cluster.url(0) + "/v1", api_key="sk-user", max_retries=0
    ) as alive:  # fmt: skip
        created = [
            await victim.responses.create(
                model="sai-model", input=f"stream:60 bg{n}", background=True,
                extra_headers={"user-api-key": "sk-background-user"},
            )
            for n in range(5)
        ]  # fmt: skip
        headers = {"user-api-key": "sk-background-user"}
        for response in created:
            seen = await alive.responses.retrieve(response.id, extra_headers=headers)
            assert seen.status in ("queued", "in_progress")
        process = cluster.signal(killed, signal.SIGKILL)
        process.wait(5)
        killed_at = time.monotonic()
        ended: dict[str, Any] = {}
        while len(ended) < len(created) and time.monotonic() - killed_at < LEASE + 10:
            for response in created:
                if response.id not in ended:
                    seen = await alive.responses.retrieve(response.id, extra_headers=headers)
                    if seen.status not in ("queued", "in_progress"):
                        ended[response.id] = (seen, time.monotonic() - killed_at)
            await asyncio.sleep(0.1)
        cluster.start_replica(killed)
    assert len(ended) == len(created)
    for seen, after in ended.values():
        assert seen.status == "failed" and seen.error.code == "server_error"
        assert "lease expired" in seen.error.message
        assert after <= LEASE + 1.5
    print(f"SIGKILL: {len(ended)} background responses failed in "
          f"{max(after for _, after in ended.values()):.1f} s (lease {LEASE:g} s)")  # fmt: skip


async def test_a_drained_replicas_background_responses_end_failed(cluster: Cluster) -> None:
    """SIGTERM: what the shutdown budget did not let end is ended ``failed``, saying why."""
    drained = 1
    headers = {"user-api-key": "sk-drained-user"}
    async with openai.AsyncOpenAI(
        base_url=cluster.url(drained) + "/v1", api_key="sk-user", max_retries=0
    ) as victim, openai.AsyncOpenAI(
        base_url=cluster.url(0) + "/v1", api_key="sk-user", max_retries=0
    ) as alive:  # fmt: skip
        created = [
            await victim.responses.create(
                model="sai-model", input=f"stream:60 drained{n}", background=True,
                extra_headers=headers,
            )
            for n in range(3)
        ]  # fmt: skip
        await asyncio.sleep(0.3)  # SAI has them
        process = cluster.signal(drained, signal.SIGTERM)
        process.wait(15)
        stopped_at = time.monotonic()
        ended = []
        for response in created:
            while time.monotonic() - stopped_at < LEASE + 10:
                seen = await alive.responses.retrieve(response.id, extra_headers=headers)
                if seen.status not in ("queued", "in_progress"):
                    ended.append(seen)
                    break
                await asyncio.sleep(0.1)
        waited = time.monotonic() - stopped_at
        cluster.start_replica(drained)
    assert [seen.status for seen in ended] == ["failed"] * len(created)
    assert all(
        "restarting" in seen.error.message or "lease expired" in seen.error.message
        for seen in ended
    )
    assert waited <= LEASE + 1.5
