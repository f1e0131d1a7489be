"""OpenAI Responses requests: a Responses body into the neutral conversation and the settings
the Response echoes.

Function and custom tools; hosted tools are left out of the prompt (logged),
tools offered inside a namespace become tools of their own, and an
``item_reference`` found neither in the request nor in the store is skipped.
Stored prompts are refused with a 400 that names them.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from ...base.errors import InvalidRequest
from ...base.log import protocols_logger as log
from ...core.conversation import MAX_MESSAGES, Conversation, ToolCall, Turn, check_count
from ...core.toolcache import ToolCaches
from .. import openai

__all__ = ["ECHOED", "STATEFUL_FIELDS", "SYSTEM_ROLES", "USED_FIELDS", "parse"]

SYSTEM_ROLES: Final = frozenset({"system", "developer"})
# Present and not null, these need state saiproxy does not keep.
STATEFUL_FIELDS: Final = {
    "prompt": "stored prompt templates are not supported: send 'instructions' and 'input'",
}
# Settings echoed in the Response object as the client sent them (or these defaults).
ECHOED: Final[dict[str, Any]] = {
    "max_output_tokens": None,
    "max_tool_calls": None,
    "prompt_cache_key": None,
    "safety_identifier": None,
    "service_tier": "default",
    "temperature": 1.0,
    "top_logprobs": 0,
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
}
# The top-level fields saiproxy reads, or echoes in the Response.
USED_FIELDS: Final = frozenset(
    {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
     "stream", "metadata", "store", "reasoning", "background", "previous_response_id",
     "conversation", *STATEFUL_FIELDS, *ECHOED}
)  # fmt: skip


def _text(value: Any, param: str) -> str:
    """Return a tool output or message content: a string or an array of text parts."""
    return openai.content_text(value, param)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}.{key} is required and must be a string", param=where)
    return value


def _with_call(turns: list[Turn], call: ToolCall) -> None:
    """Attach a call to the assistant turn just before it, or open one."""
    if turns and turns[-1].role == "assistant":
        last = turns[-1]
        turns[-1] = Turn("assistant", last.text, (*last.calls, call))
    else:
        turns.append(Turn("assistant", "", (call,)))


def _call_name(item: dict[str, Any], where: str) -> str:
    """Return a call's tool name as SAI knows it: flat, when the tool sits in a namespace."""
    name = _string(item, "name", where)
    namespace = item.get("namespace")
    return openai.flat_name(namespace, name) if isinstance(namespace, str) else name


def _item_turn(turns: list[Turn], item: dict[str, Any], where: str) -> None:
    """Add one input item to ``turns``; an item SAI could not use is left out."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise InvalidRequest(
                f"{where}.role must be user, assistant, system or developer",
                param=f"{where}.role",
            )
        text = _text(item.get("content"), f"{where}.content")
        turns.append(Turn("system" if role in SYSTEM_ROLES else role, text))
    elif kind == "function_call":
        arguments = item.get("arguments")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments if arguments is not None else {}).decode()
        call_id, name = _string(item, "call_id", where), _call_name(item, where)
        _with_call(turns, ToolCall(call_id, name, "function", arguments))
    elif kind == "custom_tool_call":
        call_id = _string(item, "call_id", where)
        raw_input = item.get("input")
        _with_call(
            turns,
            ToolCall(call_id, _call_name(item, where), "custom",
                     input=raw_input if isinstance(raw_input, str) else ""),
        )  # fmt: skip
    elif kind == "additional_tools":
        pass  # offered tools (see _offered_tools), not a turn
    elif kind in ("function_call_output", "custom_tool_call_output"):
        output = _text(item.get("output"), f"{where}.output")
        turns.append(Turn("tool", output, call_id=_string(item, "call_id", where)))
    else:
        # Reasoning, the calls and results of hosted tools, and types saiproxy
        # does not know: nothing SAI could act on.
        openai.ignored(where, kind)


def _turns(raw: Any) -> list[Turn]:
    if isinstance(raw, str):
        return [Turn("user", raw)]
    if not isinstance(raw, list):
        raise InvalidRequest("'input' must be a string or an array of input items", param="input")
    check_count(raw, MAX_MESSAGES, "input", "items")
    turns: list[Turn] = []
    by_id: dict[str, dict[str, Any]] | None = None
    for index, item in enumerate(raw):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        if item.get("type") == "item_reference":
            if by_id is None:
                by_id = {
                    entry["id"]: entry
                    for entry in raw
                    if isinstance(entry, dict)
                    and isinstance(entry.get("id"), str)
                    and entry.get("type") != "item_reference"
                }
            ref = item.get("id")
            found = by_id.get(ref) if isinstance(ref, str) else None
            if found is None:
                # It points at a stored item (saiproxy stores none): left out.
                log.info(
                    "item reference not in the request, skipped",
                    extra={"where": where, "id": ref[:80] if isinstance(ref, str) else None},
                )
                continue
            item = found
        _item_turn(turns, item, where)
    return turns


def _offered_tools(tools: Any, raw_input: Any) -> Any:
    """Return the offered tools: ``tools``, then those of ``additional_tools`` input items.

    Codex's default configuration (its "responses lite" requests) sends no
    top-level ``tools``: they ride in an ``additional_tools`` item of ``input``.
    """
    extra: list[Any] = []
    if isinstance(raw_input, list):
        for item in raw_input:
            if isinstance(item, dict) and item.get("type") == "additional_tools":
                more = item.get("tools")
                if isinstance(more, list):
                    extra += more
    if not extra or (tools is not None and not isinstance(tools, list)):
        return tools  # (a malformed ``tools`` is refused as such)
    return [*(tools or []), *extra]


def _object(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise InvalidRequest(f"'{name}' must be an object", param=name)
    return value


def parse(body: Any, caches: ToolCaches | None = None) -> tuple[Conversation, dict[str, Any]]:
    """Validate a Responses body; return the conversation and the settings the Response echoes."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    for name, why in STATEFUL_FIELDS.items():
        if body.get(name) is not None:
            raise InvalidRequest(f"'{name}' is not supported: {why}", param=name)
    raw_input = body.get("input")
    if raw_input is None or raw_input == [] or raw_input == "":
        raise InvalidRequest("'input' is required: a string or an array of items", param="input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("'instructions' must be a string", param="instructions")
    turns = _turns(raw_input)
    # Leading developer/system messages join the instructions as SAI's system
    # text, as long as something follows them; later ones stay system turns.
    system = [instructions] if instructions else []
    leading = 0
    while leading < len(turns) - 1 and turns[leading].role == "system":
        leading += 1
    system += [turn.text for turn in turns[:leading] if turn.text]
    del turns[:leading]

    text = _object(body, "text") or {}
    tools = openai.tools(_offered_tools(body.get("tools"), raw_input), flat=True, caches=caches)
    conversation = Conversation(
        turns,
        system="\n\n".join(system),
        model=openai.model_name(body),
        stream=openai.flag(body, "stream"),
        tools=tools,
        tool_choice=openai.tool_choice(body.get("tool_choice"), tools, flat=True),
        parallel_tool_calls=openai.flag(body, "parallel_tool_calls", True),
        output=openai.json_format(text.get("format"), "text.format", flat=True),
    )
    metadata = _object(body, "metadata") or {}
    echo: dict[str, Any] = {
        "instructions": instructions,
        # The user's SAI key may ride in metadata (the auth chain's metadata handler);
        # it is not echoed back.
        "metadata": {k: v for k, v in metadata.items() if k != "user_api_key"},
        "parallel_tool_calls": conversation.parallel_tool_calls,
        "reasoning": _object(body, "reasoning") or {"effort": None, "summary": None},
        "store": openai.flag(body, "store", True),
        "text": {"format": {"type": "text"}, "verbosity": "medium", **text},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        **{name: body.get(name, default) for name, default in ECHOED.items()},
    }
    return conversation, echo
