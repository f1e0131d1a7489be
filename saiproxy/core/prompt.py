"""A Conversation as SAI's template inputs: system text, user text, history, tools (docs/sai.md).

SAI knows three roles and plain text. Tool calls and results travel in the
history as text in one convention (the same one the model is asked to write),
and the tools and the wanted output format are described at the end of
``inputs.system``. Pure functions: no I/O, no clock unless passed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final
from xml.sax.saxutils import quoteattr

import orjson

from ..base.log import exchange_logger as log
from ..limits.rules import MAX_TOKENS
from .bounds import MAX_ARGUMENT_DEPTH, depth_exceeds
from .conversation import Conversation, OutputFormat, Tool, ToolCall, Turn
from .toolcache import PARSED_WEIGHT, ToolCaches

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "call_block",
    "chat_tool",
    "estimate_tokens",
    "header_tokens",
    "output_instructions",
    "result_block",
    "sai_payload",
    "system_text",
    "tool_instructions",
    "tool_parts",
]


TOOL_CALL_OPEN: Final = "<tool_call>"
TOOL_CALL_CLOSE: Final = "</tool_call>"


def call_block(call: ToolCall) -> str:
    """Return one call in the calling convention: ``<tool_call>{...}</tool_call>``."""
    body: dict[str, Any] = {"name": call.name}
    if call.kind == "custom":
        body["input"] = call.input
    else:
        try:
            arguments = orjson.loads(call.arguments)
        except orjson.JSONDecodeError:
            arguments = call.arguments  # as the client sent it; SAI reads text
        # Arguments nested too deep to write back out go as the client's text too.
        too_deep = depth_exceeds(arguments, MAX_ARGUMENT_DEPTH)
        body["arguments"] = call.arguments if too_deep else arguments
    return TOOL_CALL_OPEN + orjson.dumps(body).decode() + TOOL_CALL_CLOSE


def result_block(turn: Turn, names: Mapping[str, str]) -> str:
    """Return a tool result as ``<tool_result name=".." id="..">..</tool_result>``."""
    call_id = turn.call_id or ""
    name = turn.name or names.get(call_id, "")
    return f"<tool_result name={quoteattr(name)} id={quoteattr(call_id)}>{turn.text}</tool_result>"


def _sai_message(turn: Turn, names: Mapping[str, str]) -> tuple[str, str]:
    """Return (SAI role, text) for one turn: only user, assistant and system reach SAI."""
    if turn.role == "tool":
        return "user", result_block(turn, names)
    if turn.role == "assistant" and turn.calls:
        blocks = "\n".join(call_block(call) for call in turn.calls)
        return "assistant", f"{turn.text}\n{blocks}" if turn.text else blocks
    return turn.role, turn.text


def chat_tool(tool: Tool) -> dict[str, Any]:
    """Return a tool in the Chat Completions ``tools`` shape (what ``inputs.tools`` holds)."""
    if tool.kind == "custom":
        custom: dict[str, Any] = {"name": tool.name, "description": tool.description}
        if tool.format is not None:
            custom["format"] = tool.format
        return {"type": "custom", "custom": custom}
    function: dict[str, Any] = {"name": tool.name, "description": tool.description}
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    return {"type": "function", "function": function}


def _tool_lines(tool: Tool) -> str:
    head = f"- {tool.name}" + (f": {tool.description}" if tool.description else "")
    if tool.kind == "custom":
        lines = [head, '  free-form tool: call it with "input" (raw text, not JSON).']
        if tool.format is not None:
            grammar = tool.format.get("definition")
            if tool.format.get("type") == "grammar" and isinstance(grammar, str):
                syntax = tool.format.get("syntax", "grammar")
                lines.append(f"  the input must follow this {syntax}:\n{grammar}")
        return "\n".join(lines)
    schema = orjson.dumps(tool.parameters or {"type": "object", "properties": {}}).decode()
    return f"{head}\n  arguments (JSON schema): {schema}"


def tool_instructions(conversation: Conversation) -> str:
    """Return the block that teaches the model the tools and the calling convention."""
    tools = conversation.offered_tools
    if not tools:
        return ""
    free_form = any(tool.kind == "custom" for tool in tools)
    lines = [
        "# Tools",
        "",
        "You can call the tools listed below. To call a tool, end your answer with one "
        "block per call, after any text you want to say first:",
        '<tool_call>{"name": "<tool name>", "arguments": {<the arguments as a JSON object>}}'
        "</tool_call>",
    ]
    if free_form:
        lines.append(
            'For a free-form tool, write "input" with the raw text instead of "arguments": '
            '<tool_call>{"name": "<tool name>", "input": "<raw text>"}</tool_call>'
        )
    lines += [
        "Write nothing after the blocks. Each result comes back in a later message as "
        '<tool_result name="<tool name>" id="<call id>">...</tool_result>.',
    ]
    choice = conversation.tool_choice
    if choice.mode == "required":
        lines.append("You must call at least one tool in this answer.")
    elif choice.mode == "named":
        lines.append(f"You must call the tool {choice.name} in this answer.")
    else:
        lines.append("Call a tool only when it helps; otherwise answer in plain text.")
    if not conversation.parallel_tool_calls:
        lines.append("Make at most one tool call in this answer.")
    lines += ["", "## Available tools", *(_tool_lines(tool) for tool in tools)]
    return "\n".join(lines)


def output_instructions(output: OutputFormat | None) -> str:
    """Return the block that asks for JSON only (with the schema, if any)."""
    if output is None:
        return ""
    lines = [
        "# Output format",
        "",
        "Answer with one JSON object and nothing else: no prose before or after it, no code fence.",
    ]
    if output.schema is not None:
        name = f" ({output.name})" if output.name else ""
        lines.append(
            f"The JSON must follow this JSON schema{name}: {orjson.dumps(output.schema).decode()}"
        )
    return "\n".join(lines)


def tool_parts(conversation: Conversation, caches: ToolCaches | None = None) -> tuple[str, str]:
    """Return the tool instructions and ``inputs.tools`` (empty strings when none are offered).

    Kept by the tools tuple (the parsers hand out one tuple per distinct tool
    list, see core/toolcache.py) and the choice: an agent's calls repeat them,
    and building them is most of what offering tools costs per request.
    """
    tools, choice = conversation.tools, conversation.tool_choice
    if not tools or choice.mode == "none":
        return "", ""
    key = (id(tools), choice.mode, choice.name, conversation.parallel_tool_calls)
    found = caches.parts.get(key) if caches is not None else None
    if found is not None and found[0] is tools:
        return found[1], found[2]
    offered = conversation.offered_tools
    instructions = tool_instructions(conversation)
    payload = orjson.dumps([chat_tool(tool) for tool in offered]).decode() if offered else ""
    # The entry keeps the tools alive too: charged as their parsed JSON.
    if caches is not None:
        size = len(instructions) + len(payload) * (1 + PARSED_WEIGHT)
        caches.parts.put(key, (tools, instructions, payload), size)
    return instructions, payload


def system_text(conversation: Conversation, instructions: str | None = None) -> str:
    """Return ``inputs.system``: the client's system text, then the tool and output blocks."""
    if instructions is None:
        instructions = tool_parts(conversation)[0]
    parts = [conversation.system, instructions, output_instructions(conversation.output)]
    return "\n\n".join(part for part in parts if part)


def sai_payload(
    conversation: Conversation, now_ms: int, caches: ToolCaches | None = None
) -> tuple[dict[str, Any], int]:
    """Map a conversation to SAI's body; return it and the characters it carries (docs/sai.md).

    The character count covers everything the template receives once: the
    system text with its instructions, every history message and the tool
    definitions. It feeds the early context check and the token estimates.
    """
    names = {call.id: call.name for turn in conversation.turns for call in turn.calls}
    history = [_sai_message(turn, names) for turn in conversation.turns]
    instructions, tools = tool_parts(conversation, caches)
    system = system_text(conversation, instructions)
    inputs: dict[str, Any] = {"system": system, "user": history[-1][1] if history else ""}
    chars = len(system) + sum(len(text) for _, text in history)
    if tools:
        inputs["tools"] = tools
        chars += len(tools)
    payload: dict[str, Any] = {"inputs": inputs}
    if history:
        payload["chatMessages"] = [
            {"content": text, "role": role, "id": now_ms + index}
            for index, (role, text) in enumerate(history)
        ]
    return payload, chars


def estimate_tokens(chars: int) -> int:
    """Estimate tokens from characters: ``ceil(chars / 4)``."""
    return math.ceil(chars / 4)


def header_tokens(headers: Mapping[str, str], name: str, chars: int) -> int:
    """Return a token count from SAI's header, or the estimate when absent or invalid.

    A count is believed when it is a non-negative integer of at most
    MAX_TOKENS; any other value (a negative, 10^30) is SAI's error, logged once
    and replaced by the estimate, so that it can neither break the answer's
    usage nor lock a client out of its limits.
    """
    raw = headers.get(name)
    if raw is not None:
        text = raw.strip()
        if text.isascii() and text.isdigit() and len(text) <= 12 and int(text) <= MAX_TOKENS:
            return int(text)
        log.warning(
            "SAI's token count ignored: not an integer from 0 to MAX_TOKENS",
            extra={"header": name, "value": text[:40], "max_tokens": MAX_TOKENS},
        )
    return estimate_tokens(chars)
