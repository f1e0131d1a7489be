"""Tool calls, structured output and stop sequences in Chat Completions, over HTTP (docs/sai.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from .conftest import FakeSai, MakeProxy, Reply, chat, log_lines

URL = "/v1/chat/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
PATCH = {"type": "custom", "custom": {"name": "apply_patch", "description": "Apply a patch"}}


def _block(name: str, **arguments: Any) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def _sse(raw: bytes) -> list[Any]:
    events = []
    for frame in raw.decode().split("\n\n"):
        if frame.startswith("data: "):
            payload = frame[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def test_tool_call_non_streamed(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body="I'll look it up.\n" + _block("get_weather", city="Quito")))
    body = chat(("system", "Be brief."), ("user", "Weather in Quito?"), tools=[WEATHER, TIME])
    response = await proxy.post(URL, json=body)
    data = await response.json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll look it up.\n"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Quito"}'}

    inputs = sai.received[0].json["inputs"]
    assert inputs["system"].startswith("Be brief.\n\n# Tools")
    assert "get_weather: Current weather of a city" in inputs["system"]
    assert '"required":["city"]' in inputs["system"]
    assert json.loads(inputs["tools"]) == [
        {"type": "function", "function": {"description": "", **WEATHER["function"]}},
        {"type": "function", "function": {"description": "", **TIME["function"]}},
    ]


async def test_call_ids_are_unique(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    two = _block("get_weather", city="A") + _block("get_weather", city="B")
    sai.script(Reply(body=two), Reply(body=two))
    ids = []
    for _ in range(2):
        data = await (await proxy.post(URL, json=chat(("user", "?"), tools=[WEATHER]))).json()
        ids += [call["id"] for call in data["choices"][0]["message"]["tool_calls"]]
    assert len(set(ids)) == 4


async def test_fork_format_fenced_and_a_custom_tool(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    fork = {"tool_calls": [{"type": "custom", "custom": {"name": "apply_patch", "input": "diff"}}]}
    sai.script(Reply(body="```json\n" + json.dumps(fork) + "\n```"))
    data = await (await proxy.post(URL, json=chat(("user", "patch it"), tools=[PATCH]))).json()
    message = data["choices"][0]["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "custom" and call["custom"] == {"name": "apply_patch", "input": "diff"}
    assert json.loads(sai.received[0].json["inputs"]["tools"]) == [
        {"type": "custom", "custom": {"name": "apply_patch", "description": "Apply a patch"}}
    ]


@pytest.mark.parametrize(
    ("choice", "offered", "instruction"),
    [
        ("none", None, None),
        ("required", ["get_weather", "get_time"], "You must call at least one tool"),
        ({"type": "function", "function": {"name": "get_time"}}, ["get_time"],
         "You must call the tool get_time"),
    ],
)  # fmt: skip
async def test_tool_choice(
    make_proxy: MakeProxy, sai: FakeSai, choice: Any, offered: Any, instruction: Any
) -> None:
    proxy = await make_proxy()
    body = chat(("user", "?"), tools=[WEATHER, TIME], tool_choice=choice)
    assert (await proxy.post(URL, json=body)).status == 200
    inputs = sai.received[0].json["inputs"]
    if offered is None:
        assert "tools" not in inputs and "# Tools" not in inputs["system"]
    else:
        assert [t["function"]["name"] for t in json.loads(inputs["tools"])] == offered
        assert instruction in inputs["system"]


async def test_parallel_tool_calls_false_allows_one(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=_block("get_weather", city="A") + _block("get_time")))
    body = chat(("user", "?"), tools=[WEATHER, TIME], parallel_tool_calls=False)
    data = await (await proxy.post(URL, json=body)).json()
    assert "at most one tool call" in sai.received[0].json["inputs"]["system"]
    assert len(data["choices"][0]["message"]["tool_calls"]) == 1


async def test_history_with_calls_and_results_reaches_sai_as_three_roles(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    messages = [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in Quito?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Quito"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C & \"sunny\""},
        {"role": "tool", "tool_call_id": "call_<x>", "content": [{"type": "text", "text": "?"}]},
    ]  # fmt: skip
    await proxy.post(URL, json={"messages": messages, "tools": [WEATHER]})
    sent = sai.received[0].json
    assert sent["inputs"]["system"].startswith("Use tools.\n\n# Tools")
    history = [(m["role"], m["content"]) for m in sent["chatMessages"]]
    assert history == [
        ("user", "Weather in Quito?"),
        ("assistant", '<tool_call>{"name":"get_weather","arguments":{"city":"Quito"}}</tool_call>'),
        ("user", '<tool_result name="get_weather" id="call_1">18 C & "sunny"</tool_result>'),
        ("user", '<tool_result name="" id="call_&lt;x&gt;">?</tool_result>'),
    ]
    assert sent["inputs"]["user"] == history[-1][1]


async def test_unrecognised_calls_stay_text_are_logged_and_counted(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    proxy = await make_proxy()
    not_offered = _block("delete_everything")
    broken = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    example = 'For example:\n```json\n{"tool_calls": [{"function": {"name": "x"}}]}\n```\nOk?'
    for body in (not_offered, broken, example):
        sai.script(Reply(body=body))
        data = await (await proxy.post(URL, json=chat(("user", "?"), tools=[WEATHER]))).json()
        choice = data["choices"][0]
        assert choice["message"]["content"] == body and choice["finish_reason"] == "stop"
        assert "tool_calls" not in choice["message"]
    metrics = (await (await proxy.get("/metrics")).read()).decode()
    for reason in ("unknown_tool", "bad_json"):
        assert f'saiproxy_tool_calls_unrecognised_total{{reason="{reason}"}}' in metrics
    await asyncio.sleep(0.2)  # lines are written a batch at a time
    lines = [json.loads(line) for line in log_lines(tmp_path)]
    found = [r for r in lines if "tool calls not recognised" in r["message"]]
    assert [r["count"] for r in found] == [1, 1, 1]  # one line per answer
    assert sorted(reason for r in found for reason in r["reasons"]) == [
        "bad_json", "bad_json", "unknown_tool"]  # fmt: skip


async def test_streamed_tool_call_split_mid_tag(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    answer = "Checking the weather. " + _block("get_weather", city="Quito")
    pieces = [answer[i : i + 7] for i in range(0, len(answer), 7)]  # every tag cut somewhere
    sai.script(Reply(body=pieces, chunk_delay=0.01))
    body = chat(("user", "?"), tools=[WEATHER], stream=True,
                stream_options={"include_usage": True})  # fmt: skip
    events = _sse(await (await proxy.post(URL, json=body)).read())
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    text = "".join(d.get("content") or "" for d in deltas)
    assert text == "Checking the weather. "
    # The prose went out in pieces as it came, before the call.
    assert sum(1 for d in deltas if d.get("content")) > 2
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["id"].startswith("call_")
    assert calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Quito"}'
    finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    assert finish[-1] == "tool_calls"
    assert "usage" in events[-2]


async def test_streamed_block_that_does_not_parse_is_flushed_as_text(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    answer = 'Here: <tool_call>{"name": "get_weather", "arguments": {oops}}</tool_call>'
    sai.script(Reply(body=[answer[:10], answer[10:30], answer[30:]], chunk_delay=0.01))
    body = chat(("user", "?"), tools=[WEATHER], stream=True)
    events = _sse(await (await proxy.post(URL, json=body)).read())
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert "".join(d.get("content") or "" for d in deltas) == answer
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequences(make_proxy: MakeProxy, sai: FakeSai, stream: bool) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=["One. Two. EN", "D Three.", " Four."], chunk_delay=0.01))
    response = await proxy.post(URL, json=chat(("user", "?"), stop=["END", "zzz"], stream=stream))
    if stream:
        events = _sse(await response.read())
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        finish = events[-2]["choices"][0]["finish_reason"]
    else:
        choice = (await response.json())["choices"][0]
        text, finish = choice["message"]["content"], choice["finish_reason"]
    assert (text, finish) == ("One. Two. ", "stop")


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
    "required": ["city", "temp"],
}


async def test_structured_output_with_one_corrective_retry(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    sai.script(
        Reply(body='{"city": "Quito"}'), Reply(body='```json\n{"city": "Quito", "temp": 18}\n```')
    )
    body = chat(("user", "Weather?"), response_format={
        "type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}})  # fmt: skip
    data = await (await proxy.post(URL, json=body)).json()
    assert json.loads(data["choices"][0]["message"]["content"]) == {"city": "Quito", "temp": 18}
    assert len(sai.received) == 2
    first, second = (r.json for r in sai.received)
    assert "The JSON must follow this JSON schema (weather)" in first["inputs"]["system"]
    assert [m["role"] for m in second["chatMessages"]] == ["user", "assistant", "user"]
    assert "'temp' is a required property" in second["inputs"]["user"]
    # Both calls are counted in the usage.
    assert data["usage"]["prompt_tokens"] > 0


async def test_structured_output_gives_up_after_the_retry(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body="not json"), Reply(body="still not json"), Reply(body="never asked"))
    body = chat(("user", "?"), response_format={"type": "json_object"})
    data = await (await proxy.post(URL, json=body)).json()
    assert data["choices"][0]["message"]["content"] == "still not json"
    assert len(sai.received) == 2


async def test_structured_output_streamed_loses_its_fence(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=["```js", 'on\n{"a"', ": 1}\n`", "``\n"], chunk_delay=0.01))
    body = chat(("user", "?"), response_format={"type": "json_object"}, stream=True)
    events = _sse(await (await proxy.post(URL, json=body)).read())
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert orjson.loads(text) == {"a": 1}


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("tools", [{"type": "web_search"}], "function and custom tools only"),
        ("tools", "x", "array of tools"),
        ("tool_choice", {"type": "function", "function": {"name": "nope"}}, "not in 'tools'"),
        ("response_format", {"type": "xml"}, "json_schema"),
        ("stop", [1], "array of strings"),
        ("model", "m" * 300, "longer than"),
    ],
)
async def test_bad_tool_fields_are_400(
    make_proxy: MakeProxy, field: str, value: Any, fragment: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.post(URL, json=chat(("user", "?"), **{"tools": [WEATHER], field: value}))
    assert response.status == 400
    assert fragment in (await response.json())["error"]["message"]
