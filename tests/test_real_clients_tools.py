"""Real clients with tools and structured output: openai SDK, LangChain, the Vercel AI SDK."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from pydantic import BaseModel

from .conftest import FakeSai, MakeProxy, Reply, log_lines, openai_url, run_node
from .test_tools import WEATHER

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Quito"}}</tool_call>'


async def test_openai_sdk_tool_call(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body="Let me check.\n" + CALL))
    async with openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused") as client:
        result = await client.chat.completions.create(
            model="sai-model",
            messages=[{"role": "user", "content": "Weather in Quito?"}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required",
        )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Quito"}  # type: ignore[union-attr]


async def test_openai_sdk_streamed_tool_call(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    answer = "On it. " + CALL
    sai.script(Reply(body=[answer[i : i + 5] for i in range(0, len(answer), 5)], chunk_delay=0.005))
    client = openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused")
    async with (
        client,
        client.chat.completions.stream(
            model="sai-model",
            messages=[{"role": "user", "content": "Weather in Quito?"}],
            tools=[WEATHER],  # type: ignore[list-item]
        ) as stream,
    ):
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "On it. "
    assert choice.message.tool_calls is not None
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Quito"}  # type: ignore[union-attr]


class Weather(BaseModel):
    city: str
    temp: float


async def test_openai_sdk_parse_with_pydantic(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body='```json\n{"city": "Quito", "temp": 18.5}\n```'))
    async with openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused") as client:
        result = await client.chat.completions.parse(
            model="sai-model",
            messages=[{"role": "user", "content": "Weather in Quito?"}],
            response_format=Weather,
        )
    assert result.choices[0].message.parsed == Weather(city="Quito", temp=18.5)
    assert '"temp"' in sai.received[0].json["inputs"]["system"]  # the schema went to SAI


async def test_langchain_bind_tools(make_proxy: MakeProxy, sai: FakeSai) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return "18 C"

    proxy = await make_proxy()
    sai.script(Reply(body=CALL), Reply(body="It is 18 C in Quito."))
    http = openai.DefaultAsyncHttpxClient()
    model = ChatOpenAI(
        model="sai-model", base_url=openai_url(proxy), api_key="unused",  # type: ignore[arg-type]
        http_async_client=http,
    )  # fmt: skip
    bound = model.bind_tools([get_weather])
    first = await bound.ainvoke("Weather in Quito?")
    assert first.tool_calls == [  # type: ignore[attr-defined]
        {"name": "get_weather", "args": {"city": "Quito"}, "id": first.tool_calls[0]["id"],  # type: ignore[attr-defined]
         "type": "tool_call"}
    ]  # fmt: skip
    result = get_weather.invoke(first.tool_calls[0])  # type: ignore[attr-defined]
    second = await bound.ainvoke([("user", "Weather in Quito?"), first, result])
    assert second.content == "It is 18 C in Quito."
    history = sai.received[1].json["chatMessages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[2]["content"].startswith('<tool_result name="get_weather" id="call_')

    structured = model.with_structured_output(Weather, method="function_calling")
    # function_calling asks for a call of the "Weather" tool; SAI answers in the fork's format.
    fork = {"tool_calls": [{"type": "function", "function": {
        "name": "Weather", "arguments": {"city": "Lima", "temp": 20}}}]}  # fmt: skip
    sai.script(Reply(body=json.dumps(fork)))
    assert await structured.ainvoke("Weather in Lima?") == Weather(city="Lima", temp=20)
    await http.aclose()


@pytest.mark.parametrize("mode", ["generate", "stream", "required"])
async def test_vercel_ai_sdk_tool_call(make_proxy: MakeProxy, sai: FakeSai, mode: str) -> None:
    proxy = await make_proxy()
    answer = "Checking. " + CALL
    sai.script(Reply(body=[answer[i : i + 9] for i in range(0, len(answer), 9)], chunk_delay=0.005))
    result = await run_node("vercel_ai.mjs", openai_url(proxy), mode)
    assert result["toolCalls"] == [{"name": "get_weather", "input": {"city": "Quito"}}]
    assert result["finishReason"] == "tool-calls"
    if mode == "stream":
        assert "tool-call" in result["parts"] and "text-delta" in result["parts"]
    if mode == "required":
        assert "You must call at least one tool" in sai.received[0].json["inputs"]["system"]


@pytest.mark.parametrize("mode", ["generate", "stream"])
@pytest.mark.parametrize("store", ["nostore", "store"])
async def test_vercel_ai_sdk_openai_provider_tool_loop_and_second_turn(
    make_proxy: MakeProxy, sai: FakeSai, mode: str, store: str, tmp_path: Path
) -> None:
    """@ai-sdk/openai speaks the Responses API: it runs the tool, sends its result back,
    then sends the whole first turn with the second. With its default ``store: true`` it
    sends the assistant's earlier text as an ``item_reference`` to the item saiproxy
    answered with: saiproxy kept it, so SAI gets the text either way."""
    proxy = await make_proxy()
    answer = "Checking. " + CALL
    sai.script(
        Reply(body=[answer[i : i + 9] for i in range(0, len(answer), 9)], chunk_delay=0.005),
        Reply(body=["It is 18 C ", "in Quito."], chunk_delay=0.005),
        Reply(body="You are welcome."),
    )
    result = await run_node("vercel_openai_responses.mjs", openai_url(proxy), mode, store)
    assert result["ran"] == ["Quito"]  # the SDK ran the tool once, with SAI's arguments
    assert result["first"]["text"] == "It is 18 C in Quito."
    assert result["first"]["steps"] == 2
    assert result["second"] == {"text": "You are welcome.", "steps": 1}
    if mode == "stream":
        assert {"tool-call", "tool-result", "text-delta"} <= set(result["first"]["parts"])
    assert len(sai.received) == 3
    loop = sai.received[1].json["chatMessages"]
    assert [m["role"] for m in loop] == ["user", "assistant", "user"]
    # Step 2 carries the assistant's earlier prose, whichever way the SDK sent it.
    assert loop[1]["content"].startswith("Checking.")
    assert '"name":"get_weather"' in loop[1]["content"]
    assert loop[2]["content"].startswith('<tool_result name="get_weather" id="call_')
    assert '"celsius":18' in loop[2]["content"]
    second = sai.received[2].json["chatMessages"]
    said = [m["content"] for m in second if m["role"] == "assistant"]
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant", "user"]
    assert said[0].startswith("Checking.") and said[-1] == "It is 18 C in Quito."
    assert second[-1]["content"] == "Thanks!"
    await proxy.close()
    referenced = [json.loads(line) for line in log_lines(tmp_path)
                  if "item reference not in the request, skipped" in line]  # fmt: skip
    assert referenced == []  # with store: true the references were found in the store
