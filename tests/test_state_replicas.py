"""Stored Responses and Conversations shared by several proxies on one real Valkey server.

Each proxy is an application of its own (its own state client and connection),
as replicas are: a continuation sent to another one right after the answer
must find the whole chain, a client must find nothing of another's on any of
them, and everything stored must expire.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import openai
import pytest
from redis.asyncio import Redis

from bench.valkey import ValkeyServer

from .conftest import FakeSai, MakeProxy, Received, Reply, openai_url

# The count: 1,000 continuations over 8 proxies (a few seconds).
CONTINUATIONS = int(os.environ.get("STATE_CONTINUATIONS", "1000"))
PROXIES = int(os.environ.get("STATE_PROXIES", "8"))
TURNS = 11  # 100 chains of 10 continuations
KEY_A, KEY_B = "proxy-key-a-5c1e", "proxy-key-b-9d2f"


def _client(proxy: Any, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=openai_url(proxy), api_key=key, max_retries=0)


def echo(call: Received) -> Reply:
    return Reply(body=f"re: {call.user}")


async def test_continuations_on_another_replica_right_after_the_answer(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    proxies = [await make_proxy(STATE_URL=valkey.url) for _ in range(PROXIES)]
    clients = [_client(proxy) for proxy in proxies]
    sai.answer = echo
    chains = CONTINUATIONS // (TURNS - 1)

    async def chain(number: int) -> None:
        previous: str | None = None
        for turn in range(TURNS):
            # Each turn on the replica after the previous one's: never the same.
            client = clients[(number + turn) % PROXIES]
            extra: dict[str, Any] = {"previous_response_id": previous} if previous else {}
            text = f"c{number}-t{turn}"
            if number % 2:
                async with client.responses.stream(
                    model="sai-model", input=text, **extra
                ) as events:
                    response = await events.get_final_response()
            else:
                response = await client.responses.create(model="sai-model", input=text, **extra)
            assert response.output_text == f"re: {text}"
            previous = response.id

    try:
        await asyncio.gather(*(chain(number) for number in range(chains)))
    finally:
        for client in clients:
            await client.close()
    assert len(sai.received) == chains * TURNS
    continued = 0
    for call in sai.received:
        number, turn = (int(part[1:]) for part in call.user.split("-"))
        expected = []
        for earlier in range(turn):
            expected += [f"c{number}-t{earlier}", f"re: c{number}-t{earlier}"]
        assert [m["content"] for m in call.json["chatMessages"]] == [*expected, call.user]
        continued += turn > 0
    assert continued == chains * (TURNS - 1) == CONTINUATIONS


async def _expect_404(call: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        await call


async def test_a_client_finds_nothing_of_another_on_any_replica(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    env = {"STATE_URL": valkey.url, "PROXY_API_KEYS": f"{KEY_A},{KEY_B}"}
    first, second = await make_proxy(**env), await make_proxy(**env)
    sai.answer = echo
    async with _client(first, KEY_A) as a, _client(second, KEY_B) as b:
        mine = await a.responses.create(model="sai-model", input="secret of A")
        conversation = await a.conversations.create(
            items=[{"type": "message", "role": "user", "content": "A's words"}]
        )
        listed = await a.conversations.items.list(conversation.id)
        item = listed.data[0].id  # type: ignore[union-attr]
        calls = len(sai.received)
        for attempt in (
            b.responses.retrieve(mine.id),
            b.responses.input_items.list(mine.id),
            b.responses.delete(mine.id),
            b.responses.create(model="sai-model", input="x", previous_response_id=mine.id),
            b.conversations.retrieve(conversation.id),
            b.conversations.delete(conversation.id),
            b.conversations.items.list(conversation.id),
            b.conversations.items.retrieve(item, conversation_id=conversation.id),
            b.conversations.items.delete(item, conversation_id=conversation.id),
            b.responses.create(model="sai-model", input="x", conversation=conversation.id),
        ):
            await _expect_404(attempt)
        assert len(sai.received) == calls
    async with _client(second, KEY_A) as a_elsewhere:
        assert (await a_elsewhere.responses.retrieve(mine.id)).output_text == "re: secret of A"
        await a_elsewhere.responses.delete(mine.id)
    async with _client(first, KEY_A) as a:
        await _expect_404(a.responses.retrieve(mine.id))


async def test_everything_stored_has_a_ttl_and_expires(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    proxy = await make_proxy(STATE_URL=valkey.url, RESPONSES_TTL="1")
    sai.answer = echo
    redis = Redis.from_url(valkey.url)
    try:
        async with _client(proxy) as client:
            response = await client.responses.create(model="sai-model", input="hi")
            conversation = await client.conversations.create(
                items=[{"type": "message", "role": "user", "content": "hello"}]
            )
            await client.responses.create(
                model="sai-model", input="more", conversation=conversation.id
            )
            keys = await redis.keys("*")
            assert len(keys) >= 8  # records, items, the list, the byte counts
            for key in keys:
                assert 0 < await redis.pttl(key) <= 2000, key  # none lives for ever
            await asyncio.sleep(1.5)
            await _expect_404(client.responses.retrieve(response.id))
            await _expect_404(client.conversations.retrieve(conversation.id))
            assert await redis.dbsize() == 0
    finally:
        await redis.aclose()


async def test_the_quota_holds_across_replicas(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    env = {"STATE_URL": valkey.url, "STATE_CLIENT_BYTES": "6000"}
    proxies = [await make_proxy(**env) for _ in range(2)]
    sai.answer = echo
    clients = [_client(proxy) for proxy in proxies]
    try:
        kept: list[str] = []
        with pytest.raises(openai.BadRequestError) as refused:
            for turn in range(50):
                response = await clients[turn % 2].responses.create(
                    model="sai-model", input=f"turn {turn} " + "w" * 300
                )
                kept.append(response.id)
        assert refused.value.body["code"] == "storage_quota_exceeded"  # type: ignore[index]
        assert 0 < len(kept) < 50 and len(sai.received) == len(kept)
        answered = await clients[0].responses.create(model="sai-model", input="w", store=False)
        assert answered.output_text == "re: w"
        # Deleting gives the bytes back, on any replica.
        for number, response_id in enumerate(kept):
            await clients[number % 2].responses.delete(response_id)
        again = await clients[1].responses.create(model="sai-model", input="w" * 300)
        assert (await clients[0].responses.retrieve(again.id)).id == again.id
    finally:
        for client in clients:
            await client.close()


async def test_the_store_down_is_a_503_not_a_silent_answer(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    proxy = await make_proxy(STATE_URL=valkey.url, STATE_TIMEOUT="0.5")
    valkey.stop()
    try:
        async with _client(proxy) as client:
            with pytest.raises(openai.InternalServerError) as failed:
                await client.responses.create(model="sai-model", input="hi")
            assert failed.value.status_code == 503
            assert failed.value.body["code"] == "state_unavailable"  # type: ignore[index]
            # Without storing, the answer does not need the store.
            answered = await client.responses.create(model="sai-model", input="hi", store=False)
            assert answered.status == "completed"
    finally:
        valkey.start()
    assert len(sai.received) == 1
