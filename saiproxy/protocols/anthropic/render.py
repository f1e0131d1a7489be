"""Anthropic Messages answers: the Message object, and the named SSE events with block indexes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import orjson

from ...base.errors import UpstreamError
from ...core.conversation import Answer, Finish, ToolCall
from .errors import error_body

__all__ = ["MESSAGE_STOP", "PING", "STOP_REASONS", "MessagesRenderer", "usage"]

STOP_REASONS: Final[dict[Finish, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "stop_sequence": "stop_sequence",
}

PING: Final = b'event: ping\ndata: {"type": "ping"}\n\n'
MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """Return a Usage object with every field the SDK types declare (no cache, no server tools)."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
        "output_tokens_details": {"thinking_tokens": 0},
        "service_tier": "standard",
        "speed": "standard",
        "inference_geo": None,
    }


# The fields of a message_delta's usage: the Usage object's counters, without its
# cache_creation breakdown and its service fields.
_DELTA_USAGE_FIELDS: Final = frozenset(
    {"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
     "server_tool_use", "output_tokens_details"}
)  # fmt: skip


def _delta_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    # message_delta counts are totals: the SDKs overwrite the message_start ones.
    full = usage(input_tokens, output_tokens)
    return {name: value for name, value in full.items() if name in _DELTA_USAGE_FIELDS}


def _tool_use_block(call: ToolCall, arguments: Any) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": f"toolu_{call.id}",
        "name": call.name,
        "input": arguments,
        "caller": {"type": "direct"},
    }


def _message_object(message_id: str, model: str) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "stop_details": None,
        "container": None,
        "diagnostics": None,
    }


def _stop_reason(answer: Answer) -> str:
    """Return the answer's stop reason; context too long (``message`` mode) ends ``end_turn``.

    Claude Code reads ``max_tokens`` as its own output limit: it shows "response
    exceeded the N output token maximum" instead of the text, and retries. The
    explanation that the conversation is too long must reach the user. (An
    answer cut short after part of it went out stays ``max_tokens``: it is.)
    """
    if answer.outcome == "context_length_exceeded":
        return "end_turn"
    return STOP_REASONS[answer.finish]


def _event(name: bytes, data: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class MessagesRenderer:
    """Renders Message objects, and Anthropic's SSE events with their block indexes."""

    eager = True  # Anthropic's clients get message_start at once, then pings while SAI works

    def __init__(self, message_id: str, input_tokens: Callable[[], int]) -> None:
        self._id = message_id
        self._input_tokens = input_tokens
        self._next_index = 0  # the index the next content block gets
        self._text_prefix: bytes | None = None  # set while a text block is open

    def body(self, answer: Answer) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if answer.text:  # Anthropic refuses empty text blocks when a client sends them back
            # No "citations": null: the Vercel AI SDK's schema takes an array or nothing.
            content.append({"type": "text", "text": answer.text})
        content.extend(_tool_use_block(call, orjson.loads(call.arguments)) for call in answer.calls)
        message = _message_object(self._id, answer.model)
        message.update(
            content=content,
            stop_reason=_stop_reason(answer),
            stop_sequence=answer.stop_sequence,
            usage=usage(answer.usage.prompt_tokens, answer.usage.completion_tokens),
        )
        return message

    def head(self, model: str) -> bytes:
        message = _message_object(self._id, model)
        message["usage"] = usage(self._input_tokens(), 0)
        return _event(b"message_start", {"type": "message_start", "message": message})

    def ping(self) -> bytes:
        return PING

    def _close_text(self) -> bytes:
        if self._text_prefix is None:
            return b""
        self._text_prefix = None
        index = self._next_index
        self._next_index += 1
        return _event(b"content_block_stop", {"type": "content_block_stop", "index": index})

    def text(self, piece: str) -> bytes:
        if not piece:
            return b""
        opening = b""
        if self._text_prefix is None:
            index = self._next_index
            opening = _event(
                b"content_block_start",
                {"type": "content_block_start", "index": index,
                 "content_block": {"type": "text", "text": ""}},
            )  # fmt: skip
            # Every delta of the block differs only in its text: the rest is built once.
            self._text_prefix = (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                + str(index).encode()
                + b',"delta":{"type":"text_delta","text":'
            )
        return opening + self._text_prefix + orjson.dumps(piece) + b"}}\n\n"

    def calls(self, calls: Sequence[ToolCall]) -> bytes:
        frames = [self._close_text()]
        for call in calls:
            index = self._next_index
            self._next_index += 1
            frames += [
                _event(b"content_block_start",
                       {"type": "content_block_start", "index": index,
                        "content_block": _tool_use_block(call, {})}),
                _event(b"content_block_delta",
                       {"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": call.arguments}}),
                _event(b"content_block_stop", {"type": "content_block_stop", "index": index}),
            ]  # fmt: skip
        return b"".join(frames)

    def finish(self, answer: Answer) -> bytes:
        delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": _stop_reason(answer),
                "stop_sequence": answer.stop_sequence,
                "stop_details": None,
                "container": None,
            },
            "usage": _delta_usage(answer.usage.prompt_tokens, answer.usage.completion_tokens),
        }
        return self._close_text() + _event(b"message_delta", delta) + MESSAGE_STOP

    def failure(self, error: UpstreamError) -> bytes:
        # As Anthropic does mid-stream: one error event, and the stream ends there.
        return _event(b"error", error_body(error)[1])
