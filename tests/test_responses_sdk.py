"""The official SDKs' Responses calls and stream helpers through saiproxy, unmodified."""

from __future__ import annotations

import json
import shutil
from typing import Any

import openai
import orjson
import pydantic
import pytest

from .conftest import NODE_DIR, FakeSai, MakeProxy, Reply, openai_url, run_node

PATCH = "*** Begin Patch\n*** Update File: app.py\n@@\n-x = 1\n+x = 2\n*** End Patch"
APPLY_PATCH: Any = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Use the apply_patch tool to edit files.",
    "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch" /.+/'},
}


class Weather(pydantic.BaseModel):
    """Get the weather of a city."""

    city: str


class Capital(pydantic.BaseModel):
    country: str
    capital: str


def _client(proxy: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused", max_retries=0)


def _call_block(name: str, **body: Any) -> str:
    return "<tool_call>" + orjson.dumps({"name": name, **body}).decode() + "</tool_call>"


async def test_create_plain(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body="Quito.", headers={"prompttokens": "20", "completiontokens": "3"}))
    async with _client(proxy) as client:
        response = await client.responses.create(
            model="sai-model",
            instructions="Answer in one word.",
            input="Capital of Ecuador?",
            store=False,
            metadata={"run": "1"},
        )
    assert response.output_text == "Quito."
    assert response.status == "completed" and response.id.startswith("resp_")
    assert response.usage is not None and response.usage.total_tokens == 23
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.metadata == {"run": "1"} and response.instructions == "Answer in one word."
    # Every field the SDK's types declare is present (none left to defaults); beyond
    # them only `store`, which OpenAI's own Response objects carry too.
    assert response.model_extra == {"store": False}
    assert set(type(response).model_fields) - response.model_fields_set <= {
        "access_programs", "conversation", "image", "input_transformations", "moderation",
        "prompt", "prompt_cache_diagnostics", "prompt_cache_options", "prompt_cache_retention",
        "tool_usage",
    }  # fmt: skip


async def test_stream_helper_text(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=["Hola", " mundo", " 👋"], chunk_delay=0.02))
    client = _client(proxy)
    async with client, client.responses.stream(model="sai-model", input="Say hi") as stream:
        kinds, deltas = [], []
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert deltas == ["Hola", " mundo", " 👋"]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert final.output_text == "Hola mundo 👋"


@pytest.mark.parametrize("stream", [False, True])
async def test_function_tool(make_proxy: MakeProxy, sai: FakeSai, stream: bool) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=["Let me check. ", _call_block("Weather", arguments={"city": "Cuenca"})]))
    tool = openai.pydantic_function_tool(Weather)
    flat: Any = {"type": "function", **tool["function"]}
    async with _client(proxy) as client:
        if stream:
            async with client.responses.stream(
                model="sai-model", input="Weather in Cuenca?", tools=[flat]
            ) as events:
                arguments = [
                    event.delta
                    async for event in events
                    if event.type == "response.function_call_arguments.delta"
                ]
                response: Any = await events.get_final_response()
            assert "".join(arguments) == '{"city":"Cuenca"}'
        else:
            response = await client.responses.parse(
                model="sai-model", input="Weather in Cuenca?", tools=[flat]
            )
    message, call = response.output
    assert message.type == "message" and response.output_text == "Let me check. "
    assert call.type == "function_call" and call.name == "Weather"
    assert json.loads(call.arguments) == {"city": "Cuenca"}
    assert call.call_id.startswith("call_")
    # The SDK parses the arguments of a strict tool it was given.
    assert call.parsed_arguments == {"city": "Cuenca"}


@pytest.mark.parametrize("stream", [False, True])
async def test_custom_tool_apply_patch(make_proxy: MakeProxy, sai: FakeSai, stream: bool) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=_call_block("apply_patch", input=PATCH)))
    async with _client(proxy) as client:
        if stream:
            async with client.responses.stream(
                model="sai-model", input="Set x to 2", tools=[APPLY_PATCH]
            ) as events:
                inputs = [
                    event.delta
                    async for event in events
                    if event.type == "response.custom_tool_call_input.delta"
                ]
                response: Any = await events.get_final_response()
            assert "".join(inputs) == PATCH
        else:
            response = await client.responses.create(
                model="sai-model", input="Set x to 2", tools=[APPLY_PATCH]
            )
    [call] = response.output
    assert call.type == "custom_tool_call" and call.name == "apply_patch"
    assert call.input == PATCH and call.call_id.startswith("call_")
    system = sai.received[0].json["inputs"]["system"]
    assert "apply_patch" in system and "lark" in system


async def test_multi_turn_with_function_call_output(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    tool: Any = {"type": "function", **openai.pydantic_function_tool(Weather)["function"]}
    sai.script(
        Reply(body=_call_block("Weather", arguments={"city": "Loja"})),
        Reply(body="It is 17 °C in Loja."),
    )
    async with _client(proxy) as client:
        history: list[Any] = [{"role": "user", "content": "Weather in Loja?"}]
        first = await client.responses.create(model="sai-model", input=history, tools=[tool])
        [call] = first.output
        assert call.type == "function_call"
        history += [item.model_dump(exclude_none=True) for item in first.output]
        history.append({"type": "function_call_output", "call_id": call.call_id, "output": "17"})
        second = await client.responses.create(model="sai-model", input=history, tools=[tool])
    assert second.output_text == "It is 17 °C in Loja."
    turns = [(m["role"], m["content"]) for m in sai.received[1].json["chatMessages"]]
    assert turns == [
        ("user", "Weather in Loja?"),
        ("assistant", _call_block("Weather", arguments={"city": "Loja"}).replace(" ", "")),
        ("user", f'<tool_result name="Weather" id="{call.call_id}">17</tool_result>'),
    ]


async def test_structured_output_parse(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body='```json\n{"country": "Peru", "capital": "Lima"}\n```'))
    async with _client(proxy) as client:
        response = await client.responses.parse(
            model="sai-model", input="Capital of Peru?", text_format=Capital
        )
    assert response.output_parsed == Capital(country="Peru", capital="Lima")
    system = sai.received[0].json["inputs"]["system"]
    assert "JSON schema (Capital)" in system


async def test_failure_after_start_reaches_the_stream_helper(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(ERROR_MODE="http")
    sai.script(Reply(status=500, body="prompt is too long", delay=0.2))
    client = _client(proxy)
    async with client, client.responses.stream(model="sai-model", input="hi") as events:
        last = [event async for event in events][-1]
    assert last.type == "response.failed"
    assert last.response.error is not None
    assert last.response.error.code == "context_length_exceeded"  # type: ignore[comparison-overlap]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_node_sdk_responses_stream(make_proxy: MakeProxy, sai: FakeSai) -> None:
    if not (NODE_DIR / "node_modules" / "openai").exists():
        pytest.skip("Node clients not installed (run ./scripts/test)")
    proxy = await make_proxy()
    sai.script(
        Reply(body=["Buenos ", "días. "], chunk_delay=0.02),
        Reply(body=["Patching. ", _call_block("apply_patch", input=PATCH)], chunk_delay=0.01),
    )
    result = await run_node("responses_stream.mjs", openai_url(proxy))
    assert result["text"]["deltas"] == ["Buenos ", "días. "]
    assert result["text"]["final"] == "Buenos días. "
    assert result["text"]["events"][:2] == ["response.created", "response.in_progress"]
    assert result["text"]["events"][-1] == "response.completed"
    tool = result["tool"]
    assert tool["final_text"] == "Patching. "
    assert [item["type"] for item in tool["output"]] == ["message", "custom_tool_call"]
    assert tool["output"][1]["input"] == PATCH and tool["output"][1]["name"] == "apply_patch"
    assert tool["input_deltas"] == PATCH
