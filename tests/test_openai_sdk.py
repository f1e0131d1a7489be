"""The official openai SDK as the client: plain, streaming, sync and async."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .conftest import FakeSai, MakeProxy, Reply, openai_url


async def test_async_sdk_completion(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body="Paris.", headers={"prompttokens": "9", "completiontokens": "2"}))
    async with openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused") as client:
        result = await client.chat.completions.create(
            model="sai-model",
            messages=[
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Capital of France?"},
            ],
            temperature=0,
        )
    assert result.choices[0].message.content == "Paris."
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (9, 2)
    assert sai.received[0].json["inputs"] == {
        "system": "Answer in one word.",
        "user": "Capital of France?",
    }


async def test_async_sdk_streaming_with_usage(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=["Bon", "jour", " 👋"], chunk_delay=0.05))
    async with openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused") as client:
        stream = await client.chat.completions.create(
            model="sai-model",
            messages=[{"role": "user", "content": "Say hi in French"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
    assert "".join(pieces) == "Bonjour 👋"
    assert finish == "stop"
    assert usage is not None and usage.total_tokens > 0


async def test_sync_sdk_streaming(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=["one ", "two ", "three"], chunk_delay=0.05))
    base_url = openai_url(proxy)

    def consume() -> tuple[str, str | None]:
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
            stream = client.chat.completions.create(
                model="anything",
                messages=[{"role": "user", "content": "count"}],
                stream=True,
            )
            text, finish = "", None
            for chunk in stream:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            return text, finish

    # The synchronous client blocks, so it runs in a thread beside the event loop.
    text, finish = await asyncio.to_thread(consume)
    assert (text, finish) == ("one two three", "stop")


async def test_sdk_sees_http_errors_in_http_mode(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(ERROR_MODE="http")
    sai.script(Reply(status=429, headers={"Retry-After": "3"}))
    async with openai.AsyncOpenAI(
        base_url=openai_url(proxy), api_key="unused", max_retries=0
    ) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(
                model="sai-model", messages=[{"role": "user", "content": "hi"}]
            )
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["x-request-id"]


async def test_sdk_bad_request(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    async with openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused") as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="sai-model", messages=[{"role": "user", "content": "hi"}], n=3
            )
    assert caught.value.status_code == 400


async def test_a_users_own_key_from_the_sdk(make_proxy: MakeProxy, sai: FakeSai) -> None:
    # The snippets of docs/clients.md: a default header, or metadata in the body.
    proxy = await make_proxy()
    async with openai.AsyncOpenAI(
        base_url=openai_url(proxy), api_key="unused", default_headers={"user-api-key": "uk-header"}
    ) as client:
        await client.chat.completions.create(
            model="sai-model", messages=[{"role": "user", "content": "hi"}]
        )
    async with openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused") as client:
        await client.chat.completions.create(
            model="sai-model",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"metadata": {"user_api_key": "uk-metadata"}},
        )
    assert [call.auth for call in sai.received] == [
        ("X-Api-Key", "uk-header"),
        ("X-Api-Key", "uk-metadata"),
    ]


async def test_a_users_own_key_from_langchain(make_proxy: MakeProxy, sai: FakeSai) -> None:
    from langchain_openai import ChatOpenAI

    proxy = await make_proxy()
    async with httpx.AsyncClient() as http:  # closed here, not left to the garbage collector
        llm = ChatOpenAI(
            base_url=openai_url(proxy),
            api_key="unused",  # type: ignore[arg-type]
            model="sai-model",
            default_headers={"user-api-key": "uk-langchain"},
            http_async_client=http,
        )
        answer = await llm.ainvoke("hi")
    assert answer.content == "Hello from SAI"
    assert sai.received[0].auth == ("X-Api-Key", "uk-langchain")
