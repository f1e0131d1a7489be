"""``GET /openapi.json``: an OpenAPI 3.1 description of saiproxy's public endpoints.

The paths and operations are assembled here; the schemas they refer to are
declared data in ``openapi_schemas.py``.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any, Final

import orjson
from aiohttp import web

from .. import __version__
from ..limits.identity import API_KEY_HEADER
from ..limits.usage import USAGE_PATH
from .landing import base_url
from .openapi_schemas import SCHEMAS, STRING, Schema, ref

__all__ = [
    "JSON",
    "SSE",
    "openapi",
    "openapi_document",
]

JSON: Final = "application/json"
SSE: Final = "text/event-stream"


def _path_parameter(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": STRING}


_PAGE: Final = [
    {"name": "after", "in": "query", "required": False, "schema": STRING},
    {"name": "before", "in": "query", "required": False, "schema": STRING},
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
            "200": {"description": "OK", "content": {JSON: {"schema": ref(schema)}}},
            **_errors("OpenAIError", "400", "401"),
            "404": {
                "description": "No such object of the caller's (another client's too)",
                "content": {JSON: {"schema": ref("OpenAIError")}},
            },
            "503": {
                "description": "The state store did not answer",
                "content": {JSON: {"schema": ref("OpenAIError")}},
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
    return {"required": True, "content": {JSON: {"schema": ref(schema)}}}


def _answer(schema: str, stream: str) -> Schema:
    return {
        "description": "The answer; with stream=true, server-sent events. In ERROR_MODE=message "
        "an upstream failure is also a 200 whose text explains it (header X-Saiproxy-Error).",
        "headers": {
            "X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"},
            "X-Saiproxy-Error": {"$ref": "#/components/headers/X-Saiproxy-Error"},
        },
        "content": {
            JSON: {"schema": ref(schema)},
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
            "content": {JSON: {"schema": ref(shape)}},
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
        "responses": {"200": {"description": "OK", "content": {JSON: {"schema": ref(schema)}}}},
    }
    if secured:
        operation["responses"].update(_errors("OpenAIError", "401"))
    else:
        operation["security"] = []
    return {"get": operation}


_MESSAGES_AUTH: Final[list[dict[str, list[str]]]] = [{"bearerAuth": []}, {"apiKeyAuth": []}, {}]


def _anthropic_paths() -> dict[str, Schema]:
    """Messages and its token count: Anthropic's error shape, either key header."""
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
    messages["post"]["security"] = _MESSAGES_AUTH
    messages["post"]["parameters"] = [
        {"name": "beta", "in": "query", "required": False, "schema": {"type": "string"}}
    ]
    count_tokens = {
        "post": {
            "summary": "Count the input tokens of a Messages request (an estimate: chars / 4)",
            "tags": ["Anthropic"],
            "security": _MESSAGES_AUTH,
            "requestBody": _json_body("MessageRequest"),
            "responses": {
                "200": {"description": "OK", "content": {JSON: {"schema": ref("TokenCount")}}},
                **_errors("AnthropicError", "400", "401", "413"),
            },
        }
    }
    return {"/v1/messages": messages, "/v1/messages/count_tokens": count_tokens}


def _model_path() -> Schema:
    """One configured model: OpenAI's shape, or Anthropic's when the caller sends its header."""
    model = _get("One configured model", "Models", "Model")
    model["get"]["parameters"] = [
        {"name": "model", "in": "path", "required": True, "schema": STRING},
        {
            "name": "anthropic-version",
            "in": "header",
            "required": False,
            "description": "When present, the answer and errors use Anthropic's shape.",
            "schema": STRING,
        },
    ]
    model["get"]["responses"].update(_errors("OpenAIError", "404"))
    return model


def _api_paths() -> dict[str, Schema]:
    """The APIs' paths, in the document's order."""
    return {
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
        **_anthropic_paths(),
        "/v1/models": _get("The configured models", "Models", "ModelList"),
        "/v1/models/{model}": _model_path(),
    }


_READINESS: Final[Schema] = {
    "get": {
        "summary": "Readiness: 503 once shutdown has begun",
        "tags": ["Operations"],
        "security": [],
        "responses": {
            status: {"description": text, "content": {JSON: {"schema": ref("Readiness")}}}
            for status, text in (("200", "Serving"), ("503", "Shutting down"))
        },
    }
}
_METRICS: Final[Schema] = {
    "get": {
        "summary": "Prometheus metrics of this process",
        "tags": ["Operations"],
        "security": [],
        "responses": {
            "200": {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": STRING}},
            }
        },
    }
}


def _query(name: str, schema: Schema, description: str | None = None) -> Schema:
    parameter: Schema = {"name": name, "in": "query", "required": False}
    if description is not None:
        parameter["description"] = description
    parameter["schema"] = schema
    return parameter


def _error(description: str) -> Schema:
    return {"description": description, "content": {JSON: {"schema": ref("OpenAIError")}}}


_USAGE: Final[Schema] = {
    "get": {
        "summary": "Each client's use per day, a page at a time: every client's "
        "for an admin key (ADMIN_API_KEYS), the caller's own for a proxy key; "
        "what `saiproxy usage` reads",
        "tags": ["Operations"],
        "parameters": [
            _query("days", {"type": "integer", "minimum": 1, "maximum": 40, "default": 1}),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
            _query("cursor", STRING, "The previous page's next_cursor"),
        ],
        "responses": {
            "200": {
                "description": "Rows of date, client ID, requests, input and output tokens, "
                "refused requests; next_cursor is null on the last page",
                "content": {JSON: {"schema": {"type": "object"}}},
            },
            "400": _error("days, limit or cursor out of range or not ours"),
            "404": _error("Neither an admin key nor a proxy key, or no limits configured"),
            "503": _error("The limits store did not answer"),
        },
    }
}

_INFO: Final[Schema] = {
    "title": "saiproxy",
    "version": __version__,
    "summary": "OpenAI- and Anthropic-compatible APIs in front of SAI prompt templates.",
    "description": "Every API path is also served without the /v1 prefix "
    "(for example /chat/completions). When the proxy runs with PROXY_API_KEYS, "
    "API calls need Authorization: Bearer <key> (x-api-key works too); health "
    "checks, metrics, / and this document stay open. Every response carries "
    "X-Request-ID.",
    "license": {"name": "MIT", "identifier": "MIT"},
}
_TAGS: Final = [{"name": tag} for tag in ("OpenAI", "Anthropic", "Stored", "Models", "Operations")]
_COMPONENTS: Final[Schema] = {
    "securitySchemes": {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "A proxy key (PROXY_API_KEYS), when the proxy requires one.",
        },
        "apiKeyAuth": {
            "type": "apiKey",
            "in": "header",
            "name": API_KEY_HEADER,
            "description": "The proxy key as Anthropic clients send it.",
        },
    },
    "headers": {
        "X-Request-ID": {
            "description": "The request's ID; it finds the request in the logs.",
            "schema": STRING,
        },
        "X-Saiproxy-Error": {
            "description": "In ERROR_MODE=message: the outcome code of an answer "
            "that explains a failure.",
            "schema": STRING,
        },
    },
    "schemas": SCHEMAS,
}


@cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": _INFO,
        "tags": _TAGS,
        "security": [{"bearerAuth": []}, {}],
        "paths": {
            **_api_paths(),
            "/health": _get("Liveness; no upstream call", "Operations", "Health", secured=False),
            "/health/readiness": _READINESS,
            "/metrics": _METRICS,
            USAGE_PATH: _USAGE,
        },
        "components": _COMPONENTS,
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
