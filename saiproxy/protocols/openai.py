"""Pieces the OpenAI-shaped protocols share: content parts, tools, finish reasons, errors,
the head of a stream's chunks."""

from __future__ import annotations

import logging
from typing import Any, Final

import orjson
from aiohttp import web

from ..base.errors import InvalidRequest, ProxyError
from ..base.log import protocols_logger as log
from ..core import bounds, toolcache
from ..core.bodies import error_response
from ..core.conversation import (
    AUTO,
    MAX_CONTENT_PARTS,
    Finish,
    OutputFormat,
    Tool,
    ToolChoice,
    Usage,
    check_count,
)
from ..core.toolcache import ToolCaches

__all__ = [
    "DEFAULT_NAMESPACE",
    "FINISH_REASONS",
    "MAX_MODEL_CHARS",
    "MEDIA_PART_TYPES",
    "TEXT_PART_TYPES",
    "OpenAIErrors",
    "content_text",
    "fields_ignored",
    "flag",
    "flat_name",
    "hosted_tools_left_out",
    "ignored",
    "json_format",
    "media_refused",
    "model_name",
    "stop_sequences",
    "stream_prefix",
    "tool",
    "tool_choice",
    "tools",
    "usage",
]

TEXT_PART_TYPES: Final = frozenset({"text", "input_text", "output_text"})
# Content that would change the answer if it were dropped: refused with a 400
# that says so. Any other part type SAI cannot use carries nothing it could act
# on and is left out (logged at DEBUG).
MEDIA_PART_TYPES: Final = frozenset(
    {"image", "image_url", "input_image", "file", "input_file", "audio", "input_audio",
     "video", "video_url", "document"}
)  # fmt: skip
MAX_MODEL_CHARS: Final = 256
# Codex's default namespace: its tools are called by their plain names.
DEFAULT_NAMESPACE: Final = "functions"


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
        elif kind in MEDIA_PART_TYPES:
            raise media_refused(kind, f"{param}[{index}]", param)
        else:
            ignored(f"{param}[{index}]", kind)
    return "\n".join(texts)


def media_refused(kind: str, where: str, param: str | None = None) -> InvalidRequest:
    """Return the 400 for content SAI cannot take and the answer would silently miss."""
    article = "an" if kind[:1] in ("a", "e", "i", "o", "u") else "a"
    return InvalidRequest(
        f"SAI templates accept text only: {where} is {article} {kind[:40]!r} part; "
        "send its content as text, or leave it out",
        param=param or where,
    )


def ignored(where: str, kind: Any) -> None:
    """Log at DEBUG a block or item of a type that carries nothing SAI could act on."""
    shown = kind[:40] if isinstance(kind, str) else type(kind).__name__
    log.debug("content ignored", extra={"where": where, "type": shown})


def fields_ignored(body: dict[str, Any], used: frozenset[str], betas: str | None = None) -> None:
    """Log at DEBUG the top-level fields saiproxy does not read, and the beta features asked for.

    Both are accepted and have no effect (docs/protocols.md); the line says what
    a client sends that the template never sees.
    """
    if not log.isEnabledFor(logging.DEBUG):
        return
    fields = [name[:40] for name in body if name not in used][:30]
    if fields:
        log.debug("fields ignored", extra={"fields": fields})
    if betas:
        log.debug("beta features ignored", extra={"betas": betas[:300]})


def hosted_tools_left_out(types: list[str]) -> None:
    """Log, once per request, the tools SAI cannot run that were left out of the prompt."""
    if types:
        log.info(
            "tools SAI cannot run left out of the prompt",
            extra={"types": sorted(set(types))[:20], "count": len(types)},
        )


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


def flat_name(namespace: str, name: str) -> str:
    """Return the one name SAI sees for a tool offered inside a namespace.

    Codex's own convention (``ToolName::canonical_flat_name`` in codex-rs):
    ``<namespace>__<name>`` with stray underscores at the join trimmed, and the
    plain name for its default namespace ``functions``.
    """
    if not namespace or namespace == DEFAULT_NAMESPACE:
        return name
    return f"{namespace.rstrip('_')}__{name.lstrip('_')}"


def tool(spec: Any, param: str, *, flat: bool, namespace: str | None = None) -> Tool | None:
    """Parse one offered tool: Chat's nested shape, or the Responses API's flat one.

    Returns None for a tool SAI cannot run (a hosted tool such as web search,
    or a type saiproxy does not know): it is left out of the prompt.
    """
    if not isinstance(spec, dict):
        raise InvalidRequest(f"{param} must be an object", param=param)
    kind = spec.get("type")
    if kind not in ("function", "custom"):
        return None
    body = spec if flat else spec.get(kind)
    if not isinstance(body, dict):
        raise InvalidRequest(f"{param}.{kind} must be an object", param=param)
    name = _name(body.get("name"), f"{param}.name")
    description = _text(body.get("description"), f"{param}.description")
    wire = None
    if namespace is not None:
        wire, name = (namespace, name), flat_name(namespace, name)
    if kind == "function":
        schema = _schema(body.get("parameters"), f"{param}.parameters")
        return Tool(name, description, "function", parameters=schema, wire=wire)
    return Tool(
        name, description, "custom", format=_schema(body.get("format"), f"{param}.format"),
        wire=wire,
    )  # fmt: skip


def _parse_tools(value: list[Any], param: str, flat: bool) -> tuple[Tool, ...]:
    """Return the tools SAI is told about: namespaces flattened, hosted tools left out."""
    found: list[Tool | None] = []
    for index, spec in enumerate(value):
        where = f"{param}[{index}]"
        members = _namespace_members(spec, where) if flat else None
        if members is None:
            found.append(tool(spec, where, flat=flat))
            continue
        # The Responses API's namespace (Codex's MCP servers and tool groups):
        # its tools become callable tools of their own under flat names.
        namespace = _name(spec["name"], f"{where}.name")
        found += (
            tool(member, f"{where}.tools[{inner}]", flat=True, namespace=namespace)
            for inner, member in enumerate(members)
        )
    return tuple(item for item in found if item is not None)


def _namespace_members(spec: Any, where: str) -> list[Any] | None:
    """Return a namespace tool's tools, or None when ``spec`` is no namespace."""
    if not isinstance(spec, dict) or spec.get("type") != "namespace":
        return None
    members = spec.get("tools")
    if not isinstance(members, list):
        raise InvalidRequest(f"{where}.tools must be an array of tools", param=where)
    return members


def _left_out(value: list[Any], flat: bool) -> list[str]:
    """Return the types of the offered tools SAI cannot run (cheap: no parsing)."""
    types: list[str] = []
    for spec in value:
        inner = spec.get("tools") if flat and isinstance(spec, dict) else None
        if isinstance(inner, list) and spec.get("type") == "namespace":
            types += (_type_name(member) for member in inner if _hosted(member))
        elif _hosted(spec):
            types.append(_type_name(spec))
    return types


def _hosted(spec: Any) -> bool:
    return isinstance(spec, dict) and spec.get("type") not in ("function", "custom")


def _type_name(spec: Any) -> str:
    kind = spec.get("type") if isinstance(spec, dict) else None
    return kind[:40] if isinstance(kind, str) else "(no type)"


def tools(
    value: Any, param: str = "tools", *, flat: bool = False, caches: ToolCaches | None = None
) -> tuple[Tool, ...]:
    """Parse the offered tools; tools SAI cannot run are left out and logged at INFO.

    An agent sends the same tools with every call: the parsed tuple is kept by
    the tools' content in the application's ``caches`` (core/toolcache.py), so
    the same tools are parsed once and are the same object (the prompt builder
    keeps their instructions by it).
    """
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest(f"'{param}' must be an array of tools", param=param)
    found = toolcache.parsed_tools(
        value,
        f"openai-flat-{param}" if flat else f"openai-{param}",
        lambda specs: _parse_tools(specs, param, flat),
        caches,
    )
    hosted_tools_left_out(_left_out(value, flat))
    return found


def tool_choice(value: Any, offered: tuple[Tool, ...], *, flat: bool = False) -> ToolChoice:
    """Parse ``tool_choice``: auto, none, required, or one named function or custom tool."""
    if value is None:
        return AUTO
    if value in ("auto", "none", "required"):
        return ToolChoice(value)
    if isinstance(value, dict) and value.get("type") in ("function", "custom"):
        kind = value["type"]
        inner = value if flat else value.get(kind)
        name = inner.get("name") if isinstance(inner, dict) else None
        namespace = value.get("namespace") if flat else None
        if isinstance(name, str) and isinstance(namespace, str):
            name = flat_name(namespace, name)  # a tool offered inside a namespace
        if not isinstance(name, str) or name not in {t.name for t in offered}:
            raise InvalidRequest(
                "'tool_choice' names a tool that is not in 'tools'", param="tool_choice"
            )
        return ToolChoice("named", name)
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        # A hosted tool (left out of the prompt) or a choice saiproxy does not know:
        # the model chooses among the tools it was told about.
        ignored("tool_choice", value["type"])
        return ToolChoice()
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
        return bounds.stop_sequences([value], param, bounds.OPENAI_MAX_STOPS)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return bounds.stop_sequences(value, param, bounds.OPENAI_MAX_STOPS)
    raise InvalidRequest(f"'{param}' must be a string or an array of strings", param=param)


def usage(usage_: Usage) -> dict[str, int]:
    """Return an OpenAI Chat/Completions usage object."""
    return {
        "prompt_tokens": usage_.prompt_tokens,
        "completion_tokens": usage_.completion_tokens,
        "total_tokens": usage_.total_tokens,
    }


def stream_prefix(id_: str, object_: str, created: int, model: str) -> bytes:
    """Return the constant head of a stream's every chunk, up to its choices:
    ``data: {"id":…,"object":…,"created":…,"model":…,"choices":``. A stream serialises it
    once and splices each chunk's tail after it, instead of serialising it once per token."""
    head = orjson.dumps({"id": id_, "object": object_, "created": created, "model": model})
    return b"data: " + head[:-1] + b',"choices":'
