"""The Responses API (docs/protocols.md): parsing, the Response object, the stream, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from .conftest import FakeSai, MakeProxy, Reply
from .paced import Paced, PacedSai, paced_sai

URL = "/v1/responses"


@pytest.fixture
async def paced() -> AsyncIterator[PacedSai]:
    async with paced_sai() as sai:
        yield sai


async def _post_once_opened(proxy: Any, paced: PacedSai, reply: Paced) -> tuple[int, bytes]:
    """Stream ``input: hi``; SAI answers ``reply`` once the client has the stream's first
    event. Return the status and the whole body."""
    opened = paced.gate("stream opened")
    paced.default = Paced((opened, *reply.items), reply.status, reply.headers)
    async with proxy.post(URL, json={"input": "hi", "stream": True}) as response:
        first = await response.content.readuntil(b"\n\n")
        opened.open()
        raw = first + await response.read()
    # The stream opened before SAI answered (the gate did not give up waiting).
    assert ("gave up", "stream opened") not in paced.events
    return response.status, raw


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
    "strict": True,
}  # fmt: skip
APPLY_PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Apply a patch to files",
    "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch"'},
}
PATCH = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"


def events(raw: bytes) -> list[dict[str, Any]]:
    """Parse an SSE body: every frame is ``event: <type>`` + ``data: <json>`` or a comment."""
    assert raw.endswith(b"\n\n") and b"\r" not in raw
    out = []
    for frame in raw[:-2].split(b"\n\n"):
        if frame.startswith(b":"):
            continue
        name, data = frame.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: "), frame
        event = orjson.loads(data[len(b"data: ") :])
        assert event["type"] == name[len(b"event: ") :].decode()
        out.append(event)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert b"[DONE]" not in raw
    return out


async def post(proxy: Any, body: dict[str, Any], **headers: str) -> tuple[int, Any, Any]:
    response = await proxy.post(URL, json=body, headers=headers)
    raw = await response.read()
    if body.get("stream") and response.status == 200:
        return response.status, events(raw), response.headers
    return response.status, orjson.loads(raw), response.headers


async def test_text_input_becomes_a_response(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body="Paris.", headers={"prompttokens": "11", "completiontokens": "2"}))
    status, body, _ = await post(
        proxy,
        {"model": "sai-model", "input": "Capital of France?", "instructions": "One word.",
         "metadata": {"team": "a", "user_api_key": "sk-user-123456"}, "store": False,
         "include": ["reasoning.encrypted_content"], "temperature": 0.2},
    )  # fmt: skip
    assert status == 200
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert body["status"] == "completed" and body["error"] is None
    [message] = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["id"].startswith("msg_") and message["status"] == "completed"
    assert message["content"] == [
        {"type": "output_text", "annotations": [], "logprobs": [], "text": "Paris."}
    ]
    assert body["usage"] == {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 13,
    }
    # Echoes of the request's settings; the user's SAI key is not echoed back.
    assert body["instructions"] == "One word." and body["store"] is False
    assert body["metadata"] == {"team": "a"} and body["temperature"] == 0.2
    assert body["tools"] == [] and body["tool_choice"] == "auto"
    assert sai.received[0].json["inputs"] == {"system": "One word.", "user": "Capital of France?"}
    # The user key in metadata was used as the credential (docs/auth.md).
    assert sai.received[0].auth == ("X-Api-Key", "sk-user-123456")


async def test_items_of_every_kind_reach_sai(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    status, _, _ = await post(
        proxy,
        {
            "instructions": "Be brief.",
            "input": [
                {"type": "message", "role": "developer",
                 "content": [{"type": "input_text", "text": "Use tools."}]},
                {"role": "user", "content": "Weather in Quito, then patch."},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "x"},
                {"type": "message", "role": "assistant", "id": "msg_1",
                 "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
                {"type": "function_call", "call_id": "call_a", "name": "get_weather",
                 "arguments": '{"city": "Quito"}', "id": "fc_a"},
                {"type": "custom_tool_call", "call_id": "call_b", "name": "apply_patch",
                 "input": PATCH},
                {"type": "function_call_output", "call_id": "call_a", "output": "18 C"},
                {"type": "custom_tool_call_output", "call_id": "call_b",
                 "output": [{"type": "input_text", "text": "Done!"}]},
                {"role": "system", "content": "Now answer."},
            ],
            "tools": [WEATHER, APPLY_PATCH],
        },
    )  # fmt: skip
    assert status == 200
    sent = sai.received[0].json
    assert sent["inputs"]["system"].startswith("Be brief.\n\nUse tools.\n\n# Tools")
    assert orjson.loads(sent["inputs"]["tools"]) == [
        {"type": "function", "function": {k: WEATHER[k] for k in
                                          ("name", "description", "parameters")}},
        {"type": "custom", "custom": {k: APPLY_PATCH[k] for k in
                                      ("name", "description", "format")}},
    ]  # fmt: skip
    history = [(m["role"], m["content"]) for m in sent["chatMessages"]]
    calls = (
        '<tool_call>{"name":"get_weather","arguments":{"city":"Quito"}}</tool_call>\n'
        '<tool_call>{"name":"apply_patch","input":' + orjson.dumps(PATCH).decode() + "}</tool_call>"
    )
    assert history == [
        ("user", "Weather in Quito, then patch."),
        ("assistant", "Checking.\n" + calls),
        ("user", '<tool_result name="get_weather" id="call_a">18 C</tool_result>'),
        ("user", '<tool_result name="apply_patch" id="call_b">Done!</tool_result>'),
        ("system", "Now answer."),
    ]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input[0].content"),
        ({"input": []}, "input"),
        ({"background": True, "store": False}, "background"),
    ],
)  # fmt: skip
async def test_unsupported_is_a_400_naming_it(
    proxy: Any, sai: FakeSai, extra: dict[str, Any], param: str
) -> None:
    status, body, _ = await post(proxy, {"input": "hi", **extra})
    assert status == 400
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    # Hosted tools and item references are not refused: see test_liberal_input.py.
    assert param.split("[")[0] in error["message"]
    assert not sai.received


async def test_tool_calls_only_have_no_message_item(proxy: Any, sai: FakeSai) -> None:
    sai.script(
        Reply(body='<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}</tool_call>')
    )
    status, body, _ = await post(proxy, {"input": "Weather?", "tools": [WEATHER]})
    assert status == 200
    [call] = body["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert orjson.loads(call["arguments"]) == {"city": "Lima"}
    assert call["status"] == "completed"


async def test_stream_event_sequence_with_prose_and_calls(proxy: Any, sai: FakeSai) -> None:
    answer = (
        'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}</tool_call>'
        '<tool_call>{"name": "apply_patch", "input": ' + orjson.dumps(PATCH).decode() + "}"
        "</tool_call>"
    )
    sai.script(Reply(body=[answer[:5], answer[5:40], answer[40:]], chunk_delay=0.01))
    status, stream, _ = await post(
        proxy, {"input": "Go", "tools": [WEATHER, APPLY_PATCH], "stream": True}
    )
    assert status == 200
    assert [(e["type"], e.get("output_index")) for e in stream] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.content_part.added", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.done", 0),
        ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.custom_tool_call_input.delta", 2),
        ("response.custom_tool_call_input.done", 2),
        ("response.output_item.done", 2),
        ("response.completed", None),
    ]
    created, completed = stream[0]["response"], stream[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["id"] == completed["id"] and completed["status"] == "completed"
    assert "".join(e["delta"] for e in stream if e["type"] == "response.output_text.delta") == (
        "Checking. "
    )
    done_items = [e["item"] for e in stream if e["type"] == "response.output_item.done"]
    assert completed["output"] == done_items
    assert done_items[2] == {
        "id": done_items[2]["id"], "type": "custom_tool_call",
        "call_id": done_items[2]["call_id"], "name": "apply_patch", "input": PATCH,
    }  # fmt: skip
    assert completed["usage"]["total_tokens"] > 0


async def test_stream_starts_before_sai_answers(make_proxy: MakeProxy, paced: PacedSai) -> None:
    proxy = await make_proxy(SAI_URL=paced.url)
    status, raw = await _post_once_opened(proxy, paced, Paced(("late",)))
    assert status == 200
    assert raw.startswith(b"event: response.created\n")
    assert events(raw)[-1]["type"] == "response.completed"


async def test_empty_answer_is_one_empty_message(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=""))
    _, stream, _ = await post(proxy, {"input": "hi", "stream": True})
    completed = stream[-1]["response"]
    assert [item["type"] for item in completed["output"]] == ["message"]
    assert completed["output"][0]["content"][0]["text"] == ""


# --- errors


async def test_http_mode_rate_limit_after_start_is_response_failed(
    make_proxy: MakeProxy, paced: PacedSai
) -> None:
    proxy = await make_proxy(SAI_URL=paced.url, ERROR_MODE="http", SAI_COOKIE=None)
    # SAI answers after the stream opened (EAGER_GRACE): the failure is in-band.
    refusal = Paced(("Test template usage limit exceeded",), 429, {"Retry-After": "7"})
    status, raw = await _post_once_opened(proxy, paced, refusal)
    assert status == 200
    stream = events(raw)
    assert [e["type"] for e in stream] == [
        "response.created", "response.in_progress", "response.failed"
    ]  # fmt: skip
    failed = stream[-1]["response"]
    assert failed["status"] == "failed" and failed["id"] == stream[0]["response"]["id"]
    assert failed["error"]["code"] == "rate_limit_exceeded"
    assert "try again in 7s" in failed["error"]["message"]


async def test_http_mode_context_too_long_mid_stream(
    make_proxy: MakeProxy, paced: PacedSai
) -> None:
    proxy = await make_proxy(SAI_URL=paced.url, ERROR_MODE="http")
    too_long = Paced(("Error: prompt is too long: 250000 tokens",), 500)
    _, raw = await _post_once_opened(proxy, paced, too_long)
    stream = events(raw)
    assert stream[-1]["type"] == "response.failed"
    assert stream[-1]["response"]["error"]["code"] == "context_length_exceeded"


async def test_http_mode_break_after_text_closes_the_message(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(ERROR_MODE="http", MAX_RETRIES="0")
    sai.script(Reply(body=["Hel", "lo", "!"], chunk_delay=0.02, reset_after=2))
    _, stream, _ = await post(proxy, {"input": "hi", "stream": True})
    assert [e["type"] for e in stream][-3:] == [
        "response.content_part.done", "response.output_item.done", "response.failed"
    ]  # fmt: skip
    failed = stream[-1]["response"]
    assert failed["error"]["code"] == "server_error"
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "Hello"


async def test_http_mode_early_context_check_is_a_real_400(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(ERROR_MODE="http", MAX_CONTEXT_TOKENS="10")
    status, body, _ = await post(proxy, {"input": "x" * 200, "stream": True})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert not sai.received


async def test_http_mode_not_streamed_is_a_real_status(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(ERROR_MODE="http", SAI_COOKIE=None)
    sai.script(Reply(status=429, body="limit", headers={"Retry-After": "3"}))
    status, body, headers = await post(proxy, {"input": "hi"})
    assert status == 429 and headers["Retry-After"] == "3"
    assert body["error"]["code"] == "rate_limit_exceeded"


async def test_message_mode_explains_and_completes(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(status=401, body="unauthorized"))
    _, stream, _ = await post(proxy, {"input": "hi", "stream": True})
    assert stream[-1]["type"] == "response.completed"
    text = "".join(e["delta"] for e in stream if e["type"] == "response.output_text.delta")
    assert "SAI rejected the SAI_KEY" in text
    assert stream[-1]["response"]["status"] == "completed"
    assert stream[-1]["response"]["usage"]["total_tokens"] == 0


async def test_message_mode_early_outcome_sets_the_header(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(MAX_CONTEXT_TOKENS="10")
    for stream in (False, True):
        status, body, headers = await post(proxy, {"input": "x" * 200, "stream": stream})
        assert status == 200 and headers["X-Saiproxy-Error"] == "context_length_exceeded"
        response = body[-1]["response"] if stream else body
        assert response["status"] == "completed"
        assert "too long" in response["output"][0]["content"][0]["text"]
    assert not sai.received


async def test_both_paths_answer(proxy: Any, sai: FakeSai) -> None:
    for path in ("/responses", "/v1/responses"):
        response = await proxy.post(path, json={"input": "hi"})
        assert response.status == 200
        assert (await response.json())["output"][0]["content"][0]["text"] == "Hello from SAI"


async def test_http_mode_a_quick_failure_is_a_real_status(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    # SAI fails within the grace before response.created: nothing was sent yet.
    proxy = await make_proxy(ERROR_MODE="http", SAI_COOKIE=None)
    sai.script(Reply(status=429, body="Test template usage limit exceeded"))
    response = await proxy.post("/v1/responses", json={"input": "hi", "stream": True})
    assert response.status == 429
    assert (await response.json())["error"]["code"] == "rate_limit_exceeded"
