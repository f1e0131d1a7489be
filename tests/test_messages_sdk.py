"""Real Anthropic clients through saiproxy: Python and Node SDKs, LangChain ChatAnthropic."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest
from langchain_anthropic import ChatAnthropic
from langchain_core.messages import HumanMessage, ToolMessage

from .conftest import FakeSai, MakeProxy, Reply, anthropic_url, run_node
from .test_messages import CALL, WEATHER

MODEL = "sai-model"


def _client(proxy: object, **options: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=anthropic_url(proxy), **{"api_key": "unused", "max_retries": 0, **options}
    )


async def test_create(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body="Paris.", headers={"prompttokens": "9", "completiontokens": "2"}))
    async with _client(proxy) as client:
        message = await client.messages.create(
            model=MODEL,
            max_tokens=100,
            system="Answer in one word.",
            messages=[{"role": "user", "content": "Capital of France?"}],
        )
    assert message.content[0].type == "text"
    assert message.content[0].text == "Paris."
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 2)
    assert message.id.startswith("msg_")
    assert sai.received[0].json["inputs"]["system"] == "Answer in one word."


async def test_stream_helper(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=["Bon", "jour", " 👋"], chunk_delay=0.05))
    async with (
        _client(proxy) as client,
        client.messages.stream(
            model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        pieces = [piece async for piece in stream.text_stream]
        message = await stream.get_final_message()
    assert pieces == ["Bon", "jour", " 👋"]
    assert message.content[0].text == "Bonjour 👋"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0


async def test_sync_client_stream(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=["one ", "two ", "three"], chunk_delay=0.02))
    base_url = anthropic_url(proxy)

    def consume() -> tuple[str, str | None]:
        with (
            anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0) as client,
            client.messages.stream(
                model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "count"}]
            ) as stream,
        ):
            text = "".join(stream.text_stream)
            return text, stream.get_final_message().stop_reason

    assert await asyncio.to_thread(consume) == ("one two three", "end_turn")


@pytest.mark.parametrize("streamed", [False, True])
async def test_tool_use_round_trip(proxy: Any, sai: FakeSai, streamed: bool) -> None:
    sai.script(
        Reply(body=["Let me check. ", CALL[:25], CALL[25:]]),
        Reply(body="It is 18 C and sunny in Paris."),
    )
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]

    async def ask(client: anthropic.AsyncAnthropic) -> Any:
        request: Any = {"model": MODEL, "max_tokens": 100, "tools": [WEATHER], "messages": messages}
        if streamed:
            async with client.messages.stream(**request) as stream:
                return await stream.get_final_message()
        return await client.messages.create(**request)

    async with _client(proxy) as client:
        first = await ask(client)
        assert first.stop_reason == "tool_use"
        tool_use = first.content[-1]
        assert tool_use.type == "tool_use"
        assert (tool_use.name, tool_use.input) == ("get_weather", {"city": "Paris"})
        messages += [
            first.to_param(),
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": tool_use.id,
                 "content": [{"type": "text", "text": "18 C, sunny"}]},
            ]},
        ]  # fmt: skip
        second = await ask(client)
    assert second.stop_reason == "end_turn"
    assert second.content[0].text.startswith("It is 18 C")  # type: ignore[union-attr]
    history = sai.received[1].json["chatMessages"]
    assert history[1]["role"] == "assistant" and "<tool_call>" in history[1]["content"]
    assert history[2]["content"] == (
        f'<tool_result name="get_weather" id="{tool_use.id}">18 C, sunny</tool_result>'
    )


async def test_tool_choice_and_error_result(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=CALL))
    async with _client(proxy) as client:
        message = await client.messages.create(
            model=MODEL,
            max_tokens=100,
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            messages=[
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_x", "name": "get_weather",
                     "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_x", "content": "timeout",
                     "is_error": True}]},
            ],
        )  # fmt: skip
    assert message.stop_reason == "tool_use"
    system = sai.received[0].json["inputs"]["system"]
    assert "You must call the tool get_weather" in system
    assert "at most one tool call" in system
    assert "The tool reported an error:\ntimeout" in sai.received[0].json["inputs"]["user"]


async def test_count_tokens(proxy: Any, sai: FakeSai) -> None:
    async with _client(proxy) as client:
        counted = await client.messages.count_tokens(
            model=MODEL,
            system="Be brief.",
            tools=[WEATHER],
            messages=[{"role": "user", "content": "Weather in Paris?"}],
        )
    assert counted.input_tokens > 50
    assert sai.received == []


# --- every error as the SDK's own exception


async def test_errors_as_sdk_exceptions(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(
        ERROR_MODE="http", MAX_RETRIES="0", REQUEST_TIMEOUT="0.3", MAX_BODY_BYTES="4096",
        STRICT_MODELS="true", PROXY_API_KEYS="pk-good-1",
    )  # fmt: skip
    hi: Any = [{"role": "user", "content": "hi"}]
    image: Any = [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AA=="}}]}]  # fmt: skip
    cases: list[tuple[type[anthropic.APIStatusError], str, dict[str, Any], Reply | None]] = [
        (anthropic.BadRequestError, "invalid_request_error", {"messages": image}, None),
        (anthropic.ContentTooLargeError, "request_too_large",
         {"messages": [{"role": "user", "content": "x" * 5000}]}, None),
        (anthropic.NotFoundError, "not_found_error", {"model": "nope"}, None),
        (anthropic.AuthenticationError, "authentication_error", {}, Reply(status=401)),
        (anthropic.RateLimitError, "rate_limit_error", {},
         Reply(status=429, body="Test template usage limit exceeded")),
        (anthropic.BadRequestError, "invalid_request_error", {},
         Reply(status=500, body="prompt is too long")),
        (anthropic.InternalServerError, "api_error", {}, Reply(status=500, body="boom")),
        (anthropic.GatewayTimeoutError, "timeout_error", {}, Reply(delay=2)),
    ]  # fmt: skip
    async with _client(proxy, api_key="pk-good-1") as client:
        for exception, kind, change, reply in cases:
            if reply is not None:
                sai.script(reply)
            request: dict[str, Any] = {"model": "sai-model", "max_tokens": 10, "messages": hi}
            with pytest.raises(exception) as caught:
                await client.messages.create(**{**request, **change})
            assert caught.value.body["error"]["type"] == kind  # type: ignore[index]
            assert caught.value.type == kind or caught.value.type is None
    async with _client(proxy, api_key="pk-wrong") as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(model="sai-model", max_tokens=10, messages=hi)


async def test_error_event_after_the_stream_started(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(ERROR_MODE="http")
    sai.script(Reply(status=429, body="Test template usage limit exceeded"))
    async with _client(proxy) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with client.messages.stream(
                model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                await stream.get_final_message()
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


async def test_message_mode_explains_in_the_answer(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(status=500, body="prompt is too long"))
    async with (
        _client(proxy) as client,
        client.messages.stream(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        message = await stream.get_final_message()
    assert message.stop_reason == "end_turn"
    assert "prompt is too long" in message.content[0].text  # type: ignore[union-attr]


# --- LangChain's ChatAnthropic


def _chat_anthropic(proxy: object, **options: Any) -> ChatAnthropic:
    return ChatAnthropic(  # type: ignore[call-arg]
        model=MODEL,
        anthropic_api_url=anthropic_url(proxy),
        anthropic_api_key="unused",
        max_retries=0,
        max_tokens=256,
        **options,
    )


@pytest.mark.parametrize("streamed", [False, True])
async def test_langchain_bind_tools(proxy: Any, sai: FakeSai, streamed: bool) -> None:
    sai.script(Reply(body=["Checking. ", CALL]), Reply(body="18 C and sunny."))
    model = _chat_anthropic(proxy).bind_tools([WEATHER])
    question = HumanMessage("Weather in Paris?")
    if streamed:
        first: Any = None
        async for chunk in model.astream([question]):
            first = chunk if first is None else first + chunk
    else:
        first = await model.ainvoke([question])
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    call_id = first.tool_calls[0]["id"]
    assert call_id.startswith("toolu_")
    answer = await model.ainvoke(
        [question, first, ToolMessage("18 C, sunny", tool_call_id=call_id)]
    )
    assert answer.text.startswith("18 C")
    assert "18 C, sunny</tool_result>" in sai.received[1].json["inputs"]["user"]


# --- the Node SDK


async def test_node_sdk_stream(proxy: Any, sai: FakeSai) -> None:
    sai.script(
        Reply(body=["Hel", "lo ", "from ", "SAI"], chunk_delay=0.02),
        Reply(body=["Let me check. ", CALL]),
    )
    result = await run_node(
        "messages_stream.mjs", anthropic_url(proxy), env={"ANTHROPIC_API_KEY": "unused"}
    )
    assert result["texts"] == ["Hel", "lo ", "from ", "SAI"]
    assert result["text"] == "Hello from SAI"
    assert result["stop_reason"] == "end_turn"
    assert result["tool"]["stop_reason"] == "tool_use"
    assert result["tool"]["input"] == {"city": "Paris"}
    assert result["tool"]["id"].startswith("toolu_")
