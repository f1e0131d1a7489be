"""The schemas of ``/openapi.json``, as declared data: request bodies field by field, answers.

Bodies are described at the level a client author needs (the fields saiproxy
reads or always writes, ``additionalProperties`` left open), not as full SDK
schemas: the official SDKs remain the reference for each wire protocol. A
request body names every top-level field its parser reads, declares as read
(``USED_FIELDS`` in protocols/) or echoes; tests/test_openapi_fields.py holds
the two to each other, field by field.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "BOOL",
    "INT",
    "REQUESTS",
    "SCHEMAS",
    "STRING",
    "Schema",
    "obj",
    "ref",
]

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    """Return a reference to the component schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: list[str] | None = None, **properties: Schema) -> Schema:
    """Return an open object schema: clients may send more than saiproxy reads."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


STRING: Final[Schema] = {"type": "string"}
INT: Final[Schema] = {"type": "integer"}
BOOL: Final[Schema] = {"type": "boolean"}
_NULL: Final[Schema] = {"type": "null"}
_OBJECTS: Final[Schema] = {"type": "array", "items": {"type": "object"}}
_STREAM: Final[Schema] = {
    "type": "boolean",
    "default": False,
    "description": "Answer as server-sent events, relayed as SAI writes the answer.",
}
_STOP: Final[Schema] = {
    "description": "Stop sequences, enforced by saiproxy.",
    "oneOf": [STRING, {"type": "array", "items": STRING}, _NULL],
}
_MODEL: Final[Schema] = {
    "type": "string",
    "description": "A configured model (GET /v1/models). Unknown names are answered by the "
    "default model unless the proxy runs with STRICT_MODELS=true.",
}
_METADATA: Final[Schema] = {
    "type": ["object", "null"],
    "description": "metadata.user_api_key is the caller's own SAI key (the auth chain's "
    "metadata handler); the rest has no effect.",
}
_USER: Final[Schema] = {"type": ["string", "null"], "description": "Accepted; no effect."}
_BOUND: Final[Schema] = {
    "type": ["integer", "null"],
    "description": "The answer's length is the template's; with token budgets "
    "(docs/limits.md) the request reserves this many tokens for it.",
}
_ONE: Final[Schema] = {
    "type": "integer",
    "maximum": 1,
    "description": "SAI gives one answer a call: more is refused.",
}


def _echoed(schema: Schema) -> Schema:
    """Return ``schema`` for a setting the Response echoes as sent and the template ignores."""
    return {**schema, "description": "Echoed in the Response; no effect: the template decides."}


_CHAT: Final[Schema] = obj(
    ["messages"],
    model=_MODEL,
    messages={"type": "array", "minItems": 1, "items": ref("ChatMessage")},
    stream=_STREAM,
    stream_options=obj(include_usage=BOOL),
    n={"type": "integer", "maximum": 1},
    stop=_STOP,
    tools=_OBJECTS,
    tool_choice={"oneOf": [STRING, {"type": "object"}]},
    parallel_tool_calls=BOOL,
    response_format=obj(type={"enum": ["text", "json_object", "json_schema"]}),
    metadata=_METADATA,
    user=_USER,
    max_tokens=_BOUND,
    max_completion_tokens=_BOUND,
)
_COMPLETION: Final[Schema] = obj(
    ["prompt"],
    model=_MODEL,
    prompt={
        "description": "One prompt, or several (one choice each). Token arrays: 400.",
        "oneOf": [STRING, {"type": "array", "items": STRING}],
    },
    suffix={"type": ["string", "null"]},
    echo=BOOL,
    stop=_STOP,
    stream=_STREAM,
    stream_options=obj(include_usage=BOOL),
    n=_ONE,
    best_of=_ONE,
    logprobs={"type": "null", "description": "Token probabilities: SAI has none (400)."},
    metadata=_METADATA,
    user=_USER,
    max_tokens=_BOUND,
)
_RESPONSE: Final[Schema] = obj(
    ["input"],
    model=_MODEL,
    input={
        "description": "Text, or items: messages, function_call, "
        "function_call_output, custom_tool_call(_output), additional_tools, "
        "item_reference (resolved within the request, else among the caller's "
        "stored items, else skipped); other item types are ignored.",
        "oneOf": [STRING, {"type": "array", "items": {"type": "object"}}],
    },
    instructions={"type": ["string", "null"]},
    tools={
        "type": "array",
        "description": "function, custom and namespace tools; hosted tools "
        "(web_search, ...) are left out of the prompt.",
        "items": obj(["type"], type=STRING),
    },
    tool_choice={"oneOf": [STRING, {"type": "object"}]},
    parallel_tool_calls=BOOL,
    text=obj(format={"type": "object"}),
    stream=_STREAM,
    store={
        "type": "boolean",
        "default": True,
        "description": "Keep the response, its input and output items for "
        "RESPONSES_TTL, readable by the caller only. false: nothing is kept.",
    },
    previous_response_id={
        "type": ["string", "null"],
        "description": "Continue a stored response of the caller's: its chain's "
        "items come before the input (its instructions do not). Unknown: 404.",
    },
    conversation={
        "description": "A conversation of the caller's: its items come before the "
        "input, and the input and output are added to it.",
        "oneOf": [STRING, obj(["id"], id=STRING), _NULL],
    },
    metadata=_METADATA,
    reasoning=_echoed({"type": ["object", "null"]}),
    background={
        "type": "boolean",
        "default": False,
        "description": "Answer at once with a queued response; poll it, stream its events "
        "(GET /v1/responses/{id}?stream=true) or cancel it. Needs store: true.",
    },
    prompt={"type": "null", "description": "Stored prompt templates: not supported (400)."},
    max_output_tokens={**_BOUND, "description": "Echoed in the Response. " + _BOUND["description"]},
    max_tool_calls=_echoed({"type": ["integer", "null"]}),
    prompt_cache_key=_echoed({"type": ["string", "null"]}),
    safety_identifier=_echoed({"type": ["string", "null"]}),
    service_tier=_echoed({"type": ["string", "null"]}),
    temperature=_echoed({"type": ["number", "null"]}),
    top_logprobs=_echoed({"type": ["integer", "null"]}),
    top_p=_echoed({"type": ["number", "null"]}),
    truncation=_echoed({"type": ["string", "null"]}),
    user=_echoed({"type": ["string", "null"]}),
)
_MESSAGE: Final[Schema] = obj(
    ["messages"],
    model=_MODEL,
    max_tokens=INT,
    system={"oneOf": [STRING, {"type": "array", "items": {"type": "object"}}]},
    messages={
        "type": "array",
        "items": obj(
            ["role", "content"],
            role={"enum": ["user", "assistant", "system"]},
            content={
                "description": "Text or blocks: text, tool_use, tool_result, "
                "search_result (images, documents and audio are refused; other "
                "block types are ignored).",
                "oneOf": [STRING, {"type": "array", "items": {"type": "object"}}],
            },
        ),
    },
    tools=_OBJECTS,
    tool_choice={"type": "object"},
    stop_sequences={"type": "array", "items": STRING},
    output_config=obj(format={"type": "object"}),
    stream=_STREAM,
    metadata=_METADATA,
    output_format={
        "type": "object",
        "description": "The older (beta) place of output_config.format.",
    },
)

# Each request body by name: what its endpoint's parser reads, field by field.
REQUESTS: Final[dict[str, Schema]] = {
    "ChatCompletionRequest": _CHAT,
    "CompletionRequest": _COMPLETION,
    "ResponseRequest": _RESPONSE,
    "MessageRequest": _MESSAGE,
    "ItemsToAdd": obj(
        ["items"], items={"type": "array", "maxItems": 20, "items": {"type": "object"}}
    ),
    "ConversationRequest": obj(
        metadata={"type": ["object", "null"], "additionalProperties": STRING},
        items={"type": ["array", "null"], "maxItems": 20, "items": {"type": "object"}},
    ),
}

_USAGE: Final[Schema] = obj(prompt_tokens=INT, completion_tokens=INT, total_tokens=INT)
_ITEM: Final[Schema] = obj(["id", "type"], id=STRING, type=STRING)
_ERROR_CODES: Final = [
    "invalid_api_key",
    "rate_limit_exceeded",
    "context_length_exceeded",
    "upstream_error",
    "upstream_timeout",
    "model_not_found",
]

# Stored responses' and conversations' shapes (OpenAI's).
_STORED: Final[dict[str, Schema]] = {
    "Item": _ITEM,
    "ItemList": obj(
        ["object", "data", "has_more"],
        object={"const": "list"},
        data={"type": "array", "items": ref("Item")},
        first_id={"type": ["string", "null"]},
        last_id={"type": ["string", "null"]},
        has_more=BOOL,
    ),
    "ItemsToAdd": REQUESTS["ItemsToAdd"],
    "ResponseDeleted": obj(
        ["id", "object", "deleted"], id=STRING, object={"const": "response"}, deleted=BOOL
    ),
    "InputTokens": obj(
        ["object", "input_tokens"],
        object={"const": "response.input_tokens"},
        input_tokens=INT,
    ),
    "Conversation": obj(
        ["id", "object", "created_at", "metadata"],
        id=STRING,
        object={"const": "conversation"},
        created_at=INT,
        metadata={"type": "object", "additionalProperties": STRING},
    ),
    "ConversationRequest": REQUESTS["ConversationRequest"],
    "Compaction": obj(
        ["id", "object", "created_at", "output"],
        id=STRING,
        object={"const": "response.compaction"},
        created_at=INT,
        output={
            "type": "array",
            "items": ref("Item"),
            "description": "The input's user messages, then one compaction item",
        },
        usage={"type": "object"},
    ),
    "ConversationDeleted": obj(
        ["id", "object", "deleted"],
        id=STRING,
        object={"const": "conversation.deleted"},
        deleted=BOOL,
    ),
}

# Every component schema, in the document's order.
SCHEMAS: Final[dict[str, Schema]] = {
    "OpenAIError": obj(
        ["error"],
        error=obj(
            ["message", "type"],
            message=STRING,
            type=STRING,
            param={"type": ["string", "null"]},
            code={"type": ["string", "null"], "examples": _ERROR_CODES},
        ),
    ),
    "AnthropicError": obj(
        ["type", "error"],
        type={"const": "error"},
        error=obj(["type", "message"], type=STRING, message=STRING),
    ),
    "ChatMessage": obj(
        ["role"],
        role={"enum": ["system", "developer", "user", "assistant", "tool"]},
        content={
            "description": "Text, null, or an array of text parts (SAI takes text only).",
            "oneOf": [
                STRING,
                _NULL,
                {"type": "array", "items": obj(["type"], type=STRING, text=STRING)},
            ],
        },
        tool_calls=_OBJECTS,
        tool_call_id=STRING,
    ),
    "ChatCompletionRequest": _CHAT,
    "ChatCompletion": obj(
        ["id", "object", "created", "model", "choices", "usage"],
        id=STRING,
        object={"const": "chat.completion"},
        created=INT,
        model=STRING,
        choices={
            "type": "array",
            "items": obj(
                index=INT,
                message=obj(
                    role={"const": "assistant"},
                    content={"type": ["string", "null"]},
                    tool_calls=_OBJECTS,
                ),
                finish_reason={"enum": ["stop", "length", "tool_calls"]},
            ),
        },
        usage=_USAGE,
    ),
    "CompletionRequest": _COMPLETION,
    "Completion": obj(
        ["id", "object", "created", "model", "choices"],
        id=STRING,
        object={"const": "text_completion"},
        created=INT,
        model=STRING,
        choices={
            "type": "array",
            "items": obj(text=STRING, index=INT, finish_reason={"enum": ["stop", "length"]}),
        },
        usage=_USAGE,
    ),
    "ResponseRequest": _RESPONSE,
    **_STORED,
    "Response": obj(
        ["id", "object", "created_at", "status", "model", "output"],
        id=STRING,
        object={"const": "response"},
        created_at=INT,
        status={"enum": ["completed", "incomplete", "failed"]},
        model=STRING,
        output={"type": "array", "items": obj(["type"], type=STRING)},
        usage=obj(input_tokens=INT, output_tokens=INT, total_tokens=INT),
    ),
    "MessageRequest": _MESSAGE,
    "Message": obj(
        ["id", "type", "role", "content", "model", "stop_reason", "usage"],
        id=STRING,
        type={"const": "message"},
        role={"const": "assistant"},
        model=STRING,
        content={"type": "array", "items": obj(["type"], type=STRING)},
        stop_reason={"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
        stop_sequence={"type": ["string", "null"]},
        usage=obj(input_tokens=INT, output_tokens=INT),
    ),
    "TokenCount": obj(["input_tokens"], input_tokens=INT),
    "Model": obj(
        ["id"],
        id=STRING,
        object={"const": "model"},
        created=INT,
        owned_by=STRING,
        type={"const": "model", "description": "Anthropic shape"},
        display_name=STRING,
    ),
    "ModelList": obj(
        ["data"], object={"const": "list"}, data={"type": "array", "items": ref("Model")}
    ),
    "Health": obj(["status"], status={"const": "ok"}, version=STRING, pid=INT),
    "Readiness": obj(["status"], status={"enum": ["ready", "shutting down"]}),
}
