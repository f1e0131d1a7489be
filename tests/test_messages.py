"""Anthropic Messages over plain HTTP: the request mapping, the Message, the SSE events, errors."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse

from saiproxy.base.errors import InvalidRequest, ProxyError
from saiproxy.core.prompt import estimate_tokens, sai_payload
from saiproxy.protocols.anthropic import error_body, parse

from .conftest import FakeSai, MakeProxy, Reply

URL = "/v1/messages"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
MESSAGE_KEYS = {
    "id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage",
    "stop_details", "container", "diagnostics",
}  # fmt: skip
USAGE_KEYS = {
    "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
    "cache_creation", "server_tool_use", "output_tokens_details", "service_tier", "speed",
    "inference_geo",
}  # fmt: skip


def body(*messages: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    """Return a Messages body from (role, content) pairs."""
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": role, "content": content} for role, content in messages],
        **extra,
    }


async def events(response: ClientResponse) -> list[tuple[str, dict[str, Any]]]:
    """Return the SSE events of a response as (event name, data)."""
    text = (await response.read()).decode()
    found = []
    for frame in text.split("\n\n"):
        lines = [line for line in frame.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        name, data = lines[0][7:], orjson.loads(lines[1][6:])
        assert data["type"] == name  # Anthropic repeats the event name in the data
        found.append((name, data))
    return found


# --- the request, as SAI gets it


def test_parse_maps_blocks_tools_and_results() -> None:
    conversation = parse(
        body(
            ("user", [{"type": "text", "text": "Weather in Paris?",
                       "cache_control": {"type": "ephemeral"}}]),
            ("assistant", [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                 "input": {"city": "Paris"}},
            ]),
            ("user", [
                {"type": "tool_result", "tool_use_id": "toolu_01",
                 "content": [{"type": "text", "text": "18 C"}, {"type": "text", "text": "sunny"}]},
                {"type": "tool_result", "tool_use_id": "toolu_02", "content": "boom",
                 "is_error": True},
                {"type": "text", "text": "And tomorrow?"},
            ]),
            system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "Use metric units."}],
            tools=[WEATHER],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            stop_sequences=["END", ""],
            stream=True,
        )
    )  # fmt: skip
    assert conversation.system == "Be brief.\nUse metric units."
    assert [(t.role, t.text) for t in conversation.turns] == [
        ("user", "Weather in Paris?"),
        ("assistant", "Checking."),
        ("tool", "18 C\nsunny"),
        ("tool", "The tool reported an error:\nboom"),
        ("user", "And tomorrow?"),
    ]
    call = conversation.turns[1].calls[0]
    assert (call.id, call.name, orjson.loads(call.arguments)) == (
        "toolu_01", "get_weather", {"city": "Paris"},
    )  # fmt: skip
    assert conversation.turns[2].call_id == "toolu_01"
    assert conversation.tool_choice.mode == "required"
    assert conversation.parallel_tool_calls is False
    assert conversation.stop == ("END",)
    assert conversation.stream is True
    assert conversation.tools[0].parameters == WEATHER["input_schema"]


@pytest.mark.parametrize(
    ("choice", "mode", "name"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "none"}, "none", None),
        ({"type": "any"}, "required", None),
        ({"type": "tool", "name": "get_weather"}, "named", "get_weather"),
    ],
)
def test_tool_choice(choice: dict[str, Any], mode: str, name: str | None) -> None:
    conversation = parse(body(("user", "hi"), tools=[WEATHER], tool_choice=choice))
    assert (conversation.tool_choice.mode, conversation.tool_choice.name) == (mode, name)
    assert conversation.parallel_tool_calls is True


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"max_tokens": None}, "'max_tokens' is required"),
        ({"max_tokens": 0}, "positive integer"),
        ({"max_tokens": True}, "positive integer"),
        ({"messages": []}, "at least one message"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "user, assistant or system"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "source": {}}]}]},
         "an audio block"),
        ({"output_config": {"format": {"type": "xml"}}}, "takes json_schema"),
        ({"output_format": {"type": "json_schema"}}, "'output_format.schema' must be"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AA=="}}]}]}, "text only"),
        ({"messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                            "data": "JVBERi0="}}]}]}, "text only"),
        ({"messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t",
             "content": [{"type": "image", "source": {}}]}]}]}, "text only"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t",
                                                       "name": "x", "input": {}}]}]},
         "does not support"),
        ({"tools": [{"name": "x"}]}, "input_schema"),
        ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER]}, "not in 'tools'"),
        ({"tool_choice": {"type": "any"}}, "needs 'tools'"),
        ({"tool_choice": "auto"}, "must be an object"),
        ({"stop_sequences": "END"}, "array of strings"),
        ({"system": [{"type": "image", "source": {}}]}, "text only"),
        ({"metadata": "x"}, "'metadata' must be an object"),
    ],
)  # fmt: skip
def test_invalid_requests(change: dict[str, Any], fragment: str) -> None:
    request = body(("user", "hi"))
    request.update(change)
    if request.get("max_tokens") is None:
        request.pop("max_tokens")
    with pytest.raises(InvalidRequest, match=fragment):
        parse(request)


async def test_sai_receives_system_history_and_tool_results(proxy: Any, sai: FakeSai) -> None:
    response = await proxy.post(
        URL,
        json=body(
            ("user", "Weather in Paris?"),
            ("assistant", [{"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                            "input": {"city": "Paris"}}]),
            ("user", [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 C"}]),
            system="Be brief.",
            tools=[WEATHER],
        ),
    )  # fmt: skip
    assert response.status == 200
    inputs = sai.received[0].json["inputs"]
    assert inputs["system"].startswith("Be brief.\n\n# Tools")
    assert orjson.loads(inputs["tools"])[0]["function"]["name"] == "get_weather"
    history = sai.received[0].json["chatMessages"]
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "Weather in Paris?"),
        ("assistant", CALL.replace(": ", ":").replace(", ", ",")),
        ("user", '<tool_result name="get_weather" id="toolu_01">18 C</tool_result>'),
    ]
    assert inputs["user"] == history[-1]["content"]


# --- the Message object


async def test_message_object(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body="Paris.", headers={"prompttokens": "9", "completiontokens": "2",
                                             "model": "sai-large"}))  # fmt: skip
    response = await proxy.post(
        f"{URL}?beta=true",
        json=body(("user", "Capital of France?"), metadata={"user_id": "u-1"}),
        headers={"anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31"},
    )
    assert response.status == 200
    message = await response.json()
    assert set(message) == MESSAGE_KEYS
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["model"]) == ("message", "assistant",
                                                                       "sai-large")  # fmt: skip
    # No "citations": null (the Vercel AI SDK's schema refuses it).
    assert message["content"] == [{"type": "text", "text": "Paris."}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("end_turn", None)
    assert set(message["usage"]) == USAGE_KEYS
    assert (message["usage"]["input_tokens"], message["usage"]["output_tokens"]) == (9, 2)


async def test_message_with_tool_use(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=f"Let me look.\n{CALL}"))
    response = await proxy.post(URL, json=body(("user", "Weather?"), tools=[WEATHER]))
    message = await response.json()
    assert message["stop_reason"] == "tool_use"
    text, tool_use = message["content"]
    assert text["type"] == "text" and text["text"].startswith("Let me look.")
    assert tool_use["type"] == "tool_use"
    assert tool_use["id"].startswith("toolu_")
    assert (tool_use["name"], tool_use["input"]) == ("get_weather", {"city": "Paris"})


async def test_only_a_tool_call_has_no_empty_text_block(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=CALL))
    message = await (await proxy.post(URL, json=body(("user", "W?"), tools=[WEATHER]))).json()
    assert [block["type"] for block in message["content"]] == ["tool_use"]


async def test_stop_sequence(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=["one two ST", "OP three"]))
    message = await (
        await proxy.post(URL, json=body(("user", "count"), stop_sequences=["STOP"]))
    ).json()
    assert message["content"][0]["text"] == "one two "
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "STOP")


async def test_short_route_without_v1(proxy: Any, sai: FakeSai) -> None:
    response = await proxy.post("/messages", json=body(("user", "hi")))
    assert (await response.json())["content"][0]["text"] == "Hello from SAI"


# --- streaming


def _order(found: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in found if name != "ping"]


async def test_stream_events(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=["Bon", "jour ", "👋"], chunk_delay=0.02,
                     headers={"prompttokens": "7", "completiontokens": "3"}))  # fmt: skip
    response = await proxy.post(URL, json=body(("user", "hi"), stream=True))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    found = await events(response)
    assert _order(found) == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    start = found[0][1]["message"]
    assert set(start) == MESSAGE_KEYS
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] > 0
    deltas = [d["delta"]["text"] for n, d in found if n == "content_block_delta"]
    assert deltas == ["Bon", "jour ", "👋"]
    assert {d["index"] for n, d in found if n.startswith("content_block")} == {0}
    delta = found[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert (delta["usage"]["input_tokens"], delta["usage"]["output_tokens"]) == (7, 3)


async def test_stream_with_tool_use(proxy: Any, sai: FakeSai) -> None:
    second = CALL.replace("Paris", "Lyon")
    sai.script(Reply(body=["Checking both. ", CALL[:20], CALL[20:] + "\n" + second]))
    response = await proxy.post(URL, json=body(("user", "W?"), tools=[WEATHER], stream=True))
    found = await events(response)
    assert _order(found) == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    starts = [d for n, d in found if n == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert starts[1]["content_block"]["type"] == "tool_use"
    assert starts[1]["content_block"]["input"] == {}
    assert starts[1]["content_block"]["id"].startswith("toolu_")
    json_deltas = [d["delta"] for n, d in found if n == "content_block_delta"][1:]
    assert [orjson.loads(d["partial_json"]) for d in json_deltas] == [
        {"city": "Paris"}, {"city": "Lyon"},
    ]  # fmt: skip
    assert all(d["type"] == "input_json_delta" for d in json_deltas)
    assert found[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_stream_starts_at_once_and_pings_while_sai_works(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(PING_INTERVAL="0.1")
    sai.script(Reply(body="late", delay=0.35))
    response = await proxy.post(URL, json=body(("user", "hi"), stream=True))
    first = await response.content.readuntil(b"\n\n")
    assert first.startswith(b"event: message_start\n")
    raw = (await response.read()).decode()
    assert 'event: ping\ndata: {"type": "ping"}\n\n' in raw
    assert raw.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')


# --- count_tokens


async def test_count_tokens_matches_the_early_estimate(proxy: Any, sai: FakeSai) -> None:
    request = body(("user", "What is the weather in Paris?"), system="Be brief.", tools=[WEATHER])
    request.pop("max_tokens")  # count_tokens does not take it
    response = await proxy.post(f"{URL}/count_tokens?beta=true", json=request)
    assert response.status == 200
    counted = (await response.json())["input_tokens"]
    assert counted == estimate_tokens(sai_payload(parse(request, counting=True), 0)[1])
    # The tool definitions and instructions count: far more than the words alone.
    assert counted > estimate_tokens(len("What is the weather in Paris?Be brief.")) + 50
    assert sai.received == []


async def test_count_tokens_and_the_early_check_agree(make_proxy: MakeProxy, sai: FakeSai) -> None:
    request = body(("user", "x" * 400), tools=[WEATHER])
    proxy = await make_proxy()
    counted = (await (await proxy.post(f"{URL}/count_tokens", json=request)).json())["input_tokens"]
    tight = await make_proxy(MAX_CONTEXT_TOKENS=str(counted - 1), ERROR_MODE="http")
    response = await tight.post(URL, json=request)
    assert response.status == 400
    assert "prompt is too long" in (await response.json())["error"]["message"]
    roomy = await make_proxy(MAX_CONTEXT_TOKENS=str(counted), ERROR_MODE="http")
    assert (await roomy.post(URL, json=request)).status == 200


# --- errors


async def assert_error(response: ClientResponse, status: int, kind: str) -> str:
    assert response.status == status, await response.text()
    data = await response.json()
    assert data["type"] == "error"
    assert set(data["error"]) == {"type", "message"}
    assert data["error"]["type"] == kind
    assert response.headers["X-Request-ID"]
    message: str = data["error"]["message"]
    return message


@pytest.mark.parametrize(
    "path",
    ["/v1/messages/batches", "/v1/messages/batches/msgbatch_1/results", "/messages/nope"],
)
async def test_unknown_paths_under_messages_are_anthropic_404s(proxy: Any, path: str) -> None:
    await assert_error(await proxy.get(path), 404, "not_found_error")


async def test_wrong_method_is_an_anthropic_error(proxy: Any) -> None:
    response = await proxy.get(URL)
    await assert_error(response, 405, "invalid_request_error")
    assert "POST" in response.headers["Allow"]


async def test_elsewhere_errors_stay_openai_shaped(proxy: Any) -> None:
    data = await (await proxy.get("/v1/nothing")).json()
    assert data["error"]["code"] == "not_found"


async def test_invalid_json_and_missing_max_tokens(proxy: Any) -> None:
    await assert_error(await proxy.post(URL, data=b"{"), 400, "invalid_request_error")
    request = body(("user", "hi"))
    del request["max_tokens"]
    message = await assert_error(await proxy.post(URL, json=request), 400, "invalid_request_error")
    assert "max_tokens" in message


async def test_body_too_large(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(MAX_BODY_BYTES="2048")
    response = await proxy.post(URL, json=body(("user", "x" * 4096)))
    await assert_error(response, 413, "request_too_large")


async def test_unknown_model_when_strict(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(STRICT_MODELS="true")
    await assert_error(await proxy.post(URL, json=body(("user", "hi"))), 404, "not_found_error")
    request = body(("user", "hi"))
    await assert_error(
        await proxy.post(f"{URL}/count_tokens", json=request), 404, "not_found_error"
    )


# SAI's outcomes in http mode: (replies, Anthropic status, error type, text fragment).
HTTP_OUTCOMES: dict[str, tuple[list[Reply], int, str, str]] = {
    "401": ([Reply(status=401)], 401, "authentication_error", "SAI_KEY"),
    "429": ([Reply(status=429, body="Test template usage limit exceeded",
                   headers={"Retry-After": "7"})], 429, "rate_limit_error", "usage limit"),
    "context": ([Reply(status=500, body="prompt is too long")], 400, "invalid_request_error",
                "prompt is too long"),
    "500": ([Reply(status=500, body="internal")] * 3, 500, "api_error", "HTTP 500"),
    "timeout": ([Reply(delay=2.0)] * 3, 504, "timeout_error", "did not answer"),
}  # fmt: skip
ENV = {"MAX_RETRIES": "2", "REQUEST_TIMEOUT": "0.3"}


@pytest.mark.parametrize("name", list(HTTP_OUTCOMES))
async def test_outcomes_in_http_mode(make_proxy: MakeProxy, sai: FakeSai, name: str) -> None:
    replies, status, kind, fragment = HTTP_OUTCOMES[name]
    proxy = await make_proxy(ERROR_MODE="http", **ENV)
    sai.script(*replies)
    response = await proxy.post(URL, json=body(("user", "hi")))
    assert fragment in await assert_error(response, status, kind)
    if name == "429":
        assert response.headers["Retry-After"] == "7"


@pytest.mark.parametrize("name", list(HTTP_OUTCOMES))
async def test_outcomes_in_http_mode_after_the_stream_started(
    make_proxy: MakeProxy, sai: FakeSai, name: str
) -> None:
    replies, _, kind, fragment = HTTP_OUTCOMES[name]
    proxy = await make_proxy(ERROR_MODE="http", **ENV)
    # SAI answers after the stream opened (EAGER_GRACE): the failure is in-band.
    sai.script(*[dataclasses.replace(reply, delay=max(reply.delay, 0.2)) for reply in replies])
    response = await proxy.post(URL, json=body(("user", "hi"), stream=True))
    assert response.status == 200  # message_start went out before SAI answered
    found = await events(response)
    assert _order(found) == ["message_start", "error"]
    error = found[-1][1]["error"]
    assert error["type"] == kind and fragment in error["message"]


async def test_early_context_check_is_a_real_status_even_streamed(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(ERROR_MODE="http", MAX_CONTEXT_TOKENS="10")
    response = await proxy.post(URL, json=body(("user", "x" * 200), stream=True))
    message = await assert_error(response, 400, "invalid_request_error")
    assert message.startswith("prompt is too long")
    assert sai.received == []


# Message mode: the explanation is the answer, with a stop reason every client accepts.
MESSAGE_OUTCOMES: dict[str, tuple[list[Reply], str, str, str]] = {
    "401": ([Reply(status=401)], "end_turn", "invalid_api_key", "SAI_KEY"),
    "429": ([Reply(status=429, body="Test template usage limit exceeded")], "end_turn",
            "rate_limit_exceeded", "usage limit"),
    # end_turn, not max_tokens: Claude Code hides the text of a max_tokens answer.
    "context": ([Reply(status=500, body="prompt is too long")], "end_turn",
                "context_length_exceeded", "maximum context length"),
    "500": ([Reply(status=500, body="internal")] * 3, "end_turn", "upstream_error", "HTTP 500"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MESSAGE_OUTCOMES))
async def test_outcomes_in_message_mode(make_proxy: MakeProxy, sai: FakeSai, name: str) -> None:
    replies, stop_reason, code, fragment = MESSAGE_OUTCOMES[name]
    proxy = await make_proxy(**ENV)
    sai.script(*replies)
    response = await proxy.post(URL, json=body(("user", "hi")))
    assert response.status == 200
    assert response.headers["X-Saiproxy-Error"] == code
    message = await response.json()
    assert message["stop_reason"] == stop_reason
    assert fragment in message["content"][0]["text"]
    assert (message["usage"]["input_tokens"], message["usage"]["output_tokens"]) == (0, 0)


@pytest.mark.parametrize("name", list(MESSAGE_OUTCOMES))
async def test_outcomes_in_message_mode_streamed(
    make_proxy: MakeProxy, sai: FakeSai, name: str
) -> None:
    replies, stop_reason, _, fragment = MESSAGE_OUTCOMES[name]
    proxy = await make_proxy(**ENV)
    sai.script(*replies)
    found = await events(await proxy.post(URL, json=body(("user", "hi"), stream=True)))
    assert _order(found) == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    assert fragment in found[2][1]["delta"]["text"]
    assert found[-2][1]["delta"]["stop_reason"] == stop_reason


async def test_stream_broken_mid_way_ends_truncated(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(**ENV)
    sai.script(Reply(body=["partial ", "answer ", "never"], chunk_delay=0.05, reset_after=2))
    found = await events(await proxy.post(URL, json=body(("user", "hi"), stream=True)))
    texts = "".join(d["delta"]["text"] for n, d in found if n == "content_block_delta")
    assert texts.startswith("partial answer ")
    assert found[-2][1]["delta"]["stop_reason"] == "max_tokens"  # truncated, never end_turn
    assert _order(found)[-2:] == ["message_delta", "message_stop"]


# --- proxy access


async def test_proxy_keys_in_x_api_key_or_bearer(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(PROXY_API_KEYS="pk-alpha-111, pk-beta-222")
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"},
                    {"Authorization": "pk-alpha-111"}):  # fmt: skip
        response = await proxy.post(URL, json=body(("user", "hi")), headers=headers)
        message = await assert_error(response, 401, "authentication_error")
        assert "x-api-key" in message
    for headers in ({"x-api-key": "pk-alpha-111"}, {"Authorization": "Bearer pk-beta-222"},
                    {"x-api-key": "wrong", "Authorization": "Bearer pk-alpha-111"}):  # fmt: skip
        response = await proxy.post(URL, json=body(("user", "hi")), headers=headers)
        assert response.status == 200
    # Every guarded path takes either header.
    models = await proxy.get("/v1/models", headers={"x-api-key": "pk-beta-222"})
    assert models.status == 200
    chat = await proxy.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": "pk-beta-222"},
    )
    assert chat.status == 200
    count = await proxy.post(f"{URL}/count_tokens", json=body(("user", "hi")))
    await assert_error(count, 401, "authentication_error")


async def test_users_own_key_in_the_user_api_key_header(proxy: Any, sai: FakeSai) -> None:
    # What ANTHROPIC_CUSTOM_HEADERS="user-api-key: ..." makes Claude Code send.
    response = await proxy.post(
        URL, json=body(("user", "hi")), headers={"user-api-key": "users-own-key-123"}
    )
    assert response.status == 200
    assert sai.received[0].auth == ("X-Api-Key", "users-own-key-123")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, (400, "invalid_request_error")),
        (401, (401, "authentication_error")),
        (403, (403, "permission_error")),
        (404, (404, "not_found_error")),
        (405, (405, "invalid_request_error")),
        (413, (413, "request_too_large")),
        (429, (429, "rate_limit_error")),
        (500, (500, "api_error")),
        (502, (500, "api_error")),
        (503, (529, "overloaded_error")),
        (504, (504, "timeout_error")),
        (507, (500, "api_error")),
    ],
)
def test_statuses_map_onto_anthropics(status: int, expected: tuple[int, str]) -> None:
    error = ProxyError("something")
    error.status = status
    mapped, data = error_body(error)
    assert (mapped, data["error"]["type"]) == expected
    assert data == {"type": "error", "error": {"type": expected[1], "message": "something"}}
