"""What every Responses module shares: a request's Continuation, the Response object and its
usage, message and error objects, and the stream's event frame.

The adapter, the stored responses, background responses and compaction all
import from here; nothing here imports them.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ...base.errors import ContextTooLong, NotFound, UpstreamError, UpstreamRateLimited
from ...core.conversation import Usage
from ...state.store import State

__all__ = [
    "Continuation",
    "error_object",
    "event",
    "message_item",
    "not_found",
    "response_object",
    "usage",
]


@dataclass(slots=True)
class Continuation:
    """A Responses request's place in the stored state: what it continues, what it keeps."""

    input: Any  # the whole input for SAI: the chain's items, then the request's
    store: bool = True
    previous: str | None = None
    conversation: str | None = None
    state: State | None = None
    owner: str = ""
    new_items: list[dict[str, Any]] = field(default_factory=list)  # to store
    input_ids: list[str] = field(default_factory=list)  # the request's input items
    context: list[str] = field(default_factory=list)  # the ids of the items before them

    @property
    def keeps(self) -> bool:
        """Return whether the answer is to be kept (``store``, or a conversation to add to)."""
        return self.state is not None and (self.store or self.conversation is not None)

    async def keep(self, response: dict[str, Any]) -> None:
        """Keep the answered response (the stream's last event waits for it: read-after-write)."""
        if self.state is None or not self.keeps:
            return
        await self.state.keep(
            self.owner, response, self.new_items, self.input_ids, self.context,
            store=self.store, conversation=self.conversation,
        )  # fmt: skip


def response_object(
    response_id: str,
    created: int,
    status: str,
    model: str,
    output: Sequence[dict[str, Any] | orjson.Fragment],
    echo: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """Return a Response object: its own fields, the settings it echoes, then ``extra``."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "model": model,
        "output": output,
        "previous_response_id": None,
        "usage": None,
        **echo,
        **extra,
    }


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """Return an assistant message output item of one ``output_text`` part."""
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
    }


def usage(usage_: Usage) -> dict[str, Any]:
    """Return a Responses usage object, detail objects included."""
    return {
        "input_tokens": usage_.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage_.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage_.total_tokens,
    }


def _retry_seconds(retry_after: str | None) -> int | None:
    """Return SAI's ``Retry-After`` (seconds or an HTTP date) in whole seconds."""
    if not retry_after:
        return None
    try:
        return max(0, math.ceil(float(retry_after)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return None
    return max(0, math.ceil(when.timestamp() - time.time()))


def error_object(error: UpstreamError) -> dict[str, Any]:
    """Return a failed Response's ``error``, with a code Codex maps to its own handling.

    Codex reads ``context_length_exceeded`` (stop, the conversation must shrink)
    and ``rate_limit_exceeded`` (retry after the "try again in N s" of the
    message); anything else is a server error it retries.
    """
    message = error.message
    if isinstance(error, ContextTooLong):
        code = "context_length_exceeded"
    elif isinstance(error, UpstreamRateLimited):
        code = "rate_limit_exceeded"
        seconds = _retry_seconds(error.retry_after)
        if seconds is not None:
            message = f"{message} Please try again in {seconds}s."
    else:
        code = "server_error"
    return {"code": code, "message": message, "type": error.type, "param": None}


def event(kind: str, sequence: int, fields: dict[str, Any]) -> bytes:
    """Return one stream event: ``event: <type>`` and its JSON, numbered ``sequence``."""
    data = orjson.dumps({"type": kind, "sequence_number": sequence, **fields})
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), data)


def not_found(response_id: str) -> NotFound:
    """Return the 404 for a response id the caller has no response of."""
    return NotFound(f"Response with id '{response_id[:80]}' not found.", param="response_id")
