"""A replay of requests shaped like Claude Code's, from its public gateway documentation.

Claude Code (``ANTHROPIC_BASE_URL`` pointed at saiproxy) posts to
``/v1/messages?beta=true`` with ``anthropic-version``, ``anthropic-beta``,
``x-app: cli`` and its key in ``x-api-key`` (``ANTHROPIC_API_KEY``) or
``Authorization: Bearer`` (``ANTHROPIC_AUTH_TOKEN``); custom headers come from
``ANTHROPIC_CUSTOM_HEADERS``. Its body has system text blocks with
``cache_control``, thinking settings, tools with JSON schemas, assistant turns
with ``thinking`` and ``tool_use`` blocks, and tool results followed by
``<system-reminder>`` text; it always streams. Every event it gets back is
checked against the official SDK's types, strictly.
"""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
from anthropic.types import Message, RawMessageStreamEvent

from .conftest import FakeSai, MakeProxy, Reply
from .test_messages import events

EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
PROXY_KEY = "pk-team-2f9c"
USER_KEY = "users-own-sai-key-77"


def headers(**extra: str) -> dict[str, str]:
    """Return the headers Claude Code sends (its own SDK's stainless headers included)."""
    return {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
        "fine-grained-tool-streaming-2025-05-14",
        "anthropic-dangerous-direct-browser-access": "true",
        "x-app": "cli",
        "User-Agent": "claude-cli/2.0.36 (external, cli)",
        "X-Claude-Code-Session-Id": "b4e5aaaa-9a3e-47c4-84ad-3a70f38c676e",
        "x-stainless-helper-method": "stream",
        "x-stainless-lang": "js",
        "x-stainless-retry-count": "0",
        "x-stainless-timeout": "600",
        "accept": "application/json",
        **extra,
    }


TOOLS = [
    {
        "name": "Bash",
        "description": "Executes a given bash command in a persistent shell session.",
        "input_schema": {
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "The command to execute"},
                "timeout": {"type": "number"},
                "description": {"type": "string"},
            },
            "required": ["command"],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
    },
    {
        "name": "Read",
        "description": "Reads a file from the local filesystem.",
        "input_schema": {
            "type": "object",
            "properties": {"file_path": {"type": "string"}, "limit": {"type": "number"}},
            "required": ["file_path"],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
        "cache_control": {"type": "ephemeral"},
    },
]
EPHEMERAL = {"type": "ephemeral"}
REMINDER = "<system-reminder>\nThis is a reminder. Do not mention it.\n</system-reminder>"


def claude_code_body(**extra: Any) -> dict[str, Any]:
    """Return a second-turn Claude Code request: a Bash call made, its result back."""
    return {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "temperature": 1,
        "stream": True,
        "metadata": {
            "user_id": "user_0784b260bff170af_account_261d5434-c8c2-431f-b07d-2e480cd4622f"
            "_session_b4e5aaaa-9a3e-47c4-84ad-3a70f38c676e"
        },
        "system": [
            {"type": "text",
             "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": EPHEMERAL},
            {"type": "text",
             "text": "You are an interactive CLI tool that helps users with software "
                     "engineering tasks.",
             "cache_control": EPHEMERAL},
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": REMINDER},
                {"type": "text", "text": "What does this project do?", "cache_control": EPHEMERAL},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should look at the files.",
                 "signature": "EqQBCkYIBxgCKkA"},
                {"type": "text", "text": "Let me look at the files."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9",
                 "name": "Bash", "input": {"command": "ls", "description": "List files"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                 "content": "README.md\nsaiproxy\nsetup.cfg", "is_error": False},
                {"type": "text", "text": REMINDER, "cache_control": EPHEMERAL},
            ]},
        ],
        "tools": TOOLS,
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        **extra,
    }  # fmt: skip


READ_CALL = '<tool_call>{"name": "Read", "arguments": {"file_path": "README.md"}}</tool_call>'


async def test_claude_code_turn_streams_what_it_needs(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(PROXY_API_KEYS=PROXY_KEY)
    sai.script(Reply(body=["I'll read ", "the README.\n", READ_CALL[:30], READ_CALL[30:]],
                     chunk_delay=0.01))  # fmt: skip
    response = await proxy.post(
        "/v1/messages?beta=true",
        json=claude_code_body(),
        headers=headers(**{"x-api-key": PROXY_KEY, "user-api-key": USER_KEY}),
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    found = await events(response)
    # Every event validates against the SDK's own types, and accumulates into a Message.
    parsed = [EVENT.validate_python(data, strict=False) for _, data in found]
    assert [event.type for event in parsed] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    start = found[0][1]["message"]
    Message.model_validate(start)
    tool_use = found[5][1]["content_block"]
    assert (tool_use["type"], tool_use["name"]) == ("tool_use", "Read")
    assert orjson.loads(found[6][1]["delta"]["partial_json"]) == {"file_path": "README.md"}
    assert found[8][1]["delta"]["stop_reason"] == "tool_use"

    # SAI got the user's own key, the system blocks, the tools, and the history.
    received = sai.received[0]
    assert received.auth == ("X-Api-Key", USER_KEY)
    inputs = received.json["inputs"]
    assert inputs["system"].startswith(
        "You are Claude Code, Anthropic's official CLI for Claude.\nYou are an interactive CLI tool"
    )
    assert [tool["function"]["name"] for tool in orjson.loads(inputs["tools"])] == [
        "Bash", "Read",
    ]  # fmt: skip
    history = received.json["chatMessages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "user"]
    assert history[0]["content"] == f"{REMINDER}\nWhat does this project do?"
    assert history[1]["content"].startswith("Let me look at the files.\n<tool_call>")
    assert "I should look" not in history[1]["content"]  # thinking is not sent
    assert history[2]["content"] == (
        '<tool_result name="Bash" id="toolu_01A09q90qw90lq917835lq9">'
        "README.md\nsaiproxy\nsetup.cfg</tool_result>"
    )
    assert inputs["user"] == REMINDER


async def test_claude_code_auth_token_and_count_tokens(make_proxy: MakeProxy, sai: FakeSai) -> None:
    # ANTHROPIC_AUTH_TOKEN arrives as a bearer token; /v1/messages/count_tokens is optional
    # for gateways but Claude Code uses it when it is there.
    proxy = await make_proxy(PROXY_API_KEYS=PROXY_KEY)
    auth = {"Authorization": f"Bearer {PROXY_KEY}"}
    request = claude_code_body()
    for name in ("stream", "max_tokens", "temperature", "metadata"):
        request.pop(name)
    response = await proxy.post(
        "/v1/messages/count_tokens?beta=true", json=request, headers=headers(**auth)
    )
    assert response.status == 200
    assert (await response.json())["input_tokens"] > 100
    # A quick non-streamed side request (titles, summaries) works the same way.
    sai.script(Reply(body="Project overview"))
    response = await proxy.post(
        "/v1/messages?beta=true",
        json={"model": "claude-haiku-4-5-20251001", "max_tokens": 512,
              "system": [{"type": "text", "text": "Write a 3-word title."}],
              "messages": [{"role": "user", "content": "What does this project do?"}]},
        headers=headers(**auth),
    )  # fmt: skip
    message = Message.model_validate(await response.json())
    assert message.content[0].text == "Project overview"  # type: ignore[union-attr]
    assert message.model == "claude-haiku-4-5-20251001"


async def test_claude_code_without_the_proxy_key(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(PROXY_API_KEYS=PROXY_KEY)
    response = await proxy.post(
        "/v1/messages?beta=true", json=claude_code_body(), headers=headers(**{"x-api-key": "sk"})
    )
    assert response.status == 401
    assert (await response.json())["error"]["type"] == "authentication_error"


async def test_claude_code_context_too_long_in_http_mode(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    # Anthropic's wording for it: "prompt is too long", a 400 invalid_request_error.
    proxy = await make_proxy(ERROR_MODE="http", MAX_CONTEXT_TOKENS="50")
    response = await proxy.post(
        "/v1/messages?beta=true", json=claude_code_body(), headers=headers()
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("prompt is too long")
    assert sai.received == []
