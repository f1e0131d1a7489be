"""OpenAI chat requests to SAI payloads, and SAI answers to OpenAI objects.

Pure functions: no I/O, no clock unless passed in, easy to test alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from .errors import InvalidRequest

PLUGIN_PREFIX: Final = (
    "Determine if the following context is required to solve the task "
    "in the user's input in the chat session: \""
)
PLUGIN_MARKER: Final = '"\nContext:'
SYSTEM_ROLES: Final = frozenset({"system", "developer"})
TEXT_PART_TYPES: Final = frozenset({"text", "input_text"})


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message reduced to what SAI takes: a role and plain text."""

    role: str
    text: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat completion request."""

    messages: tuple[Message, ...]
    model: str | None
    stream: bool
    include_usage: bool
    unwrapped: int
    unwrapped_chars_before: int
    unwrapped_chars_after: int
    chars: int  # total characters of every message's text, after unwrapping

    @property
    def estimated_tokens(self) -> int:
        """Return the early-check estimate: characters / 4."""
        return estimate_tokens(self.chars)

    def role_counts(self) -> dict[str, int]:
        """Return how many messages each role has."""
        counts: dict[str, int] = {}
        for message in self.messages:
            counts[message.role] = counts.get(message.role, 0) + 1
        return counts


def unwrap_plugin(content: str) -> str | None:
    """Return the user's own words from an IDE-plugin wrapper, or None if not wrapped."""
    if not content.startswith(PLUGIN_PREFIX):
        return None
    end = content.find(PLUGIN_MARKER, len(PLUGIN_PREFIX))
    if end < 0:
        return None
    return content[len(PLUGIN_PREFIX) : end]


def _content_text(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{param} must be a string, null or an array of content parts", param=param
        )
    texts: list[str] = []
    for part_index, part in enumerate(content):
        if not isinstance(part, dict):
            raise InvalidRequest(f"{param}[{part_index}] must be an object", param=param)
        kind = part.get("type")
        if kind in TEXT_PART_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{param}[{part_index}].text must be a string", param=param)
            texts.append(text)
        else:
            raise InvalidRequest(
                f"SAI templates accept text only: {param}[{part_index}] has type {kind!r}",
                param=param,
            )
    return "\n".join(texts)


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate an OpenAI chat completion body; raise InvalidRequest with the reason.

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

    messages: list[Message] = []
    unwrapped = before = after = 0
    for index, raw in enumerate(raw_messages):
        if not isinstance(raw, dict):
            raise InvalidRequest(f"messages[{index}] must be an object", param=f"messages[{index}]")
        role = raw.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(
                f"messages[{index}].role is required and must be a string",
                param=f"messages[{index}].role",
            )
        if "content" not in raw:
            raise InvalidRequest(
                f"messages[{index}].content is required", param=f"messages[{index}].content"
            )
        text = _content_text(raw["content"], index)
        original = unwrap_plugin(text)
        if original is not None:
            unwrapped += 1
            before += len(text)
            after += len(original)
            text = original
        messages.append(Message(role, text))

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
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

    return ChatRequest(
        messages=tuple(messages),
        model=model,
        stream=bool(stream),
        include_usage=include_usage,
        unwrapped=unwrapped,
        unwrapped_chars_before=before,
        unwrapped_chars_after=after,
        chars=sum(len(message.text) for message in messages),
    )


def sai_payload(messages: tuple[Message, ...], now_ms: int) -> dict[str, Any]:
    """Map OpenAI messages to SAI's template inputs and chat history (§1)."""
    system = ""
    history = messages
    if len(messages) > 1 and messages[0].role in SYSTEM_ROLES:
        system = messages[0].text
        history = messages[1:]
    payload: dict[str, Any] = {"inputs": {"system": system, "user": messages[-1].text}}
    if history:
        payload["chatMessages"] = [
            {"content": message.text, "role": message.role, "id": now_ms + index}
            for index, message in enumerate(history)
        ]
    return payload


def estimate_tokens(chars: int) -> int:
    """Estimate tokens from characters the way SAI's absent headers are filled in."""
    return math.ceil(chars / 4)


def header_tokens(headers: Mapping[str, str], name: str, chars: int) -> int:
    """Return a token count from SAI's header, or the estimate when absent or invalid."""
    raw = headers.get(name)
    if raw is not None:
        try:
            value = int(raw.strip())
        except ValueError:
            pass
        else:
            if value >= 0:
                return value
    return estimate_tokens(chars)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Return an OpenAI usage object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    *,
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    usage_: dict[str, int],
) -> dict[str, Any]:
    """Return a non-streaming ``chat.completion`` object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_,
    }


class ChunkWriter:
    """Encode the ``chat.completion.chunk`` frames of one stream, sharing id and created."""

    __slots__ = ("_prefix", "_suffix")

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        head = orjson.dumps(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
        )
        # Every frame is the same object with a different tail; splice bytes once
        # here instead of serialising the constant fields for every token.
        self._prefix = b"data: " + head[:-1] + b',"choices":'
        self._suffix = b"}\n\n"

    def _frame(self, choices: bytes, extra: bytes = b"") -> bytes:
        return self._prefix + choices + extra + self._suffix

    def role(self) -> bytes:
        """Return the first frame: the assistant role with empty content."""
        return self._frame(
            b'[{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]'
        )

    def content(self, text: str) -> bytes:
        """Return a frame carrying one piece of the answer."""
        return self._frame(
            b'[{"index":0,"delta":{"content":'
            + orjson.dumps(text)
            + b'},"logprobs":null,"finish_reason":null}]'
        )

    def finish(self, finish_reason: str) -> bytes:
        """Return the frame with an empty delta and the finish reason."""
        return self._frame(
            b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + orjson.dumps(finish_reason)
            + b"}]"
        )

    def usage(self, usage_: dict[str, int]) -> bytes:
        """Return the usage frame (empty choices) sent when include_usage is set."""
        return self._frame(b"[]", b',"usage":' + orjson.dumps(usage_))

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        """Return an in-band error frame (``data: {"error": ...}``)."""
        return b"data: " + orjson.dumps(body) + b"\n\n"

    DONE: Final = b"data: [DONE]\n\n"
    PING: Final = b": ping\n\n"


def models_list(names: list[str], created: int) -> dict[str, Any]:
    """Return the OpenAI ``list`` of model objects."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "sai"} for name in names
        ],
    }
