"""Anthropic Messages requests: a Messages (or count_tokens) body into the neutral conversation.

``system`` (a string or text blocks), messages of ``text``, ``tool_use`` and
``tool_result`` blocks (mid-conversation ``system`` messages too), client
tools, ``tool_choice`` and a JSON-schema output format. Images, documents and
audio are refused; blocks, tools and fields SAI could not act on (thinking,
server tools, cache control, beta features) are left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import orjson

from ...base.errors import InvalidRequest
from ...core import bounds, toolcache
from ...core.conversation import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    Conversation,
    OutputFormat,
    Tool,
    ToolCall,
    ToolChoice,
    Turn,
    check_count,
)
from ...core.toolcache import ToolCaches
from .. import openai

__all__ = ["CLIENT_TOOL_TYPES", "MEDIA_BLOCKS", "USED_FIELDS", "parse"]

# Content the answer would silently miss if it were dropped: refused with a 400.
# Any other block SAI cannot use (thinking, server tool blocks, types saiproxy
# does not know) carries nothing it could act on and is left out.
MEDIA_BLOCKS: Final = frozenset({"image", "document", "audio", "video", "file", "container_upload"})
CLIENT_TOOL_TYPES: Final = (None, "custom")
# The top-level fields saiproxy reads (of output_config, only its format).
USED_FIELDS: Final = frozenset(
    {"model", "max_tokens", "messages", "system", "tools", "tool_choice", "stop_sequences",
     "stream", "metadata", "output_config", "output_format"}
)  # fmt: skip


def parse(body: Any, *, counting: bool = False, caches: ToolCaches | None = None) -> Conversation:
    """Validate a Messages body (or a count_tokens body) and return its conversation."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    if not counting:
        _max_tokens(body.get("max_tokens"))
    raw_messages = body.get("messages")
    if raw_messages is None:
        raise InvalidRequest("'messages' is required", param="messages")
    if not isinstance(raw_messages, list):
        raise InvalidRequest("'messages' must be an array of message objects", param="messages")
    check_count(raw_messages, MAX_MESSAGES, "messages", "messages")
    if not raw_messages:
        raise InvalidRequest("'messages' must contain at least one message", param="messages")
    leading, turns = _turns(raw_messages)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequest("'metadata' must be an object", param="metadata")
    raw_tools = body.get("tools")
    tools = (
        toolcache.parsed_tools(raw_tools, "anthropic", _tools, caches)
        if raw_tools is not None
        else ()
    )
    left_out = _left_out(raw_tools)
    choice, parallel = _tool_choice(body.get("tool_choice"), tools, left_out)
    system = "\n\n".join(text for text in (_system(body.get("system")), *leading) if text)
    return Conversation(
        turns,
        system=system,
        model=openai.model_name(body),
        stream=False if counting else openai.flag(body, "stream"),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        stop=_stop_sequences(body.get("stop_sequences")),
        output=_output_format(body),
    )


def _turns(raw_messages: list[Any]) -> tuple[list[str], list[Turn]]:
    """Return the system texts that lead ``messages`` and the turns of the rest.

    A ``role: "system"`` message (Anthropic's mid-conversation system message)
    is a system turn where it stands. One that ends the conversation (it
    applies to the next answer) goes before the message it follows, so the
    user's words stay SAI's ``inputs.user``.
    """
    per_message = [_message(raw, index) for index, raw in enumerate(raw_messages)]
    leading: list[str] = []
    while len(per_message) > 1 and _is_system(per_message[0]):
        leading += [turn.text for turn in per_message.pop(0) if turn.text]
    trailing: list[list[Turn]] = []
    while len(per_message) > 1 and _is_system(per_message[-1]):
        trailing.insert(0, per_message.pop())
    if trailing:
        per_message[-1:-1] = trailing
    return leading, [turn for turns in per_message for turn in turns]


def _is_system(turns: list[Turn]) -> bool:
    return len(turns) == 1 and turns[0].role == "system"


def _output_format(body: dict[str, Any]) -> OutputFormat | None:
    """Return the JSON schema asked for in ``output_config.format`` or ``output_format``.

    ``output_config`` also carries settings SAI has no use for (``effort``):
    only its ``format`` is read. ``output_format`` is the older, beta shape.
    """
    config = body.get("output_config")
    spec = config.get("format") if isinstance(config, dict) else None
    param = "output_config.format"
    if spec is None:
        spec, param = body.get("output_format"), "output_format"
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise InvalidRequest(f"'{param}' must be an object", param=param)
    kind = spec.get("type")
    if kind != "json_schema":
        shown = kind[:40] if isinstance(kind, str) else type(kind).__name__
        raise InvalidRequest(
            f"'{param}.type' is {shown!r}: saiproxy takes json_schema", param=param
        )
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{param}.schema' must be a JSON schema object", param=param)
    return OutputFormat(schema)


def _max_tokens(value: Any) -> None:
    # SAI's template decides the length, but Anthropic requires the field, and
    # clients that forget it should learn here rather than from Anthropic later.
    if value is None:
        raise InvalidRequest("'max_tokens' is required", param="max_tokens")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest("'max_tokens' must be a positive integer", param="max_tokens")


def _kind(block: Any, where: str) -> str:
    if not isinstance(block, dict):
        raise InvalidRequest(f"{where} must be a content block object", param=where)
    kind = block.get("type")
    if not isinstance(kind, str):
        raise InvalidRequest(f"{where}.type must be a string", param=where)
    if kind == "document" and _document_text(block) is not None:
        return "text"  # a plain-text document is text SAI can read
    if kind in MEDIA_BLOCKS:
        raise InvalidRequest(
            f"SAI templates accept text only: {where} is {'an' if kind[0] in 'aeiou' else 'a'} "
            f"{kind[:40]} block; send its content as text, or leave it out",
            param=where,
        )
    return kind


def _unsupported(kind: str, where: str) -> InvalidRequest:
    return InvalidRequest(
        f"{where} has type {kind[:40]!r}, which saiproxy does not support here", param=where
    )


def _document_text(block: dict[str, Any]) -> str | None:
    """Return a document block's text (its title first) when its source is plain text.

    Anthropic's ``text`` and ``content`` sources carry the document as text;
    any other source (a PDF, a file, a URL) is a file SAI cannot read: None.
    """
    source = block.get("source")
    if not isinstance(source, dict):
        return None
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        body: str = source["data"]
    elif source.get("type") == "content" and isinstance(source.get("content"), str):
        body = source["content"]
    elif source.get("type") == "content" and isinstance(source.get("content"), list):
        parts = source["content"]
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            return None  # an image among the pages
        body = "\n".join(p["text"] for p in parts if isinstance(p.get("text"), str))
    else:
        return None
    title = block.get("title")
    return f"{title}\n{body}" if isinstance(title, str) and title else body


def _text(block: dict[str, Any], where: str) -> str:
    if block.get("type") == "document":
        return _document_text(block) or ""
    text = block.get("text")
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}.text must be a string", param=where)
    return text


def _system(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidRequest("'system' must be a string or an array of text blocks", param="system")
    return _texts(value, "system")


def _read_blocks(
    blocks: list[Any], where: str
) -> Iterator[tuple[dict[str, Any], str, str, str | None]]:
    """Yield each block (as read) with where it stands, its type, and its text when it reads
    as text (see _block_text), else None."""
    for index, block in enumerate(blocks):
        at = f"{where}[{index}]"
        kind = _kind(block, at)
        yield block, at, kind, _block_text(block, kind, at)


def _texts(blocks: list[Any], where: str) -> str:
    """Return the text of text blocks joined by newlines; other blocks are left out."""
    texts: list[str] = []
    for _block, at, kind, text in _read_blocks(blocks, where):
        if text is not None:
            texts.append(text)
        else:
            openai.ignored(at, kind)
    return "\n".join(texts)


def _block_text(block: dict[str, Any], kind: str, where: str) -> str | None:
    """Return what a block that reads as text says (text, search result), else None."""
    if kind == "text":
        return _text(block, where)
    if kind == "search_result":
        return _search_result(block, where)
    return None


def _search_result(block: dict[str, Any], where: str) -> str:
    """Return a search result block as text: its title and source, then its text blocks."""
    content = block.get("content")
    body = _texts(content, f"{where}.content") if isinstance(content, list) else ""
    head = " ".join(
        str(block[key]) for key in ("title", "source") if isinstance(block.get(key), str)
    )
    return f"{head}\n{body}" if head and body else head or body


def _message(raw: Any, index: int) -> list[Turn]:
    """Return the turns of one message: a user message may carry tool results and text."""
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    role = raw.get("role")
    if role not in ("user", "assistant", "system"):
        raise InvalidRequest(
            f"{where}.role must be user, assistant or system", param=f"{where}.role"
        )
    content = raw.get("content")
    if isinstance(content, str):
        return [Turn(role, content)]
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{where}.content must be a string or an array of content blocks",
            param=f"{where}.content",
        )
    check_count(content, MAX_CONTENT_PARTS, f"{where}.content", "content blocks")
    if role == "system":
        return [Turn("system", _texts(content, f"{where}.content"))]
    if role == "assistant":
        return [_assistant(content, where)]
    return _user(content, where)


def _user(content: list[Any], where: str) -> list[Turn]:
    turns: list[Turn] = []
    texts: list[str] = []
    for block, at, kind, text in _read_blocks(content, f"{where}.content"):
        if text is not None:
            texts.append(text)
        elif kind == "tool_result":
            # Results answer the previous turn's calls; text that came before them
            # (rare) stays before them.
            if texts:
                turns.append(Turn("user", "\n".join(texts)))
                texts = []
            turns.append(_tool_result(block, at))
        elif kind == "tool_use":
            raise _unsupported(kind, at)  # the model's own calls: a user cannot send them
        else:
            openai.ignored(at, kind)
    if texts or not turns:
        turns.append(Turn("user", "\n".join(texts)))
    return turns


def _assistant(content: list[Any], where: str) -> Turn:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for index, block in enumerate(content):
        at = f"{where}.content[{index}]"
        kind = _kind(block, at)
        if kind == "text":
            texts.append(_text(block, at))
        elif kind == "tool_use":
            calls.append(_tool_use(block, at))
        elif kind == "tool_result":
            raise _unsupported(kind, at)  # results come from the user
        else:
            openai.ignored(at, kind)
    return Turn("assistant", "\n".join(texts), tuple(calls))


def _tool_use(block: dict[str, Any], where: str) -> ToolCall:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not isinstance(name, str):
        raise InvalidRequest(f"{where} needs a string id and name", param=where)
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{where}.input must be an object", param=where)
    return ToolCall(call_id, name, "function", orjson.dumps(arguments).decode())


def _tool_result(block: dict[str, Any], where: str) -> Turn:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise InvalidRequest(f"{where}.tool_use_id must be a string", param=where)
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = _texts(content, f"{where}.content")
    else:
        raise InvalidRequest(
            f"{where}.content must be a string or an array of text blocks", param=where
        )
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise InvalidRequest(f"{where}.is_error must be a boolean", param=where)
    if is_error:
        # SAI's convention has no error flag: the model reads it in the result.
        text = f"The tool reported an error:\n{text}"
    return Turn("tool", text, call_id=call_id)


def _tools(value: Any) -> tuple[Tool, ...]:
    """Return the client tools SAI is told about (server tools are left out)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest("'tools' must be an array of tools", param="tools")
    tools: list[Tool] = []
    for index, spec in enumerate(value):
        where = f"tools[{index}]"
        if not isinstance(spec, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        if spec.get("type") not in CLIENT_TOOL_TYPES:
            continue  # see _left_out
        name = spec.get("name")
        description = spec.get("description")
        schema = spec.get("input_schema")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{where}.name is required and must be a string", param=where)
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(f"{where}.description must be a string", param=where)
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{where}.input_schema must be a JSON schema object", param=where)
        tools.append(Tool(name, description or "", "function", parameters=schema))
    return tuple(tools)


def _left_out(value: Any) -> frozenset[str]:
    """Log the tools SAI cannot run (once per request); return their names.

    Server tools (web search, code execution) and Anthropic-defined ones
    (bash, text editor, computer use) have nothing SAI could run.
    """
    if not isinstance(value, list):
        return frozenset()
    hosted = [
        spec for spec in value
        if isinstance(spec, dict) and spec.get("type") not in CLIENT_TOOL_TYPES
    ]  # fmt: skip
    if not hosted:
        return frozenset()
    openai.hosted_tools_left_out(
        [kind[:40] if isinstance(kind := spec.get("type"), str) else "(no type)" for spec in hosted]
    )
    return frozenset(spec["name"] for spec in hosted if isinstance(spec.get("name"), str))


def _tool_choice(
    value: Any, tools: tuple[Tool, ...], left_out: frozenset[str] = frozenset()
) -> tuple[ToolChoice, bool]:
    """Return the tool choice and whether parallel calls are allowed.

    A choice that needs a tool left out of the prompt (a server tool) becomes
    ``auto``: the model chooses among the tools it was told about.
    """
    if value is None:
        return ToolChoice(), True
    if not isinstance(value, dict):
        raise InvalidRequest("'tool_choice' must be an object", param="tool_choice")
    disable_parallel = value.get("disable_parallel_tool_use")
    if disable_parallel is not None and not isinstance(disable_parallel, bool):
        raise InvalidRequest(
            "'tool_choice.disable_parallel_tool_use' must be a boolean", param="tool_choice"
        )
    parallel = not disable_parallel
    kind = value.get("type")
    if kind == "auto":
        return ToolChoice("auto"), parallel
    if kind == "none":
        return ToolChoice("none"), parallel
    if kind == "any":
        if not tools:
            if left_out:
                return ToolChoice("auto"), parallel
            raise InvalidRequest("'tool_choice' any needs 'tools'", param="tool_choice")
        return ToolChoice("required"), parallel
    if kind == "tool":
        name = value.get("name")
        if isinstance(name, str) and name in left_out:
            return ToolChoice("auto"), parallel
        if not isinstance(name, str) or name not in {tool.name for tool in tools}:
            raise InvalidRequest(
                "'tool_choice' names a tool that is not in 'tools'", param="tool_choice"
            )
        return ToolChoice("named", name), parallel
    raise InvalidRequest("'tool_choice.type' must be auto, any, tool or none", param="tool_choice")


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidRequest("'stop_sequences' must be an array of strings", param="stop_sequences")
    return bounds.stop_sequences(value, "stop_sequences", bounds.ANTHROPIC_MAX_STOPS)
