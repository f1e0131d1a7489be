"""``GET /openapi.json``: an OpenAPI 3.1 description of saiproxy's public endpoints.

Bodies are described at the level a client author needs (the fields saiproxy
reads or always writes, ``additionalProperties`` left open), not as full SDK
schemas: the official SDKs remain the reference for each wire protocol.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any, Final

import orjson
from aiohttp import web

from .. import __version__
from .landing import base_url

__all__ = [
    "JSON",
    "SSE",
    "Schema",
    "openapi",
    "openapi_document",
]

JSON: Final = "application/json"
SSE: Final = "text/event-stream"

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str] | None = None, **properties: Schema) -> Schema:
    """Return an open object schema: clients may send more than saiproxy reads."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


_STRING: Final[Schema] = {"type": "string"}
_INT: Final[Schema] = {"type": "integer"}
_BOOL: Final[Schema] = {"type": "boolean"}
_STREAM: Final[Schema] = {
    "type": "boolean",
    "default": False,
    "description": "Answer as server-sent events, relayed as SAI writes the answer.",
}
_STOP: Final[Schema] = {
    "description": "Stop sequences, enforced by saiproxy.",
    "oneOf": [_STRING, {"type": "array", "items": _STRING}, {"type": "null"}],
}
_MODEL: Final[Schema] = {
    "type": "string",
    "description": "A configured model (GET /v1/models). Unknown names are answered by the "
    "default model unless the proxy runs with STRICT_MODELS=true.",
}


def _schemas() -> dict[str, Schema]:
    usage = _obj(prompt_tokens=_INT, completion_tokens=_INT, total_tokens=_INT)
    return {
        "OpenAIError": _obj(
            ["error"],
            error=_obj(
                ["message", "type"],
                message=_STRING,
                type=_STRING,
                param={"type": ["string", "null"]},
                code={
                    "type": ["string", "null"],
                    "examples": [
                        "invalid_api_key",
                        "rate_limit_exceeded",
                        "context_length_exceeded",
                        "upstream_error",
                        "upstream_timeout",
                        "model_not_found",
                    ],
                },
            ),
        ),
        "AnthropicError": _obj(
            ["type", "error"],
            type={"const": "error"},
            error=_obj(["type", "message"], type=_STRING, message=_STRING),
        ),
        "ChatMessage": _obj(
            ["role"],
            role={"enum": ["system", "developer", "user", "assistant", "tool"]},
            content={
                "description": "Text, null, or an array of text parts (SAI takes text only).",
                "oneOf": [
                    _STRING,
                    {"type": "null"},
                    {"type": "array", "items": _obj(["type"], type=_STRING, text=_STRING)},
                ],
            },
            tool_calls={"type": "array", "items": {"type": "object"}},
            tool_call_id=_STRING,
        ),
        "ChatCompletionRequest": _obj(
            ["messages"],
            model=_MODEL,
            messages={"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
            stream=_STREAM,
            stream_options=_obj(include_usage=_BOOL),
            n={"type": "integer", "maximum": 1},
            stop=_STOP,
            tools={"type": "array", "items": {"type": "object"}},
            tool_choice={"oneOf": [_STRING, {"type": "object"}]},
            parallel_tool_calls=_BOOL,
            response_format=_obj(type={"enum": ["text", "json_object", "json_schema"]}),
        ),
        "ChatCompletion": _obj(
            ["id", "object", "created", "model", "choices", "usage"],
            id=_STRING,
            object={"const": "chat.completion"},
            created=_INT,
            model=_STRING,
            choices={
                "type": "array",
                "items": _obj(
                    index=_INT,
                    message=_obj(
                        role={"const": "assistant"},
                        content={"type": ["string", "null"]},
                        tool_calls={"type": "array", "items": {"type": "object"}},
                    ),
                    finish_reason={"enum": ["stop", "length", "tool_calls"]},
                ),
            },
            usage=usage,
        ),
        "CompletionRequest": _obj(
            ["prompt"],
            model=_MODEL,
            prompt={
                "description": "One prompt, or several (one choice each). Token arrays: 400.",
                "oneOf": [_STRING, {"type": "array", "items": _STRING}],
            },
            suffix={"type": ["string", "null"]},
            echo=_BOOL,
            stop=_STOP,
            stream=_STREAM,
        ),
        "Completion": _obj(
            ["id", "object", "created", "model", "choices"],
            id=_STRING,
            object={"const": "text_completion"},
            created=_INT,
            model=_STRING,
            choices={
                "type": "array",
                "items": _obj(text=_STRING, index=_INT, finish_reason={"enum": ["stop", "length"]}),
            },
            usage=usage,
        ),
        "ResponseRequest": _obj(
            ["input"],
            model=_MODEL,
            input={
                "description": "Text, or items: messages, function_call, "
                "function_call_output, custom_tool_call(_output), additional_tools, "
                "item_reference (resolved within the request, else among the caller's "
                "stored items, else skipped); other item types are ignored.",
                "oneOf": [_STRING, {"type": "array", "items": {"type": "object"}}],
            },
            instructions={"type": ["string", "null"]},
            tools={
                "type": "array",
                "description": "function, custom and namespace tools; hosted tools "
                "(web_search, ...) are left out of the prompt.",
                "items": _obj(["type"], type=_STRING),
            },
            tool_choice={"oneOf": [_STRING, {"type": "object"}]},
            parallel_tool_calls=_BOOL,
            text=_obj(format={"type": "object"}),
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
                "oneOf": [_STRING, _obj(["id"], id=_STRING), {"type": "null"}],
            },
        ),
        **_stored_schemas(),
        "Response": _obj(
            ["id", "object", "created_at", "status", "model", "output"],
            id=_STRING,
            object={"const": "response"},
            created_at=_INT,
            status={"enum": ["completed", "incomplete", "failed"]},
            model=_STRING,
            output={"type": "array", "items": _obj(["type"], type=_STRING)},
            usage=_obj(input_tokens=_INT, output_tokens=_INT, total_tokens=_INT),
        ),
        "MessageRequest": _obj(
            ["messages"],
            model=_MODEL,
            max_tokens=_INT,
            system={"oneOf": [_STRING, {"type": "array", "items": {"type": "object"}}]},
            messages={
                "type": "array",
                "items": _obj(
                    ["role", "content"],
                    role={"enum": ["user", "assistant", "system"]},
                    content={
                        "description": "Text or blocks: text, tool_use, tool_result, "
                        "search_result (images, documents and audio are refused; other "
                        "block types are ignored).",
                        "oneOf": [_STRING, {"type": "array", "items": {"type": "object"}}],
                    },
                ),
            },
            tools={"type": "array", "items": {"type": "object"}},
            tool_choice={"type": "object"},
            stop_sequences={"type": "array", "items": _STRING},
            output_config=_obj(format={"type": "object"}),
            stream=_STREAM,
        ),
        "Message": _obj(
            ["id", "type", "role", "content", "model", "stop_reason", "usage"],
            id=_STRING,
            type={"const": "message"},
            role={"const": "assistant"},
            model=_STRING,
            content={"type": "array", "items": _obj(["type"], type=_STRING)},
            stop_reason={"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
            stop_sequence={"type": ["string", "null"]},
            usage=_obj(input_tokens=_INT, output_tokens=_INT),
        ),
        "TokenCount": _obj(["input_tokens"], input_tokens=_INT),
        "Model": _obj(
            ["id"],
            id=_STRING,
            object={"const": "model"},
            created=_INT,
            owned_by=_STRING,
            type={"const": "model", "description": "Anthropic shape"},
            display_name=_STRING,
        ),
        "ModelList": _obj(
            ["data"], object={"const": "list"}, data={"type": "array", "items": _ref("Model")}
        ),
        "Health": _obj(["status"], status={"const": "ok"}, version=_STRING, pid=_INT),
        "Readiness": _obj(["status"], status={"enum": ["ready", "shutting down"]}),
    }


def _stored_schemas() -> dict[str, Schema]:
    """Stored responses' and conversations' shapes (OpenAI's)."""
    item = _obj(["id", "type"], id=_STRING, type=_STRING)
    return {
        "Item": item,
        "ItemList": _obj(
            ["object", "data", "has_more"],
            object={"const": "list"},
            data={"type": "array", "items": _ref("Item")},
            first_id={"type": ["string", "null"]},
            last_id={"type": ["string", "null"]},
            has_more=_BOOL,
        ),
        "ItemsToAdd": _obj(
            ["items"], items={"type": "array", "maxItems": 20, "items": {"type": "object"}}
        ),
        "ResponseDeleted": _obj(
            ["id", "object", "deleted"], id=_STRING, object={"const": "response"}, deleted=_BOOL
        ),
        "InputTokens": _obj(
            ["object", "input_tokens"],
            object={"const": "response.input_tokens"},
            input_tokens=_INT,
        ),
        "Conversation": _obj(
            ["id", "object", "created_at", "metadata"],
            id=_STRING,
            object={"const": "conversation"},
            created_at=_INT,
            metadata={"type": "object", "additionalProperties": _STRING},
        ),
        "ConversationRequest": _obj(
            metadata={"type": ["object", "null"], "additionalProperties": _STRING},
            items={"type": ["array", "null"], "maxItems": 20, "items": {"type": "object"}},
        ),
        "Compaction": _obj(
            ["id", "object", "created_at", "output"],
            id=_STRING,
            object={"const": "response.compaction"},
            created_at=_INT,
            output={
                "type": "array",
                "items": _ref("Item"),
                "description": "The input's user messages, then one compaction item",
            },
            usage={"type": "object"},
        ),
        "ConversationDeleted": _obj(
            ["id", "object", "deleted"],
            id=_STRING,
            object={"const": "conversation.deleted"},
            deleted=_BOOL,
        ),
    }


def _path_parameter(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": _STRING}


_PAGE: Final = [
    {"name": "after", "in": "query", "required": False, "schema": _STRING},
    {"name": "before", "in": "query", "required": False, "schema": _STRING},
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
    {"name": "order", "in": "query", "required": False,
     "schema": {"enum": ["asc", "desc"], "default": "desc"}},
]  # fmt: skip


def _stored(summary: str, schema: str, *, body: str | None = None, page: bool = False) -> Schema:
    """Return one operation on stored objects: the caller's own, else a 404."""
    operation: Schema = {
        "summary": summary,
        "tags": ["Stored"],
        "responses": {
            "200": {"description": "OK", "content": {JSON: {"schema": _ref(schema)}}},
            **_errors("OpenAIError", "400", "401"),
            "404": {
                "description": "No such object of the caller's (another client's too)",
                "content": {JSON: {"schema": _ref("OpenAIError")}},
            },
            "503": {
                "description": "The state store did not answer",
                "content": {JSON: {"schema": _ref("OpenAIError")}},
            },
        },
    }
    if body is not None:
        operation["requestBody"] = _json_body(body)
    if page:
        operation["parameters"] = _PAGE
    return operation


def _stored_paths() -> dict[str, Schema]:
    """The routes of stored responses and of the Conversations API."""
    response, conversation = _path_parameter("response_id"), _path_parameter("conversation_id")
    item = _path_parameter("item_id")
    return {
        "/v1/responses/input_tokens": {
            "post": _stored(
                "The input's estimated tokens (characters / 4), chain included",
                "InputTokens",
                body="ResponseRequest",
            ),
        },
        "/v1/responses/compact": {
            "post": _stored(
                "The history summarised by SAI into one compaction item (the caller's)",
                "Compaction",
                body="ResponseRequest",
            ),
        },
        "/v1/responses/{response_id}": {
            "parameters": [response],
            "get": _stored(
                "A stored response; stream=true (with starting_after): a background "
                "response's events, replayed",
                "Response",
            ),
            "delete": _stored("Delete a stored response", "ResponseDeleted"),
        },
        "/v1/responses/{response_id}/cancel": {
            "parameters": [response],
            "post": _stored("Cancel a background response (from any replica)", "Response"),
        },
        "/v1/responses/{response_id}/input_items": {
            "parameters": [response],
            "get": _stored("A stored response's input items", "ItemList", page=True),
        },
        "/v1/conversations": {
            "post": _stored("A new conversation", "Conversation", body="ConversationRequest"),
        },
        "/v1/conversations/{conversation_id}": {
            "parameters": [conversation],
            "get": _stored("A conversation", "Conversation"),
            "post": _stored("Replace its metadata", "Conversation", body="ConversationRequest"),
            "delete": _stored("Delete a conversation", "ConversationDeleted"),
        },
        "/v1/conversations/{conversation_id}/items": {
            "parameters": [conversation],
            "post": _stored("Add items", "ItemList", body="ItemsToAdd"),
            "get": _stored("A conversation's items", "ItemList", page=True),
        },
        "/v1/conversations/{conversation_id}/items/{item_id}": {
            "parameters": [conversation, item],
            "get": _stored("One item", "Item"),
            "delete": _stored("Remove an item; answers the conversation", "Conversation"),
        },
    }


def _json_body(schema: str) -> Schema:
    return {"required": True, "content": {JSON: {"schema": _ref(schema)}}}


def _answer(schema: str, stream: str) -> Schema:
    return {
        "description": "The answer; with stream=true, server-sent events. In ERROR_MODE=message "
        "an upstream failure is also a 200 whose text explains it (header X-Saiproxy-Error).",
        "headers": {
            "X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"},
            "X-Saiproxy-Error": {"$ref": "#/components/headers/X-Saiproxy-Error"},
        },
        "content": {
            JSON: {"schema": _ref(schema)},
            SSE: {"schema": {"type": "string", "description": stream}},
        },
    }


def _errors(shape: str, *statuses: str) -> dict[str, Schema]:
    reasons = {
        "400": "Invalid request, or context too long (ERROR_MODE=http)",
        "401": "Proxy key missing or wrong, or SAI rejected the credential (ERROR_MODE=http)",
        "404": "Unknown model (STRICT_MODELS=true)",
        "413": "Body larger than MAX_BODY_BYTES",
        "429": "SAI rate limit and no fallback left (ERROR_MODE=http)",
        "502": "SAI failed after retries (ERROR_MODE=http)",
        "504": "SAI timed out after retries (ERROR_MODE=http)",
    }
    return {
        status: {
            "description": reasons[status],
            "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
            "content": {JSON: {"schema": _ref(shape)}},
        }
        for status in statuses
    }


_ALL_ERRORS: Final = ("400", "401", "404", "413", "429", "502", "504")


def _post(
    summary: str, tag: str, request: str, answer: Schema, shape: str = "OpenAIError"
) -> Schema:
    return {
        "post": {
            "summary": summary,
            "tags": [tag],
            "requestBody": _json_body(request),
            "responses": {"200": answer, **_errors(shape, *_ALL_ERRORS)},
        }
    }


def _get(summary: str, tag: str, schema: str, *, secured: bool = True) -> Schema:
    operation: Schema = {
        "summary": summary,
        "tags": [tag],
        "responses": {"200": {"description": "OK", "content": {JSON: {"schema": _ref(schema)}}}},
    }
    if secured:
        operation["responses"].update(_errors("OpenAIError", "401"))
    else:
        operation["security"] = []
    return {"get": operation}


@cache
def _document() -> dict[str, Any]:
    messages_auth: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyAuth": []}, {}]
    messages = _post(
        "Anthropic Messages",
        "Anthropic",
        "MessageRequest",
        _answer(
            "Message",
            "message_start, content_block_start/delta/stop, message_delta, message_stop, ping",
        ),
        shape="AnthropicError",
    )
    messages["post"]["security"] = messages_auth
    messages["post"]["parameters"] = [
        {"name": "beta", "in": "query", "required": False, "schema": {"type": "string"}}
    ]
    count_tokens = {
        "post": {
            "summary": "Count the input tokens of a Messages request (an estimate: chars / 4)",
            "tags": ["Anthropic"],
            "security": messages_auth,
            "requestBody": _json_body("MessageRequest"),
            "responses": {
                "200": {"description": "OK", "content": {JSON: {"schema": _ref("TokenCount")}}},
                **_errors("AnthropicError", "400", "401", "413"),
            },
        }
    }
    model = _get("One configured model", "Models", "Model")
    model["get"]["parameters"] = [
        {"name": "model", "in": "path", "required": True, "schema": _STRING},
        {
            "name": "anthropic-version",
            "in": "header",
            "required": False,
            "description": "When present, the answer and errors use Anthropic's shape.",
            "schema": _STRING,
        },
    ]
    model["get"]["responses"].update(_errors("OpenAIError", "404"))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "saiproxy",
            "version": __version__,
            "summary": "OpenAI- and Anthropic-compatible APIs in front of SAI prompt templates.",
            "description": "Every API path is also served without the /v1 prefix "
            "(for example /chat/completions). When the proxy runs with PROXY_API_KEYS, "
            "API calls need Authorization: Bearer <key> (x-api-key works too); health "
            "checks, metrics, / and this document stay open. Every response carries "
            "X-Request-ID.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [
            {"name": "OpenAI"},
            {"name": "Anthropic"},
            {"name": "Stored"},
            {"name": "Models"},
            {"name": "Operations"},
        ],
        "security": [{"bearerAuth": []}, {}],
        "paths": {
            "/v1/chat/completions": _post(
                "Chat Completions",
                "OpenAI",
                "ChatCompletionRequest",
                _answer("ChatCompletion", "chat.completion.chunk frames, then data: [DONE]"),
            ),
            "/v1/completions": _post(
                "Legacy Completions",
                "OpenAI",
                "CompletionRequest",
                _answer("Completion", "text_completion frames, then data: [DONE]"),
            ),
            "/v1/responses": _post(
                "Responses",
                "OpenAI",
                "ResponseRequest",
                _answer(
                    "Response",
                    "response.created ... response.completed (or response.failed), "
                    "each with sequence_number",
                ),
            ),
            **_stored_paths(),
            "/v1/messages": messages,
            "/v1/messages/count_tokens": count_tokens,
            "/v1/models": _get("The configured models", "Models", "ModelList"),
            "/v1/models/{model}": model,
            "/health": _get("Liveness; no upstream call", "Operations", "Health", secured=False),
            "/health/readiness": {
                "get": {
                    "summary": "Readiness: 503 once shutdown has begun",
                    "tags": ["Operations"],
                    "security": [],
                    "responses": {
                        status: {
                            "description": text,
                            "content": {JSON: {"schema": _ref("Readiness")}},
                        }
                        for status, text in (("200", "Serving"), ("503", "Shutting down"))
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics of this process",
                    "tags": ["Operations"],
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": _STRING}},
                        }
                    },
                }
            },
            "/limits/usage": {
                "get": {
                    "summary": "Each client's use per day, a page at a time: every client's "
                    "for an admin key (ADMIN_API_KEYS), the caller's own for a proxy key; "
                    "what `saiproxy usage` reads",
                    "tags": ["Operations"],
                    "parameters": [
                        {
                            "name": "days",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 40,
                                "default": 1,
                            },
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 1000,
                                "default": 100,
                            },
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "required": False,
                            "description": "The previous page's next_cursor",
                            "schema": _STRING,
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "Rows of date, client ID, requests, input and "
                            "output tokens, refused requests; next_cursor is null on the last "
                            "page",
                            "content": {JSON: {"schema": {"type": "object"}}},
                        },
                        "400": {
                            "description": "days, limit or cursor out of range or not ours",
                            "content": {JSON: {"schema": _ref("OpenAIError")}},
                        },
                        "404": {
                            "description": "Neither an admin key nor a proxy key, or no limits "
                            "configured",
                            "content": {JSON: {"schema": _ref("OpenAIError")}},
                        },
                        "503": {
                            "description": "The limits store did not answer",
                            "content": {JSON: {"schema": _ref("OpenAIError")}},
                        },
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A proxy key (PROXY_API_KEYS), when the proxy requires one.",
                },
                "apiKeyAuth": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "The proxy key as Anthropic clients send it.",
                },
            },
            "headers": {
                "X-Request-ID": {
                    "description": "The request's ID; it finds the request in the logs.",
                    "schema": _STRING,
                },
                "X-Saiproxy-Error": {
                    "description": "In ERROR_MODE=message: the outcome code of an answer "
                    "that explains a failure.",
                    "schema": _STRING,
                },
            },
            "schemas": _schemas(),
        },
    }


def openapi_document(server_url: str | None = None) -> dict[str, Any]:
    """Return the OpenAPI document, naming ``server_url`` as the server when given."""
    document = copy.deepcopy(_document())
    if server_url:
        document["servers"] = [{"url": server_url}]
    return document


async def openapi(request: web.Request) -> web.Response:
    """Serve the OpenAPI document, with this server's own URL."""
    body = orjson.dumps(openapi_document(base_url(request)), option=orjson.OPT_INDENT_2)
    return web.Response(body=body, content_type=JSON, headers={"Cache-Control": "no-store"})
