"""Pieces the OpenAI-shaped protocols share: content parts, tools, finish reasons, errors."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from ..core import limits, toolcache
from ..core.conversation import (
    MAX_CONTENT_PARTS,
    Finish,
    OutputFormat,
    Tool,
    ToolChoice,
    Usage,
    check_count,
)
from ..errors import InvalidRequest, ProxyError
from ..middlewares import error_response

TEXT_PART_TYPES: Final = frozenset({"text", "input_text", "output_text"})
MAX_MODEL_CHARS: Final = 256

FINISH_REASONS: Final[dict[Finish, str]] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "stop_sequence": "stop",
}


class OpenAIErrors:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""

    def response(self, error: ProxyError) -> web.Response:
        """Return the error as its HTTP status and OpenAI error object."""
        return error_response(error)


def content_text(content: Any, param: str) -> str:
    """Return the text of a message's content: a string, null, or text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{param} must be a string, null or an array of content parts", param=param
        )
    check_count(content, MAX_CONTENT_PARTS, param, "content parts")
    texts: list[str] = []
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            raise InvalidRequest(f"{param}[{index}] must be an object", param=param)
        kind = part.get("type")
        if not isinstance(kind, str):
            raise InvalidRequest(f"{param}[{index}].type must be a string", param=param)
        if kind in TEXT_PART_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{param}[{index}].text must be a string", param=param)
            texts.append(text)
        elif kind == "refusal":
            refusal = part.get("refusal")
            texts.append(refusal if isinstance(refusal, str) else "")
        else:
            raise InvalidRequest(
                f"SAI templates accept text only: {param}[{index}] has type {kind[:40]!r}",
                param=param,
            )
    return "\n".join(texts)


def model_name(body: dict[str, Any]) -> str | None:
    """Return the requested model name, checked."""
    model = body.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"'model' is longer than {MAX_MODEL_CHARS} characters", param="model")
    return model


def flag(body: dict[str, Any], name: str, default: bool = False) -> bool:
    """Return a boolean field, checked."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean", param=name)
    return value


def _schema(value: Any, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON schema object", param=param)
    return value


def _name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{param} is required and must be a string", param=param)
    return value


def _text(value: Any, param: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{param} must be a string", param=param)
    return value


def unsupported_type(kind: Any, where: str, accepted: str) -> InvalidRequest:
    """Return the 400 for an item whose ``type`` saiproxy does not take.

    ``accepted`` says what it does take; the type is shown cut to 40 characters.
    """
    shown = kind[:40] if isinstance(kind, str) else type(kind).__name__
    return InvalidRequest(f"{where} has type {shown!r}: {accepted}", param=where)


def tool(spec: Any, param: str, *, flat: bool) -> Tool:
    """Parse one offered tool: Chat's nested shape, or the Responses API's flat one."""
    if not isinstance(spec, dict):
        raise InvalidRequest(f"{param} must be an object", param=param)
    kind = spec.get("type")
    if kind not in ("function", "custom"):
        raise unsupported_type(kind, param, "saiproxy emulates function and custom tools only")
    body = spec if flat else spec.get(kind)
    if not isinstance(body, dict):
        raise InvalidRequest(f"{param}.{kind} must be an object", param=param)
    name = _name(body.get("name"), f"{param}.name")
    description = _text(body.get("description"), f"{param}.description")
    if kind == "function":
        schema = _schema(body.get("parameters"), f"{param}.parameters")
        return Tool(name, description, "function", parameters=schema)
    return Tool(name, description, "custom", format=_schema(body.get("format"), f"{param}.format"))


def tools(value: Any, param: str = "tools", *, flat: bool = False) -> tuple[Tool, ...]:
    """Parse the offered tools.

    An agent sends the same tools with every call: the parsed tuple is kept by
    the tools' content (core/toolcache.py), so the same tools are parsed once
    and are the same object (the prompt builder keeps their instructions by it).
    """
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest(f"'{param}' must be an array of tools", param=param)
    return toolcache.parsed_tools(
        value,
        f"openai-flat-{param}" if flat else f"openai-{param}",
        lambda specs: tuple(tool(spec, f"{param}[{i}]", flat=flat) for i, spec in enumerate(specs)),
    )


def tool_choice(value: Any, offered: tuple[Tool, ...], *, flat: bool = False) -> ToolChoice:
    """Parse ``tool_choice``: auto, none, required, or one named function or custom tool."""
    if value is None:
        return ToolChoice()
    if value in ("auto", "none", "required"):
        return ToolChoice(value)
    if isinstance(value, dict) and value.get("type") in ("function", "custom"):
        kind = value["type"]
        inner = value if flat else value.get(kind)
        name = inner.get("name") if isinstance(inner, dict) else None
        if not isinstance(name, str) or name not in {t.name for t in offered}:
            raise InvalidRequest(
                "'tool_choice' names a tool that is not in 'tools'", param="tool_choice"
            )
        return ToolChoice("named", name)
    raise InvalidRequest(
        "'tool_choice' must be auto, none, required or a named function or custom tool",
        param="tool_choice",
    )


def json_format(spec: Any, param: str, *, flat: bool = False) -> OutputFormat | None:
    """Parse ``response_format`` (Chat) or ``text.format`` (Responses, flat)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise InvalidRequest(f"'{param}' must be an object", param=param)
    kind = spec.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat()
    if kind == "json_schema":
        inner = spec if flat else spec.get("json_schema")
        if not isinstance(inner, dict):
            raise InvalidRequest(f"'{param}.json_schema' must be an object", param=param)
        name = inner.get("name")
        return OutputFormat(
            _schema(inner.get("schema"), f"{param}.schema"),
            name if isinstance(name, str) else None,
            inner.get("strict") is True,
        )
    raise InvalidRequest(f"'{param}.type' must be text, json_object or json_schema", param=param)


def stop_sequences(value: Any, param: str = "stop") -> tuple[str, ...]:
    """Parse ``stop``: a string or a list of up to 4 strings (of MAX_STOP_CHARS at most)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return limits.stop_sequences([value], param, limits.OPENAI_MAX_STOPS)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return limits.stop_sequences(value, param, limits.OPENAI_MAX_STOPS)
    raise InvalidRequest(f"'{param}' must be a string or an array of strings", param=param)


def usage(usage_: Usage) -> dict[str, int]:
    """Return an OpenAI Chat/Completions usage object."""
    return {
        "prompt_tokens": usage_.prompt_tokens,
        "completion_tokens": usage_.completion_tokens,
        "total_tokens": usage_.total_tokens,
    }
