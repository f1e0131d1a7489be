"""Anthropic structured output with real clients, streamed and not (docs/protocols.md).

The anthropic SDK's ``messages.parse`` / ``messages.stream(output_format=...)``
send ``output_config.format``; LangChain's ``ChatAnthropic.with_structured_output(
method="json_schema")`` does too; the Vercel AI SDK's Anthropic provider sends it
for models it knows support it, and otherwise asks for a call of a ``json`` tool.
SAI answers prose-wrapped JSON here the way models do (in a code fence): the
clients must get an object.
"""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
from langchain_anthropic import ChatAnthropic
from pydantic import BaseModel

from .conftest import FakeSai, MakeProxy, Reply, anthropic_url, run_node

FENCED = '```json\n{"city": "Quito", "temp": 18.5}\n```'
MODEL = "sai-model"


class Weather(BaseModel):
    city: str
    temp: float


def _pieces(text: str, size: int = 7) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _client(proxy: object) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=anthropic_url(proxy), api_key="unused", max_retries=0)


async def test_anthropic_sdk_parse(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=FENCED))
    async with _client(proxy) as client:
        message = await client.messages.parse(
            model=MODEL,
            max_tokens=100,
            messages=[{"role": "user", "content": "Weather in Quito?"}],
            output_format=Weather,
        )
    assert message.parsed_output == Weather(city="Quito", temp=18.5)
    system = sai.received[0].json["inputs"]["system"]
    assert "Answer with one JSON object" in system and '"temp"' in system


async def test_anthropic_sdk_parse_repairs_once(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body="It is 18.5 degrees in Quito."), Reply(body=FENCED))
    async with _client(proxy) as client:
        message = await client.messages.parse(
            model=MODEL,
            max_tokens=100,
            messages=[{"role": "user", "content": "Weather in Quito?"}],
            output_format=Weather,
        )
    assert message.parsed_output == Weather(city="Quito", temp=18.5)
    assert len(sai.received) == 2


async def test_anthropic_sdk_stream_with_output_format(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=_pieces(FENCED), chunk_delay=0.005))
    async with (
        _client(proxy) as client,
        client.messages.stream(
            model=MODEL,
            max_tokens=100,
            messages=[{"role": "user", "content": "Weather in Quito?"}],
            output_format=Weather,
        ) as stream,
    ):
        message = await stream.get_final_message()
    assert message.parsed_output == Weather(city="Quito", temp=18.5)


@pytest.mark.parametrize("stream", [False, True])
async def test_langchain_anthropic_json_schema(proxy: Any, sai: FakeSai, stream: bool) -> None:
    sai.script(Reply(body=_pieces(FENCED), chunk_delay=0.005))
    model = ChatAnthropic(  # type: ignore[call-arg]
        model=MODEL,
        anthropic_api_url=anthropic_url(proxy),
        anthropic_api_key="unused",
        max_retries=0,
        max_tokens=256,
    )
    structured = model.with_structured_output(Weather, method="json_schema")
    if stream:
        chunks = [chunk async for chunk in structured.astream("Weather in Quito?")]
        result = chunks[-1]
    else:
        result = await structured.ainvoke("Weather in Quito?")
    assert result == Weather(city="Quito", temp=18.5)
    assert '"temp"' in sai.received[0].json["inputs"]["system"]


@pytest.mark.parametrize("how", ["generate", "stream"])
@pytest.mark.parametrize(
    ("mode", "model", "path"),
    [
        # A model the provider knows supports structured output: output_config.format.
        ("auto", "claude-sonnet-4-5", "outputFormat"),
        # Any other name (what SAI users configure): the provider's json tool.
        ("auto", MODEL, "jsonTool"),
    ],
)
async def test_vercel_ai_sdk_anthropic_object(
    make_proxy: MakeProxy, sai: FakeSai, how: str, mode: str, model: str, path: str
) -> None:
    proxy = await make_proxy()
    if path == "outputFormat":
        answer = FENCED
    else:
        answer = (
            '<tool_call>{"name": "json", "arguments": {"city": "Quito", "temp": 18.5}}</tool_call>'
        )
    sai.script(Reply(body=_pieces(answer), chunk_delay=0.005))
    result = await run_node("anthropic_object.mjs", f"{anthropic_url(proxy)}/v1", how, mode, model)
    assert result["object"] == {"city": "Quito", "temp": 18.5}
    assert result["finishReason"] == "stop"
    if path == "outputFormat":
        assert result["outputFormat"] == "json_schema" and result["tools"] == []
        assert "Answer with one JSON object" in sai.received[0].json["inputs"]["system"]
    else:
        assert result["outputFormat"] is None and result["tools"] == ["json"]
