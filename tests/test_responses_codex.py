"""A Codex CLI session replayed: its request shape, and the events it needs back.

The request follows codex-rs (``ResponsesApiRequest`` in codex-api ``common.rs``,
``ResponseItem`` in protocol ``models.rs``, the tool specs): ``instructions``,
developer and user messages with the environment context, ``reasoning`` items
with encrypted content, flat function tools (``shell``, ``update_plan``), the
free-form ``apply_patch`` tool with a Lark grammar, ``tool_choice: "auto"``,
``store: false``, ``stream: true``, ``include: ["reasoning.encrypted_content"]``,
``prompt_cache_key``. The stream is read the way codex-api ``sse/responses.rs``
reads it: items from ``response.output_item.done``, text from
``response.output_text.delta``, the turn ends only with ``response.completed``
(else "stream closed before response.completed"), and ``response.failed`` maps
its ``error.code`` (``context_length_exceeded``; ``rate_limit_exceeded`` with
the delay from "try again in N s"; anything else retried).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from .conftest import FakeSai, MakeProxy, Reply

INSTRUCTIONS = (
    "You are Codex, a coding agent running in the Codex CLI, a terminal-based coding "
    "assistant. You are expected to be precise, safe, and helpful."
)
# A short grammar in the shape of Codex's apply_patch.lark.
LARK = (
    "start: begin_patch hunk+ end_patch\n"
    'begin_patch: "*** Begin Patch" LF\n'
    'end_patch: "*** End Patch" LF?\n'
    "hunk: add_hunk | delete_hunk | update_hunk\n"
    'add_hunk: "*** Add File: " filename LF add_line+\n'
    'delete_hunk: "*** Delete File: " filename LF\n'
    'update_hunk: "*** Update File: " filename LF change?\n'
    "filename: /(.+)/\n"
    'add_line: "+" /(.*)/ LF -> line\n'
    "change: (change_context | change_line)+\n"
    'change_context: ("@@" | "@@ " /(.+)/) LF\n'
    'change_line: ("+" | "-" | " ") /(.*)/ LF\n'
    "%import common.LF\n"
)
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "shell",
        "description": "Runs a shell command and returns its output.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {
                "command": {"type": "array", "items": {"type": "string"},
                            "description": "The command to execute"},
                "workdir": {"type": "string", "description": "The working directory"},
                "timeout_ms": {"type": "number", "description": "The timeout in ms"},
            },
            "required": ["command"],
            "additionalProperties": False,
        },
    },
    {
        "type": "function",
        "name": "update_plan",
        "description": "Updates the task plan.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {
                "explanation": {"type": "string"},
                "plan": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"step": {"type": "string"}, "status": {"type": "string"}},
                    "required": ["step", "status"], "additionalProperties": False}},
            },
            "required": ["plan"],
            "additionalProperties": False,
        },
    },
    {
        "type": "custom",
        "name": "apply_patch",
        "description": "Use the `apply_patch` tool to edit files. This is a FREEFORM tool, "
        "so do not wrap the patch in JSON.",
        "format": {"type": "grammar", "syntax": "lark", "definition": LARK},
    },
]  # fmt: skip
ENVIRONMENT = (
    "<environment_context>\n  <cwd>/home/dev/app</cwd>\n  <approval_policy>on-request"
    "</approval_policy>\n  <sandbox_mode>workspace-write</sandbox_mode>\n  <network_access>"
    "restricted</network_access>\n  <shell>bash</shell>\n</environment_context>"
)
PATCH = "*** Begin Patch\n*** Update File: app.py\n@@\n-DEBUG = True\n+DEBUG = False\n*** End Patch"
HEADERS = {
    "OpenAI-Beta": "responses=experimental",
    "originator": "codex_cli_rs",
    "session_id": "0199a3c1-6f1e-7d52-9b6a-3c2f5e8d1a47",
    "conversation_id": "0199a3c1-6f1e-7d52-9b6a-3c2f5e8d1a47",
    "Accept": "text/event-stream",
    "Authorization": "Bearer unused",
}
TRY_AGAIN = re.compile(r"(?i)try again in\s*(\d+(?:\.\d+)?)\s*(s|ms|seconds?)")


def message(role: str, text: str, kind: str = "input_text") -> dict[str, Any]:
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}


def codex_request(*history: dict[str, Any]) -> dict[str, Any]:
    """Return a request body as Codex CLI builds it for one turn."""
    return {
        "model": "gpt-5-codex",
        "instructions": INSTRUCTIONS,
        "input": [
            message("developer", "<permissions instructions>Filesystem sandboxing: "
                    "workspace-write.</permissions instructions>"),
            message("user", "# AGENTS.md instructions for /home/dev/app\n\nRun make test."),
            message("user", ENVIRONMENT),
            *history,
        ],
        "tools": TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": HEADERS["session_id"],
        "text": {"verbosity": "medium"},
    }  # fmt: skip


@dataclass
class Turn:
    """What Codex's SSE reader makes of a stream."""

    created: bool = False
    text: str = ""
    added: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)
    completed: dict[str, Any] | None = None
    error: tuple[str, Any] | None = None  # (kind, detail)
    types: list[str] = field(default_factory=list)


def response_item(item: dict[str, Any]) -> dict[str, Any]:
    """Check an item the way Codex's ``ResponseItem`` deserialises it."""
    required = {
        "message": {"role": str, "content": list},
        "function_call": {"name": str, "arguments": str, "call_id": str},
        "custom_tool_call": {"call_id": str, "name": str, "input": str},
    }[item["type"]]
    for name, kind in required.items():
        assert isinstance(item.get(name), kind), (item, name)
    if item["type"] == "message":
        for part in item["content"]:
            assert part["type"] in ("output_text", "input_text") and isinstance(part["text"], str)
    return item


def read_like_codex(raw: bytes) -> Turn:
    turn = Turn()
    for frame in raw.split(b"\n\n"):
        data = [line[6:] for line in frame.split(b"\n") if line.startswith(b"data: ")]
        if not data:
            continue
        event = orjson.loads(b"\n".join(data))
        kind = event["type"]
        turn.types.append(kind)
        if kind == "response.created":
            turn.created = turn.created or "response" in event
        elif kind == "response.output_item.added":
            turn.added.append(response_item(event["item"]))
        elif kind == "response.output_item.done":
            turn.items.append(response_item(event["item"]))
        elif kind == "response.output_text.delta":
            turn.text += event["delta"]
        elif kind == "response.completed":
            response = event["response"]
            usage = response["usage"]
            assert isinstance(response["id"], str)
            for name in ("input_tokens", "output_tokens", "total_tokens"):
                assert isinstance(usage[name], int)
            assert isinstance(usage["input_tokens_details"]["cached_tokens"], int)
            assert isinstance(usage["output_tokens_details"]["reasoning_tokens"], int)
            turn.completed = response
        elif kind == "response.failed":
            error = event["response"]["error"]
            if error["code"] == "context_length_exceeded":
                turn.error = ("context_window_exceeded", None)
            else:
                found = TRY_AGAIN.search(error["message"])
                delay = None
                if error["code"] == "rate_limit_exceeded" and found:
                    delay = float(found[1]) / (1000 if found[2] == "ms" else 1)
                turn.error = ("retryable", delay)
    if turn.completed is None and turn.error is None:
        turn.error = ("stream", "stream closed before response.completed")
    return turn


async def run_turn(proxy: Any, body: dict[str, Any]) -> Turn:
    response = await proxy.post("/v1/responses", data=orjson.dumps(body), headers=HEADERS)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return read_like_codex(await response.read())


def call_block(name: str, **body: Any) -> str:
    return "<tool_call>" + orjson.dumps({"name": name, **body}).decode() + "</tool_call>"


async def test_first_turn_prose_then_apply_patch(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    answer = "I'll turn DEBUG off.\n" + call_block("apply_patch", input=PATCH)
    sai.script(Reply(body=[answer[:9], answer[9:30], answer[30:]], chunk_delay=0.01))
    turn = await run_turn(proxy, codex_request(message("user", "Turn off DEBUG in app.py")))
    assert turn.error is None and turn.created
    assert turn.types[:2] == ["response.created", "response.in_progress"]
    assert turn.types[-1] == "response.completed"
    assert turn.text == "I'll turn DEBUG off.\n"
    message_item, patch = turn.items
    assert message_item["role"] == "assistant"
    assert message_item["content"][0]["text"] == "I'll turn DEBUG off.\n"
    assert (patch["type"], patch["name"], patch["input"]) == ("custom_tool_call", "apply_patch",
                                                              PATCH)  # fmt: skip
    assert patch["call_id"].startswith("call_")
    assert [item["type"] for item in turn.added] == ["message", "custom_tool_call"]
    assert turn.completed is not None and turn.completed["output"] == turn.items

    # What SAI was told: the instructions with the leading developer message, the
    # tools in the Chat shape, the user messages as the history.
    sent = sai.received[0].json
    system = sent["inputs"]["system"]
    assert system.startswith(INSTRUCTIONS + "\n\n<permissions instructions>")
    assert "## Available tools\n- shell: Runs a shell command" in system
    assert "Make at most one tool call in this answer." in system
    assert [tool["type"] for tool in orjson.loads(sent["inputs"]["tools"])] == [
        "function", "function", "custom"
    ]  # fmt: skip
    assert [m["role"] for m in sent["chatMessages"]] == ["user", "user", "user"]
    assert sent["chatMessages"][1]["content"] == ENVIRONMENT
    assert sent["inputs"]["user"] == "Turn off DEBUG in app.py"


async def test_later_turn_with_history_is_only_a_call(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=call_block("shell", arguments={"command": ["make", "test"]})))
    history = [
        message("user", "Turn off DEBUG in app.py"),
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Plan"}],
         "encrypted_content": "gAAAAB..."},
        message("assistant", "I'll turn DEBUG off.", "output_text"),
        {"type": "custom_tool_call", "status": "completed", "call_id": "call_p1",
         "name": "apply_patch", "input": PATCH},
        {"type": "custom_tool_call_output", "call_id": "call_p1",
         "output": '{"output":"Success. Updated the following files:\\nM app.py\\n",'
                   '"metadata":{"exit_code":0,"duration_seconds":0.0}}'},
        {"type": "function_call", "name": "shell", "call_id": "call_s1",
         "arguments": '{"command":["git","diff"],"workdir":"/home/dev/app"}'},
        {"type": "function_call_output", "call_id": "call_s1", "output": "-DEBUG = True"},
    ]  # fmt: skip
    turn = await run_turn(proxy, codex_request(*history))
    assert turn.error is None
    [call] = turn.items
    assert call["type"] == "function_call" and call["name"] == "shell"
    assert orjson.loads(call["arguments"]) == {"command": ["make", "test"]}
    assert turn.text == ""  # only call items: no empty message
    roles = [(m["role"], m["content"][:30]) for m in sai.received[0].json["chatMessages"]]
    assert roles[3:] == [
        ("assistant", "I'll turn DEBUG off.\n<tool_cal"),
        ("user", '<tool_result name="apply_patch'),
        ("assistant", '<tool_call>{"name":"shell","ar'),
        ("user", '<tool_result name="shell" id="'),
    ]


async def test_rate_limit_gives_codex_its_retry_delay(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(ERROR_MODE="http", SAI_COOKIE=None)
    sai.script(Reply(status=429, body="Test template usage limit exceeded",
                     headers={"Retry-After": "12"}, delay=0.2))  # fmt: skip
    turn = await run_turn(proxy, codex_request(message("user", "hi")))
    assert turn.created and turn.error == ("retryable", 12.0)


async def test_context_too_long_stops_codex(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(ERROR_MODE="http")
    sai.script(Reply(status=500, body="openaicompatible: prompt is too long", delay=0.2))
    turn = await run_turn(proxy, codex_request(message("user", "hi")))
    assert turn.error == ("context_window_exceeded", None)


async def test_message_mode_failure_completes_the_turn(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(status=503), Reply(status=503), Reply(status=503), Reply(status=503))
    turn = await run_turn(proxy, codex_request(message("user", "hi")))
    assert turn.error is None and turn.completed is not None
    assert "SAI could not answer" in turn.text
