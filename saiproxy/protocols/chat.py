"""OpenAI Chat Completions: ``POST /v1/chat/completions``, streamed or not, with tools."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson
from aiohttp import web

from ..base.errors import InvalidRequest, UpstreamError
from ..core.bodies import read_json
from ..core.conversation import MAX_MESSAGES, Answer, Conversation, ToolCall, Turn, check_count
from ..core.exchange import Exchange
from ..core.sse import COMMENT_PING
from ..core.toolcache import TOOL_CACHES, ToolCaches
from . import openai

__all__ = [
    "DONE",
    "SYSTEM_ROLES",
    "USED_FIELDS",
    "ChatRenderer",
    "chat_completions",
    "parse",
]

SYSTEM_ROLES: Final = frozenset({"system", "developer"})
# The top-level fields saiproxy reads (the auth chain may read "metadata" and "user").
USED_FIELDS: Final = frozenset(
    {"model", "messages", "stream", "stream_options", "n", "tools", "tool_choice",
     "parallel_tool_calls", "response_format", "stop", "metadata", "user"}
)  # fmt: skip
DONE: Final = b"data: [DONE]\n\n"
_TEXT_TAIL: Final = b'},"logprobs":null,"finish_reason":null}]}\n\n'


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Answer an OpenAI chat completion from a SAI template execution."""
    body = await read_json(request)
    conversation, include_usage = parse(body, request.app[TOOL_CACHES])
    openai.fields_ignored(body, USED_FIELDS)
    exchange = Exchange(request, body, conversation, protocol="chat")
    del body  # the exchange lets it go once parsed; a long stream need not keep it
    renderer = ChatRenderer(f"chatcmpl-{exchange.ids}", exchange.created, include_usage)
    return await exchange.respond(renderer)


def _calls(raw: Any, param: str) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"{param} must be an array", param=param)
    calls: list[ToolCall] = []
    for index, item in enumerate(raw):
        where = f"{param}[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        call_id = item.get("id")
        call_id = call_id if isinstance(call_id, str) else ""
        if item.get("type") == "custom":
            custom = item.get("custom")
            if not isinstance(custom, dict) or not isinstance(custom.get("name"), str):
                raise InvalidRequest(f"{where}.custom.name is required", param=where)
            raw_input = custom.get("input")
            calls.append(
                ToolCall(call_id, custom["name"], "custom",
                         input=raw_input if isinstance(raw_input, str) else "")
            )  # fmt: skip
            continue
        function = item.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"{where}.function.name is required", param=where)
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments if arguments is not None else {}).decode()
        calls.append(ToolCall(call_id, function["name"], "function", arguments))
    return tuple(calls)


def _turn(raw: Any, index: int) -> Turn:
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    role = raw.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidRequest(
            f"{where}.role is required and must be a string", param=f"{where}.role"
        )
    calls = _calls(raw.get("tool_calls"), f"{where}.tool_calls") if role == "assistant" else ()
    if "content" not in raw and not calls:
        raise InvalidRequest(f"{where}.content is required", param=f"{where}.content")
    text = openai.content_text(raw.get("content"), f"{where}.content")
    if role in SYSTEM_ROLES:
        return Turn("system", text)
    if role == "user":
        return Turn("user", text)
    if role == "assistant":
        return Turn("assistant", text, calls)
    if role in ("tool", "function"):
        call_id = raw.get("tool_call_id")
        name = raw.get("name")
        return Turn(
            "tool",
            text,
            call_id=call_id if isinstance(call_id, str) else None,
            name=name if isinstance(name, str) else None,
        )
    raise InvalidRequest(
        f"{where}.role must be system, developer, user, assistant or tool",
        param=f"{where}.role",
    )


def parse(body: Any, caches: ToolCaches | None = None) -> tuple[Conversation, bool]:
    """Validate a chat completion body; return the conversation and ``include_usage``.

    ``body`` comes from a JSON parser, so objects are exactly ``dict`` (checked
    as such: an ABC ``isinstance`` check costs ten times more, per message).
    """
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    raw_messages = body.get("messages")
    if raw_messages is None:
        raise InvalidRequest("'messages' is required", param="messages")
    if not isinstance(raw_messages, list):
        raise InvalidRequest("'messages' must be an array of message objects", param="messages")
    if not raw_messages:
        raise InvalidRequest("'messages' must contain at least one message", param="messages")
    check_count(raw_messages, MAX_MESSAGES, "messages", "messages")
    turns = [_turn(raw, index) for index, raw in enumerate(raw_messages)]
    # docs/sai.md: a leading system message becomes inputs.system when more messages follow.
    system = ""
    if len(turns) > 1 and turns[0].role == "system":
        system = turns.pop(0).text

    n = body.get("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRequest("'n' must be a positive integer", param="n")
        if n > 1:
            raise InvalidRequest("Only n=1 is supported: SAI returns one answer", param="n")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    include_usage = bool(options.get("include_usage")) if options else False
    tools = openai.tools(body.get("tools"), caches=caches)
    conversation = Conversation(
        turns,
        system=system,
        model=openai.model_name(body),
        stream=openai.flag(body, "stream"),
        tools=tools,
        tool_choice=openai.tool_choice(body.get("tool_choice"), tools),
        parallel_tool_calls=openai.flag(body, "parallel_tool_calls", True),
        output=openai.json_format(body.get("response_format"), "response_format"),
        stop=openai.stop_sequences(body.get("stop")),
    )
    return conversation, include_usage


def _call(call: ToolCall) -> dict[str, Any]:
    if call.kind == "custom":
        return {"id": f"call_{call.id}", "type": "custom",
                "custom": {"name": call.name, "input": call.input}}  # fmt: skip
    return {"id": f"call_{call.id}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip


class ChatRenderer:
    """Renders ``chat.completion`` objects and ``chat.completion.chunk`` streams."""

    __slots__ = ("_created", "_id", "_include_usage", "_prefix", "_text_head")

    eager = False

    def __init__(self, completion_id: str, created: int, include_usage: bool) -> None:
        self._id = completion_id
        self._created = created
        self._include_usage = include_usage
        self._prefix = b""
        self._text_head = b""

    def body(self, answer: Answer) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": answer.text if answer.text or not answer.calls else None,
        }
        if answer.calls:
            message["tool_calls"] = [_call(call) for call in answer.calls]
        return {
            "id": self._id,
            "object": "chat.completion",
            "created": self._created,
            "model": answer.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": openai.FINISH_REASONS[answer.finish],
                }
            ],
            "usage": openai.usage(answer.usage),
        }

    # Every frame is the same object with a different tail; the constant head is
    # serialised once per stream and spliced, instead of once per token.
    def _frame(self, choices: bytes, extra: bytes = b"") -> bytes:
        return self._prefix + choices + extra + b"}\n\n"

    def head(self, model: str) -> bytes:
        self._prefix = openai.stream_prefix(self._id, "chat.completion.chunk", self._created, model)
        self._text_head = self._prefix + b'[{"index":0,"delta":{"content":'
        return self._frame(
            b'[{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]'
        )

    def ping(self) -> bytes:
        return COMMENT_PING

    def text(self, piece: str) -> bytes:
        # The one frame per token: two splices of constant bytes around the text.
        return self._text_head + orjson.dumps(piece) + _TEXT_TAIL

    def calls(self, calls: Sequence[ToolCall]) -> bytes:
        # OpenAI's shape: the first delta of each call carries its id, type and
        # name with empty arguments; the arguments follow.
        frames = []
        for index, call in enumerate(calls):
            opening = _call(call)
            if call.kind == "custom":
                opening["custom"] = {"name": call.name, "input": ""}
                rest: dict[str, Any] = {"custom": {"input": call.input}}
            else:
                opening["function"] = {"name": call.name, "arguments": ""}
                rest = {"function": {"arguments": call.arguments}}
            for delta in ({"index": index, **opening}, {"index": index, **rest}):
                frames.append(
                    self._frame(
                        b'[{"index":0,"delta":{"tool_calls":['
                        + orjson.dumps(delta)
                        + b']},"logprobs":null,"finish_reason":null}]'
                    )
                )
        return b"".join(frames)

    def finish(self, answer: Answer) -> bytes:
        frames = self._frame(
            b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + orjson.dumps(openai.FINISH_REASONS[answer.finish])
            + b"}]"
        )
        if self._include_usage:
            frames += self._frame(b"[]", b',"usage":' + orjson.dumps(openai.usage(answer.usage)))
        return frames + DONE

    def failure(self, error: UpstreamError) -> bytes:
        return b"data: " + orjson.dumps(error.body()) + b"\n\n" + DONE
