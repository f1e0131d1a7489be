"""Liberal in what saiproxy accepts (docs/protocols.md, "What is ignored, what is refused").

Request shapes of today's agents, sent through HTTP against the fake SAI:
unknown fields, beta headers and block or item types that carry nothing SAI
could act on are left out; hosted tools are left out of the prompt (logged);
namespace tools become callable tools; only media is refused, with a 400 that
says so. And context too long reads the way every library looks for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from .conftest import FakeSai, MakeProxy, Reply, chat, log_lines

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}  # fmt: skip
RESPONSES_WEATHER = {"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}
HOSTED = [
    {"type": "web_search", "search_context_size": "medium"},
    {"type": "file_search", "vector_store_ids": ["vs_1"]},
    {"type": "computer_use_preview", "display_width": 1024, "display_height": 768},
    {"type": "image_generation"},
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "local_shell"},
    {"type": "mcp", "server_label": "x", "server_url": "https://example.invalid"},
    {"type": "brand_new_hosted_tool_2031"},
]
# Codex's default configuration offers its MCP servers' tools in namespaces.
NAMESPACE = {
    "type": "namespace",
    "name": "mcp__files__",
    "description": "Tools of the files MCP server",
    "tools": [
        {"type": "function", "name": "read_file", "description": "Read a file",
         "strict": False, "parameters": {"type": "object",
                                         "properties": {"path": {"type": "string"}}}},
    ],
}  # fmt: skip


def _lines(tmp_path: Path, message: str) -> list[dict[str, Any]]:
    """Return the log records of one message (each once: the files may repeat a line)."""
    found = []
    for line in dict.fromkeys(log_lines(tmp_path)):
        record = json.loads(line)
        if str(record.get("message", "")).endswith(f"] {message}"):
            found.append(record)
    return found


def _sse(raw: bytes) -> list[dict[str, Any]]:
    return [
        orjson.loads(line[6:])
        for line in raw.split(b"\n")
        if line.startswith(b"data: ") and line != b"data: [DONE]"
    ]


def _tools_sent(sai: FakeSai) -> list[str]:
    inputs = sai.received[-1].json["inputs"]
    tools = orjson.loads(inputs.get("tools", "[]"))
    return [tool[tool["type"]]["name"] for tool in tools]


# --- the Responses API


async def test_hosted_tools_are_left_out_and_logged_once(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body="Sunny."))
    response = await proxy.post(
        "/v1/responses",
        json={"input": "Weather in Quito?", "tools": [*HOSTED, RESPONSES_WEATHER],
              "tool_choice": {"type": "web_search"}},
    )  # fmt: skip
    assert response.status == 200, await response.text()
    assert _tools_sent(sai) == ["get_weather"]
    assert "web_search" not in sai.received[-1].json["inputs"]["system"]
    await proxy.close()
    [line] = _lines(tmp_path, "tools SAI cannot run left out of the prompt")
    assert line["level"] == "INFO" and line["count"] == len(HOSTED)
    assert set(line["types"]) == {tool["type"] for tool in HOSTED}


async def test_only_hosted_tools_is_a_plain_answer(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body="Hello."))
    response = await proxy.post("/v1/responses", json={"input": "hi", "tools": HOSTED})
    assert response.status == 200
    assert "tools" not in sai.received[-1].json["inputs"]
    assert (await response.json())["output"][0]["content"][0]["text"] == "Hello."


@pytest.mark.parametrize("stream", [False, True])
async def test_namespace_tools_are_callable_under_codex_names(
    proxy: Any, sai: FakeSai, stream: bool
) -> None:
    sai.script(
        Reply(body='<tool_call>{"name": "mcp__files__read_file", '
                   '"arguments": {"path": "a.txt"}}</tool_call>')
    )  # fmt: skip
    body = {"input": "Read a.txt", "tools": [NAMESPACE, RESPONSES_WEATHER], "stream": stream}
    response = await proxy.post("/v1/responses", json=body)
    assert response.status == 200
    # SAI sees one flat name per tool: Codex's own flattening (namespace__name).
    assert _tools_sent(sai) == ["mcp__files__read_file", "get_weather"]
    assert "mcp__files__read_file" in sai.received[-1].json["inputs"]["system"]
    if stream:
        done = [e for e in _sse(await response.read()) if e["type"] == "response.output_item.done"]
        call = done[-1]["item"]
    else:
        [call] = (await response.json())["output"]
    # The call goes back the way Codex dispatches it: its own name and its namespace.
    assert call["type"] == "function_call"
    assert (call["name"], call["namespace"]) == ("read_file", "mcp__files__")
    assert orjson.loads(call["arguments"]) == {"path": "a.txt"}


async def test_namespaced_calls_in_the_history_use_the_flat_name(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body="It says hi."))
    body = {
        "input": [
            {"role": "user", "content": "Read a.txt"},
            {"type": "function_call", "call_id": "c1", "name": "read_file",
             "namespace": "mcp__files__", "arguments": '{"path": "a.txt"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "hi"},
        ],
        "tools": [NAMESPACE],
    }  # fmt: skip
    response = await proxy.post("/v1/responses", json=body)
    assert response.status == 200
    history = sai.received[-1].json["chatMessages"]
    assert '"name":"mcp__files__read_file"' in history[1]["content"]
    assert history[2]["content"] == (
        '<tool_result name="mcp__files__read_file" id="c1">hi</tool_result>'
    )


async def test_item_reference_resolved_or_skipped(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body="ok"))
    body = {
        "input": [
            {"id": "msg_a", "type": "message", "role": "user", "content": "First question"},
            {"type": "item_reference", "id": "msg_stored_elsewhere"},
            {"type": "item_reference", "id": "msg_a"},
        ],
    }
    response = await proxy.post("/v1/responses", json=body)
    assert response.status == 200, await response.text()
    history = sai.received[-1].json["chatMessages"]
    # The reference to an item of the request stands for it; the other is skipped.
    assert [m["content"] for m in history] == ["First question", "First question"]
    await proxy.close()
    [line] = _lines(tmp_path, "item reference not in the request, skipped")
    assert line["id"] == "msg_stored_elsewhere" and line["where"] == "input[1]"


async def test_codex_fields_and_unknown_items_are_accepted(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    proxy = await make_proxy(LOG_LEVEL="debug")
    sai.script(Reply(body="Done."))
    body = {
        "model": "gpt-5-codex",
        "instructions": "You are Codex.",
        "input": [
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Hello"},
                {"type": "some_future_part", "data": 1},
            ]},
            {"type": "reasoning", "summary": [], "encrypted_content": "gAAA"},
            {"type": "web_search_call", "status": "completed",
             "action": {"type": "search", "query": "x"}},
            {"type": "compaction_summary", "encrypted_content": "zzz"},
        ],
        "reasoning": {"effort": "medium", "summary": "auto"},
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199-abc",
        "client_metadata": {"session": "s1"},
        "store": False,
        "stream": False,
        "service_tier": "auto",
        "a_field_from_next_year": {"x": [1, 2]},
    }  # fmt: skip
    response = await proxy.post("/v1/responses", json=body)
    assert response.status == 200, await response.text()
    assert sai.received[-1].json["chatMessages"] == [
        {"content": "Hello", "role": "user", "id": sai.received[-1].json["chatMessages"][0]["id"]}
    ]
    await proxy.close()
    ignored = _lines(tmp_path, "content ignored")
    assert {line["type"] for line in ignored} >= {
        "some_future_part", "reasoning", "web_search_call",
    }  # fmt: skip
    # A compaction item saiproxy did not make (its summary is not the caller's) is left out.
    assert _lines(tmp_path, "compaction item not found for this client, left out")
    assert all(line["level"] == "DEBUG" for line in ignored)
    [fields] = _lines(tmp_path, "fields ignored")
    assert fields["fields"] == ["include", "client_metadata", "a_field_from_next_year"]


@pytest.mark.parametrize(
    ("url", "body", "kind"),
    [
        ("/v1/responses",
         {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input_image"),
        ("/v1/responses",
         {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
         "input_file"),
        ("/v1/responses",
         {"input": [{"type": "function_call_output", "call_id": "c",
                     "output": [{"type": "input_image", "image_url": "x"}]}]},
         "input_image"),
        ("/v1/chat/completions",
         chat(("user", [{"type": "image_url", "image_url": {"url": "x"}}])), "image_url"),
        ("/v1/chat/completions",
         chat(("user", [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])),
         "input_audio"),
        ("/v1/chat/completions", chat(("user", [{"type": "file", "file": {"file_id": "f"}}])),
         "file"),
    ],
)  # fmt: skip
async def test_media_is_a_400_that_says_so(
    proxy: Any, sai: FakeSai, url: str, body: dict[str, Any], kind: str
) -> None:
    response = await proxy.post(url, json=body)
    assert response.status == 400
    message = (await response.json())["error"]["message"]
    assert "text only" in message and repr(kind) in message
    assert not sai.received


# --- Chat Completions


async def test_chat_unknown_parts_and_tools_are_left_out(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body="ok"))
    body = chat(
        ("user", [{"type": "text", "text": "Hi"}, {"type": "cache_marker", "ttl": 5}]),
        tools=[{"type": "web_search_preview"},
               {"type": "function", "function": {"name": "get_weather",
                                                 "parameters": WEATHER_SCHEMA}}],
        tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
        verbosity="low",
        unknown_field=True,
    )  # fmt: skip
    response = await proxy.post("/v1/chat/completions", json=body)
    assert response.status == 200, await response.text()
    assert sai.received[-1].json["inputs"]["user"] == "Hi"
    assert _tools_sent(sai) == ["get_weather"]


# --- Anthropic Messages

ANTHROPIC_HEADERS = {
    "anthropic-version": "2023-06-01",
    # Whatever the beta: ignored.
    "anthropic-beta": "claude-code-20250219,mid-conversation-system-2026-04-07,"
    "context-management-2025-06-27,a-beta-from-2031-01-01",
}


def _claude_code_body(**extra: Any) -> dict[str, Any]:
    cache = {"type": "ephemeral", "ttl": "1h"}
    return {
        "model": "claude-opus-5",
        "max_tokens": 32000,
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": cache},
            {"type": "some_system_annotation", "x": 1},
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "List the files", "cache_control": cache},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "ls", "signature": "s"},
                {"type": "redacted_thinking", "data": "xx"},
                {"type": "server_tool_use", "id": "srv", "name": "web_search", "input": {}},
                {"type": "web_search_tool_result", "tool_use_id": "srv", "content": []},
                {"type": "text", "text": "Listing."},
                {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                 "input": {"command": "ls"}, "cache_control": cache},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                    {"type": "text", "text": "a.txt"},
                    {"type": "tool_reference", "tool_name": "Bash"},
                ], "cache_control": cache},
            ]},
            {"role": "system", "content": "The user switched to plan mode."},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "Now summarise."},
            {"role": "system", "content": [{"type": "text", "text": "Answer briefly.",
                                            "cache_control": cache}]},
        ],
        "tools": [
            {"name": "Bash", "description": "Run a command", "input_schema": {
                "type": "object", "properties": {"command": {"type": "string"}}},
             "cache_control": cache, "eager_input_streaming": True},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
            {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
        ],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_abc_account_def_session_ghi"},
        "cache_control": {"type": "ephemeral"},
        "diagnostics": {"enabled": True},
        "a_field_from_next_year": [1],
        **extra,
    }  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
async def test_claude_code_newest_shape_is_accepted(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path, stream: bool
) -> None:
    proxy = await make_proxy(LOG_LEVEL="debug")
    sai.script(Reply(body="Two files."))
    response = await proxy.post(
        "/v1/messages?beta=true", json=_claude_code_body(stream=stream), headers=ANTHROPIC_HEADERS
    )
    assert response.status == 200, await response.text()
    raw = await response.read()
    assert b"Two files." in raw
    received = sai.received[-1].json
    history = [(m["role"], m["content"]) for m in received["chatMessages"]]
    assert history == [
        ("user", "List the files"),
        ("assistant", 'Listing.\n<tool_call>{"name":"Bash","arguments":{"command":"ls"}}'
                      "</tool_call>"),
        ("user", '<tool_result name="Bash" id="toolu_1">a.txt</tool_result>'),
        # Mid-conversation: a system turn where it stands.
        ("system", "The user switched to plan mode."),
        ("assistant", "Noted."),
        # Ending the conversation: before the user turn it follows, so that
        # inputs.user stays the user's words.
        ("system", "Answer briefly."),
        ("user", "Now summarise."),
    ]  # fmt: skip
    assert received["inputs"]["user"] == "Now summarise."
    assert received["inputs"]["system"].startswith("You are Claude Code.")
    assert _tools_sent(sai) == ["Bash"]  # server and Anthropic-defined tools left out
    await proxy.close()
    [line] = _lines(tmp_path, "tools SAI cannot run left out of the prompt")
    assert line["types"] == ["text_editor_20250728", "web_search_20250305"]
    ignored = {line["type"] for line in _lines(tmp_path, "content ignored")}
    assert ignored >= {
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "tool_reference",
        "some_system_annotation",
    }
    assert not [line for line in log_lines(tmp_path) if '"level": "WARNING"' in line]
    # Top-level fields and beta features: accepted, no effect, said at DEBUG.
    [fields] = _lines(tmp_path, "fields ignored")
    assert fields["level"] == "DEBUG"
    assert set(fields["fields"]) == {
        "thinking", "context_management", "cache_control", "diagnostics",
        "a_field_from_next_year",
    }  # fmt: skip
    [betas] = _lines(tmp_path, "beta features ignored")
    assert betas["betas"] == ANTHROPIC_HEADERS["anthropic-beta"]


async def test_leading_system_messages_join_the_system_text(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body="ok"))
    body = {
        "max_tokens": 10,
        "system": "Base.",
        "messages": [{"role": "system", "content": "Extra."}, {"role": "user", "content": "hi"}],
    }
    response = await proxy.post("/v1/messages", json=body)
    assert response.status == 200
    received = sai.received[-1].json
    assert received["inputs"]["system"] == "Base.\n\nExtra."
    assert [m["role"] for m in received["chatMessages"]] == ["user"]


@pytest.mark.parametrize(
    ("block", "kind"),
    [
        ({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                      "data": "AA=="}}, "image"),
        ({"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                         "data": "JVBERi0="}}, "document"),
        ({"type": "document", "source": {"type": "url", "url": "https://example.invalid/a.pdf"}},
         "document"),
        ({"type": "audio", "source": {}}, "audio"),
    ],
)  # fmt: skip
async def test_messages_media_is_a_400_that_says_so(
    proxy: Any, sai: FakeSai, block: dict[str, Any], kind: str
) -> None:
    for content in (
        [block],
        [{"type": "tool_result", "tool_use_id": "t", "content": [block]}],
    ):
        response = await proxy.post(
            "/v1/messages",
            json={"max_tokens": 5, "messages": [{"role": "user", "content": content}]},
        )
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert "text only" in error["message"] and f"{kind} block" in error["message"]
    assert not sai.received


async def test_messages_plain_text_documents_reach_sai_as_text(proxy: Any, sai: FakeSai) -> None:
    # A document whose source is text is text SAI can read: not refused, not dropped.
    notes = {
        "type": "document",
        "title": "notes.txt",
        "source": {"type": "text", "media_type": "text/plain", "data": "buy milk"},
    }
    pages = {
        "type": "document",
        "source": {
            "type": "content",
            "content": [{"type": "text", "text": "page one"}, {"type": "text", "text": "page two"}],
        },
    }
    sai.script(Reply(body="ok"))
    body = {"max_tokens": 5, "messages": [{"role": "user", "content": [
        notes, pages, {"type": "text", "text": "Summarise."}]}]}  # fmt: skip
    response = await proxy.post("/v1/messages", json=body)
    assert response.status == 200, await response.text()
    assert sai.received[-1].json["inputs"]["user"] == (
        "notes.txt\nbuy milk\npage one\npage two\nSummarise."
    )


async def test_non_streamed_text_blocks_carry_no_citations(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body="Hi."))
    response = await proxy.post(
        "/v1/messages", json={"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert (await response.json())["content"] == [{"type": "text", "text": "Hi."}]
    sai.script(Reply(body="Hi."))
    response = await proxy.post(
        "/v1/messages",
        json={"max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert b"citations" not in await response.read()


# --- Anthropic structured output

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}  # fmt: skip


@pytest.mark.parametrize(
    "shape",
    [
        {"output_config": {"format": {"type": "json_schema", "schema": PERSON}, "effort": "low"}},
        {"output_format": {"type": "json_schema", "schema": PERSON}},
    ],
)
async def test_anthropic_structured_output_is_emulated(
    proxy: Any, sai: FakeSai, shape: dict[str, Any]
) -> None:
    # Fenced, and then wrong: unfenced, checked, and asked once more.
    sai.script(
        Reply(body='```json\n{"name": "Ada"}\n```'),
        Reply(body='```json\n{"name": "Ada", "age": 36}\n```'),
    )
    body = {"max_tokens": 50, "messages": [{"role": "user", "content": "Who?"}], **shape}
    response = await proxy.post("/v1/messages", json=body)
    assert response.status == 200
    message = await response.json()
    assert message["content"] == [{"type": "text", "text": '{"name": "Ada", "age": 36}'}]
    first, repair = sai.received
    system = first.json["inputs"]["system"]
    assert "Answer with one JSON object" in system and '"age"' in system
    assert "could not be used" in repair.json["inputs"]["user"]


async def test_anthropic_structured_output_streamed_is_unfenced(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=["```js", 'on\n{"name": "Ada",', ' "age": 36}\n`', "``\n"],
                     chunk_delay=0.01))  # fmt: skip
    body = {
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "Who?"}],
        "output_config": {"format": {"type": "json_schema", "schema": PERSON}},
    }
    response = await proxy.post("/v1/messages", json=body)
    text = "".join(
        event["delta"]["text"]
        for event in _sse(await response.read())
        if event["type"] == "content_block_delta"
    )
    assert orjson.loads(text) == {"name": "Ada", "age": 36}


# --- context too long, on every protocol and in both error modes

LONG = "word " * 20  # 25 tokens by saiproxy's estimate
CONTEXT_URLS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", chat(("user", LONG))),
    "completions": ("/v1/completions", {"prompt": LONG}),
    "responses": ("/v1/responses", {"input": LONG}),
    "messages": ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user",
                                                                 "content": LONG}]}),
}  # fmt: skip


def _answer_text(protocol: str, body: Any) -> str:
    if protocol == "chat":
        return str(body["choices"][0]["message"]["content"])
    if protocol == "completions":
        return str(body["choices"][0]["text"])
    if protocol == "responses":
        return str(body["output"][0]["content"][0]["text"])
    return str(body["content"][0]["text"])


def _error_text(body: Any) -> str:
    return str(body["error"]["message"])


@pytest.mark.parametrize("protocol", list(CONTEXT_URLS))
@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("mode", ["http", "message"])
async def test_context_too_long_reads_as_every_library_looks_for_it(
    make_proxy: MakeProxy, sai: FakeSai, protocol: str, early: bool, mode: str
) -> None:
    # early: saiproxy's own estimate is over MAX_CONTEXT_TOKENS; else SAI says so.
    env = {"ERROR_MODE": mode, **({"MAX_CONTEXT_TOKENS": "10"} if early else {})}
    proxy = await make_proxy(**env)
    sai.script(Reply(status=500, body="prompt is too long: 250000 tokens"))
    url, body = CONTEXT_URLS[protocol]
    response = await proxy.post(url, json=body)
    data = await response.json()
    if mode == "http":
        assert response.status == 400
        text = _error_text(data)
    else:
        assert response.status == 200
        text = _answer_text(protocol, data)
        if protocol == "messages":
            assert data["stop_reason"] == "end_turn"  # Claude Code shows it
    # Anthropic's wording (LiteLLM's anthropic/ mapping, Claude Code) and
    # OpenAI's (LiteLLM's openai mapping, which aider's context help follows).
    assert "prompt is too long" in text
    assert "This model's maximum context length is" in text
    if early:
        assert "maximum context length is 10 tokens" in text
        assert not sai.received


async def test_namespace_custom_tool_and_default_namespace(proxy: Any, sai: FakeSai) -> None:
    # A free-form tool inside a namespace, and Codex's default namespace "functions",
    # whose tools keep their plain names.
    tools = [
        {"type": "namespace", "name": "editor", "tools": [
            {"type": "custom", "name": "patch", "description": "Apply a patch"}]},
        {"type": "namespace", "name": "functions", "tools": [
            {"type": "function", "name": "exec_command", "parameters": {"type": "object"}}]},
    ]  # fmt: skip
    sai.script(
        Reply(body='<tool_call>{"name": "editor__patch", "input": "*** Begin Patch"}</tool_call>'
                   '<tool_call>{"name": "exec_command", "arguments": {}}</tool_call>')
    )  # fmt: skip
    response = await proxy.post("/v1/responses", json={"input": "Go", "tools": tools})
    assert response.status == 200
    assert _tools_sent(sai) == ["editor__patch", "exec_command"]
    assert "- editor__patch" in sai.received[-1].json["inputs"]["system"]
    patch, command = (await response.json())["output"]
    assert patch["type"] == "custom_tool_call" and patch["input"] == "*** Begin Patch"
    assert (patch["name"], patch["namespace"]) == ("patch", "editor")
    assert (command["name"], command["namespace"]) == ("exec_command", "functions")


@pytest.mark.parametrize("stream", [False, True])
async def test_codex_additional_tools_item_offers_its_tools(
    proxy: Any, sai: FakeSai, stream: bool
) -> None:
    # Codex's default configuration: no top-level tools; they ride in an
    # additional_tools input item, its shell runs inside the free-form "exec".
    body = {
        "model": "gpt-6.2-sol",
        "stream": stream,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "low", "context": "all_turns"},
        "text": {"verbosity": "low"},
        "input": [
            {"type": "additional_tools", "id": "at_1", "role": "developer", "tools": [
                {"type": "namespace", "name": "functions", "description": "", "tools": [
                    {"type": "custom", "name": "exec", "description": "Run JavaScript",
                     "format": {"type": "grammar", "syntax": "lark",
                                "definition": "start: /.+/"}},
                    {"type": "function", "name": "wait", "strict": False,
                     "parameters": {"type": "object", "properties": {}}}]},
                {"type": "namespace", "name": "clock", "tools": [
                    {"type": "function", "name": "sleep", "parameters": {"type": "object"}}]},
                {"type": "web_search"},
            ]},
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "You are Codex."}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Create f.txt"}]},
        ],
    }  # fmt: skip
    sai.script(Reply(body='<tool_call>{"name": "exec", "input": "await tools.x()"}</tool_call>'))
    response = await proxy.post("/v1/responses", json=body)
    assert response.status == 200
    assert _tools_sent(sai) == ["exec", "wait", "clock__sleep"]
    received = sai.received[-1].json
    assert received["inputs"]["system"].startswith("You are Codex.")
    assert received["inputs"]["user"] == "Create f.txt"
    if stream:
        done = [e for e in _sse(await response.read()) if e["type"] == "response.output_item.done"]
        call = done[-1]["item"]
    else:
        [call] = (await response.json())["output"]
    assert call["type"] == "custom_tool_call" and call["input"] == "await tools.x()"
    assert (call["name"], call["namespace"]) == ("exec", "functions")


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "web_search"}, {"type": "any"}])
async def test_messages_tool_choice_of_a_server_tool_is_auto(
    proxy: Any, sai: FakeSai, choice: dict[str, Any]
) -> None:
    sai.script(Reply(body="Looked it up."))
    body = {
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "News?"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        "tool_choice": choice,
    }
    response = await proxy.post("/v1/messages", json=body)
    assert response.status == 200, await response.text()
    assert "tools" not in sai.received[-1].json["inputs"]


async def test_messages_search_results_reach_sai_as_text(proxy: Any, sai: FakeSai) -> None:
    result = {
        "type": "search_result", "title": "Quito weather", "source": "https://example.invalid/q",
        "content": [{"type": "text", "text": "18 C and cloudy"}], "citations": {"enabled": True},
    }  # fmt: skip
    sai.script(Reply(body="18 C."))
    body = {
        "max_tokens": 50,
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "search", "input": {"q": "Quito"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [result]},
                result,
            ]},
        ],
    }  # fmt: skip
    response = await proxy.post("/v1/messages", json=body)
    assert response.status == 200, await response.text()
    history = [m["content"] for m in sai.received[-1].json["chatMessages"]]
    expected = "Quito weather https://example.invalid/q\n18 C and cloudy"
    assert history[2] == f'<tool_result name="search" id="t1">{expected}</tool_result>'
    assert history[3] == expected


async def test_tool_choice_can_name_a_namespace_tool(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body="ok"))
    choice = {"type": "function", "name": "read_file", "namespace": "mcp__files__"}
    body = {"input": "Read", "tools": [NAMESPACE, RESPONSES_WEATHER], "tool_choice": choice}
    response = await proxy.post("/v1/responses", json=body)
    assert response.status == 200, await response.text()
    assert _tools_sent(sai) == ["mcp__files__read_file"]  # the named tool alone
    assert (
        "You must call the tool mcp__files__read_file" in sai.received[-1].json["inputs"]["system"]
    )
