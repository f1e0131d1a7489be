"""Stored Responses and Conversations in the process (the default), judged by the openai SDK.

Everything the fake SAI is sent is checked: a continuation must carry the
whole stored chain, a reference the stored item's text.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from saiproxy.state.store import STATE_STORE

from .conftest import FakeSai, MakeProxy, Received, Reply, openai_url, run_node

KEY_A, KEY_B = "proxy-key-a-5c1e", "proxy-key-b-9d2f"


def _client(proxy: Any, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=openai_url(proxy), api_key=key, max_retries=0)


def echo(call: Received) -> Reply:
    """Answer with what was asked: each answer names its question."""
    return Reply(body=f"re: {call.user}")


def history(call: Received) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in call.json.get("chatMessages", [])]


async def test_create_retrieve_list_items_and_delete(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.answer = echo
    items: Any = [{"role": "user", "content": f"part {i}"} for i in range(5)]
    async with _client(proxy) as client:
        created = await client.responses.create(model="sai-model", input=items)
        assert created.output_text == "re: part 4" and created.store is True
        retrieved = await client.responses.retrieve(created.id)
        assert retrieved.id == created.id and retrieved.output_text == "re: part 4"
        assert retrieved.output[0].id == created.output[0].id

        pages = await client.responses.input_items.list(created.id, limit=2, order="asc")
        assert len(pages.data) == 2 and pages.has_more
        listed = [item async for item in pages]  # the SDK follows ``after`` page by page
        texts = [item.content[0].text for item in listed]  # type: ignore[union-attr]
        assert texts == [f"part {i}" for i in range(5)]
        assert all(item.id.startswith("msg_") for item in listed)  # type: ignore[union-attr]
        newest = await client.responses.input_items.list(created.id, limit=2)  # desc
        assert [i.content[0].text for i in newest.data] == ["part 4", "part 3"]  # type: ignore[union-attr]
        ids = [item.id for item in listed]  # type: ignore[union-attr]
        before = await client.responses.input_items.list(
            created.id, order="asc", after=ids[0], extra_query={"before": ids[3]}
        )
        assert [item.id for item in before.data] == ids[1:3]  # type: ignore[union-attr]
        assert not before.has_more

        await client.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.input_items.list(created.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.delete(created.id)
    assert len(sai.received) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_chain_of_20_turns_sends_sai_the_whole_history(
    make_proxy: MakeProxy, sai: FakeSai, stream: bool
) -> None:
    proxy = await make_proxy()
    sai.answer = echo
    previous: str | None = None
    async with _client(proxy) as client:
        for turn in range(20):
            extra: dict[str, Any] = {"instructions": "Be brief."} if turn == 0 else {}
            if previous is not None:
                extra["previous_response_id"] = previous
            if stream:
                async with client.responses.stream(
                    model="sai-model", input=f"q{turn}", **extra
                ) as events:
                    response = await events.get_final_response()
            else:
                response = await client.responses.create(
                    model="sai-model", input=f"q{turn}", **extra
                )
            assert response.output_text == f"re: q{turn}"
            assert response.previous_response_id == previous
            previous = response.id
    assert len(sai.received) == 20
    for turn, call in enumerate(sai.received):
        expected = []
        for earlier in range(turn):
            expected += [("user", f"q{earlier}"), ("assistant", f"re: q{earlier}")]
        assert history(call) == [*expected, ("user", f"q{turn}")]
        # Instructions are not inherited (OpenAI's rule).
        assert call.json["inputs"]["system"] == ("Be brief." if turn == 0 else "")


async def test_tool_calls_and_their_outputs_are_part_of_the_chain(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Quito"}}</tool_call>'
    sai.script(Reply(body="Checking. " + call), Reply(body="18 C in Quito."))
    tool: Any = {
        "type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }  # fmt: skip
    async with _client(proxy) as client:
        first = await client.responses.create(
            model="sai-model", input="Weather in Quito?", tools=[tool]
        )
        calls = [item for item in first.output if item.type == "function_call"]
        assert len(calls) == 1
        second = await client.responses.create(
            model="sai-model",
            previous_response_id=first.id,
            tools=[tool],
            input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18"}],
        )
    assert second.output_text == "18 C in Quito."
    sent = sai.received[1].json["chatMessages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"].startswith("Checking.") and '"get_weather"' in sent[1]["content"]
    assert sent[2]["content"].startswith('<tool_result name="get_weather"')


async def test_item_reference_resolves_a_stored_item(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.answer = echo
    async with _client(proxy) as client:
        first = await client.responses.create(model="sai-model", input="Hello there")
        earlier = await client.responses.input_items.list(first.id)
        question_id, answer_id = earlier.data[0].id, first.output[0].id  # type: ignore[union-attr]
        await client.responses.create(
            model="sai-model",
            input=[
                {"type": "item_reference", "id": question_id},
                {"type": "item_reference", "id": answer_id},
                {"role": "user", "content": "And now?"},
            ],
        )
    assert history(sai.received[1]) == [
        ("user", "Hello there"), ("assistant", "re: Hello there"), ("user", "And now?"),
    ]  # fmt: skip


async def test_store_false_keeps_nothing(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    async with _client(proxy) as client:
        response = await client.responses.create(model="sai-model", input="hi", store=False)
        assert response.store is False
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError) as refused:
            await client.responses.create(
                model="sai-model", input="again", previous_response_id=response.id
            )
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert proxy.app[STATE_STORE].backend.total == 0  # type: ignore[attr-defined]
    assert len(sai.received) == 1


async def test_nothing_is_stored_unless_sai_answered(make_proxy: MakeProxy, sai: FakeSai) -> None:
    """A made-up user key: SAI refuses it (401), the explanation is the answer, nothing is kept."""
    proxy = await make_proxy()
    sai.script(Reply(status=401, body="bad key"), Reply(status=401, body="bad key"))
    async with _client(proxy) as client:
        explained = await client.responses.create(
            model="sai-model", input="hi", extra_headers={"user-api-key": "made-up-key-123"}
        )
        async with client.responses.stream(
            model="sai-model", input="hi", extra_headers={"user-api-key": "made-up-key-123"}
        ) as events:
            streamed = await events.get_final_response()
        for response in (explained, streamed):
            with pytest.raises(openai.NotFoundError):
                await client.responses.retrieve(
                    response.id, extra_headers={"user-api-key": "made-up-key-123"}
                )
    assert proxy.app[STATE_STORE].backend.total == 0  # type: ignore[attr-defined]


async def test_conversations_items_and_responses_in_a_conversation(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    sai.answer = echo
    async with _client(proxy) as client:
        conversation = await client.conversations.create(
            metadata={"topic": "demo"},
            items=[{"type": "message", "role": "user", "content": "My name is Ana."}],
        )
        assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "demo"}
        assert (await client.conversations.retrieve(conversation.id)).id == conversation.id
        updated = await client.conversations.update(conversation.id, metadata={"topic": "x"})
        assert updated.metadata == {"topic": "x"}
        added = await client.conversations.items.create(
            conversation.id,
            items=[{"type": "message", "role": "assistant", "content": "Hello Ana."},
                   {"type": "message", "role": "user", "content": "Noise"}],
        )  # fmt: skip
        assert len(added.data) == 2
        noise = added.data[1].id  # type: ignore[union-attr]
        got = await client.conversations.items.retrieve(noise, conversation_id=conversation.id)
        assert got.id == noise  # type: ignore[union-attr]
        after = await client.conversations.items.delete(noise, conversation_id=conversation.id)
        assert after.id == conversation.id
        with pytest.raises(openai.NotFoundError):
            await client.conversations.items.retrieve(noise, conversation_id=conversation.id)

        first = await client.responses.create(
            model="sai-model", input="What is my name?", conversation=conversation.id
        )
        assert first.conversation is not None and first.conversation.id == conversation.id
        second = await client.responses.create(
            model="sai-model", input="Thanks", conversation={"id": conversation.id}
        )
        assert second.output_text == "re: Thanks"
        listed = [item async for item in client.conversations.items.list(
            conversation.id, limit=2, order="asc")]  # fmt: skip
        texts = [item.content[0].text for item in listed]  # type: ignore[union-attr]
        assert texts == ["My name is Ana.", "Hello Ana.", "What is my name?",
                         "re: What is my name?", "Thanks", "re: Thanks"]  # fmt: skip
        newest = await client.conversations.items.list(conversation.id, limit=1)
        assert newest.data[0].content[0].text == "re: Thanks"  # type: ignore[union-attr]
        assert newest.has_more

        deleted = await client.conversations.delete(conversation.id)
        assert deleted.deleted and deleted.object == "conversation.deleted"
        with pytest.raises(openai.NotFoundError):
            await client.conversations.retrieve(conversation.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(
                model="sai-model", input="again", conversation=conversation.id
            )
    assert history(sai.received[1]) == [
        ("user", "My name is Ana."), ("assistant", "Hello Ana."), ("user", "What is my name?"),
        ("assistant", "re: What is my name?"), ("user", "Thanks"),
    ]  # fmt: skip


async def test_input_tokens_counts_the_chain(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.answer = echo
    async with _client(proxy) as client:
        alone = await client.responses.input_tokens.count(model="sai-model", input="x" * 400)
        first = await client.responses.create(model="sai-model", input="y" * 800)
        chained = await client.responses.input_tokens.count(
            model="sai-model", input="x" * 400, previous_response_id=first.id
        )
    assert alone.object == "response.input_tokens" and 100 <= alone.input_tokens < 110
    assert chained.input_tokens >= alone.input_tokens + 400  # the chain's 1600 characters
    assert len(sai.received) == 1


async def _expect_404(call: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        await call


async def test_a_client_sees_only_its_own_objects(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(PROXY_API_KEYS=f"{KEY_A},{KEY_B}")
    sai.answer = echo
    async with _client(proxy, KEY_A) as a, _client(proxy, KEY_B) as b:
        mine = await a.responses.create(model="sai-model", input="secret of A")
        conversation = await a.conversations.create(
            items=[{"type": "message", "role": "user", "content": "A's words"}]
        )
        item = (await a.conversations.items.list(conversation.id)).data[0].id  # type: ignore[union-attr]
        calls = len(sai.received)
        for attempt in (
            b.responses.retrieve(mine.id),
            b.responses.input_items.list(mine.id),
            b.responses.delete(mine.id),
            b.responses.create(model="sai-model", input="x", previous_response_id=mine.id),
            b.responses.input_tokens.count(input="x", previous_response_id=mine.id),
            b.conversations.retrieve(conversation.id),
            b.conversations.update(conversation.id, metadata={"a": "b"}),
            b.conversations.delete(conversation.id),
            b.conversations.items.list(conversation.id),
            b.conversations.items.create(conversation.id, items=[{"role": "user", "content": "x"}]),
            b.conversations.items.retrieve(item, conversation_id=conversation.id),
            b.conversations.items.delete(item, conversation_id=conversation.id),
            b.responses.create(model="sai-model", input="x", conversation=conversation.id),
        ):
            await _expect_404(attempt)
        assert len(sai.received) == calls  # nothing reached SAI
        # A reference to A's item is found nowhere for B: left out, never A's text.
        await b.responses.create(
            model="sai-model",
            input=[{"type": "item_reference", "id": mine.output[0].id},
                   {"role": "user", "content": "B asks"}],
        )  # fmt: skip
        assert history(sai.received[-1]) == [("user", "B asks")]
        # Everything of A's is still A's.
        assert (await a.responses.retrieve(mine.id)).output_text == "re: secret of A"
        got = await a.conversations.items.retrieve(item, conversation_id=conversation.id)
        assert got.id == item  # type: ignore[union-attr]


async def test_the_per_client_quota_is_a_clear_400(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(STATE_CLIENT_BYTES="6000", PROXY_API_KEYS=f"{KEY_A},{KEY_B}")
    sai.answer = echo
    async with _client(proxy, KEY_A) as a, _client(proxy, KEY_B) as b:
        kept = 0
        with pytest.raises(openai.BadRequestError) as refused:
            for turn in range(50):
                await a.responses.create(model="sai-model", input=f"turn {turn} " + "w" * 300)
                kept += 1
        error = refused.value.body
        assert error["code"] == "storage_quota_exceeded" and error["param"] == "store"  # type: ignore[index]
        assert 0 < kept < 50 and len(sai.received) == kept  # refused before SAI was called
        # Without storing it still answers; another client has its own quota.
        answered = await a.responses.create(model="sai-model", input="w", store=False)
        assert answered.output_text == "re: w"
        await b.responses.create(model="sai-model", input="B's turn")
        with pytest.raises(openai.BadRequestError):
            await a.conversations.create(
                items=[{"type": "message", "role": "user", "content": "w" * 300}]
            )


async def test_stored_objects_expire(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(RESPONSES_TTL="0.5")
    async with _client(proxy) as client:
        response = await client.responses.create(model="sai-model", input="hi")
        conversation = await client.conversations.create()
        assert (await client.responses.retrieve(response.id)).id == response.id
        await asyncio.sleep(0.7)
        await _expect_404(client.responses.retrieve(response.id))
        await _expect_404(client.conversations.retrieve(conversation.id))
    backend = proxy.app[STATE_STORE].backend  # type: ignore[attr-defined]
    assert await backend.used("anonymous") == 0 and backend.total == 0  # all swept


async def test_memory_is_bounded_in_the_process(make_proxy: MakeProxy, sai: FakeSai) -> None:
    """Past STATE_MAX_BYTES the oldest entries go first; the newest stay readable."""
    bound = 200_000
    proxy = await make_proxy(STATE_MAX_BYTES=str(bound), STATE_CLIENT_BYTES="0")
    sai.answer = echo
    backend = proxy.app[STATE_STORE].backend  # type: ignore[attr-defined]
    ids = []
    async with _client(proxy) as client:
        for _ in range(300):
            response = await client.responses.create(model="sai-model", input="z" * 1000)
            ids.append(response.id)
            assert backend.total <= bound
        await _expect_404(client.responses.retrieve(ids[0]))
        assert (await client.responses.retrieve(ids[-1])).id == ids[-1]
    assert backend.evicted > 0


async def test_bad_stored_references_are_clear(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    async with _client(proxy) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.responses.create(
                model="sai-model", input="x", previous_response_id="resp_nothing"
            )
        assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(
                model="sai-model", input="x", previous_response_id="resp_a", conversation="conv_b"
            )
        with pytest.raises(openai.NotFoundError):
            await client.responses.input_items.list("resp_x")
        kept = await client.responses.create(model="sai-model", input="x")
        for query in ({"limit": 1000}, {"limit": "many"}, {"order": "up"}):
            with pytest.raises(openai.BadRequestError):
                await client.responses.input_items.list(kept.id, extra_query=query)
    assert len(sai.received) == 1


async def test_items_sent_back_whole_are_not_stored_again(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    """A client that sends the whole conversation each turn (the Agents SDK without
    previous_response_id) sends the earlier output back with its ids: those items stay
    the earlier response's, so deleting the later one leaves the earlier one whole."""
    proxy = await make_proxy()
    sai.answer = echo
    async with _client(proxy) as client:
        first = await client.responses.create(model="sai-model", input="one")
        output = [item.model_dump(exclude_none=True) for item in first.output]
        second = await client.responses.create(
            model="sai-model",
            input=[{"role": "user", "content": "one"}, *output, {"role": "user", "content": "two"}],
        )
        listed = await client.responses.input_items.list(second.id, order="asc")
        assert [item.id for item in listed.data][1] == first.output[0].id  # type: ignore[union-attr]
        await client.responses.delete(second.id)
        again = await client.responses.retrieve(first.id)
        assert again.output_text == "re: one"
        third = await client.responses.create(
            model="sai-model", input="three", previous_response_id=first.id
        )
        assert third.output_text == "re: three"
    assert history(sai.received[1]) == [("user", "one"), ("assistant", "re: one"), ("user", "two")]
    assert history(sai.received[2]) == [
        ("user", "one"),
        ("assistant", "re: one"),
        ("user", "three"),
    ]


async def test_users_own_sai_keys_are_owners_too(make_proxy: MakeProxy, sai: FakeSai) -> None:
    """Without proxy keys, a user's own SAI key (the limits' identity) owns what it stores."""
    proxy = await make_proxy()
    sai.answer = echo
    ana, ben = {"user-api-key": "ana-own-sai-key-1"}, {"user-api-key": "ben-own-sai-key-2"}
    async with _client(proxy) as client:
        mine = await client.responses.create(model="sai-model", input="Ana's", extra_headers=ana)
        assert (await client.responses.retrieve(mine.id, extra_headers=ana)).id == mine.id
        await _expect_404(client.responses.retrieve(mine.id, extra_headers=ben))
        await _expect_404(client.responses.retrieve(mine.id))  # anonymous: the system key
        await _expect_404(
            client.responses.create(
                model="sai-model", input="x", previous_response_id=mine.id, extra_headers=ben
            )
        )


async def test_users_sessions_own_apart_under_the_configured_session_cookie(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    """SAI_SESSION_COOKIE names the session cookie for the owners as for the limits: two
    users' sessions own their objects apart, and nobody else reads them."""
    proxy = await make_proxy(SAI_SESSION_COOKIE="sai-session")
    sai.answer = echo
    ana = {"user-api-key": "sai-session=ana-session-1; Cookies=1"}
    ben = {"user-api-key": "sai-session=ben-session-2; Cookies=1"}
    async with _client(proxy) as client:
        mine = await client.responses.create(model="sai-model", input="Ana's", extra_headers=ana)
        assert (await client.responses.retrieve(mine.id, extra_headers=ana)).id == mine.id
        await _expect_404(client.responses.retrieve(mine.id, extra_headers=ben))
        await _expect_404(client.responses.retrieve(mine.id))


async def test_the_node_openai_sdk(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.answer = echo
    result = await run_node("responses_state.mjs", openai_url(proxy))
    assert result["chain"] == [f"re: q{turn}" for turn in range(5)]
    assert result["retrieved"] == "re: q4" and result["previous"]
    assert result["listed"] == ["a", "b", "c"] and result["deleted"] == 404
    assert result["conversation"]
    assert result["items"] == ["Hi, I am Node.", "Who am I?", "re: Who am I?"]
    # The fifth turn reached SAI with the four before it.
    assert len(sai.received[4].json["chatMessages"]) == 9
