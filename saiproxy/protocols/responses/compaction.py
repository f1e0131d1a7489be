"""Compaction of long Responses sessions: SAI summarises, saiproxy keeps the summary.

Codex CLI, talking to an OpenAI-type provider, compacts a long session
remotely in one of two forms, and expects exactly one ``compaction`` item:

- ``POST /v1/responses/compact`` (not streamed): the history in ``input``;
  the answer's ``output`` is the history's user messages, then the item;
- ``POST /v1/responses`` whose ``input`` ends with a ``compaction_trigger``
  item (streamed or not): a Response whose only output item is the item.

Either way SAI is called once, through the exchange (limits, logs, errors as
for any request), with the history and an instruction to summarise it; no
tool is offered. The summary is kept in the state store under its owner (the
same client identity as the limits) and the item's ``encrypted_content`` is
only its id: when a later request carries the item, :func:`expand` puts the
summary back in its place, on any replica. A compaction item saiproxy cannot
find for the caller (forged, another client's, expired, or another
provider's) is left out of the conversation and logged, like an expired
stored item; it is never read as text.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

from aiohttp import web

from ...base.errors import InvalidRequest, UpstreamError
from ...base.log import protocols_logger as log
from ...core.bodies import read_json
from ...core.conversation import Answer, ToolCall, Turn, Usage
from ...core.exchange import Exchange
from ...core.sse import COMMENT_PING
from ...state import owner_of
from ...state.store import STATE_STORE, as_items, new_id
from .common import error_object, event, message_item, response_object, usage
from .parse import parse

__all__ = [
    "ITEM_TYPES",
    "SUMMARISE",
    "SUMMARY_HEAD",
    "TRIGGER",
    "CompactionRenderer",
    "compact",
    "expand",
    "respond",
    "triggered",
]

TRIGGER: Final = "compaction_trigger"
# The item's type; ``compaction_summary`` is the name some releases of Codex use.
ITEM_TYPES: Final = frozenset({"compaction", "compaction_summary"})
SUMMARISE: Final = (
    "Write a summary of the whole conversation above: it will replace the conversation, "
    "so whoever continues the work must be able to carry on from the summary alone. "
    "Keep the user's goals, requests and constraints; the decisions made and why; what "
    "was done (files, commands, their results); what is still to do; and every detail "
    "needed to continue (names, paths, values, errors). Answer with the summary only, "
    "without calling any tool."
)
SUMMARY_HEAD: Final = "A summary of the earlier part of this conversation (compacted):\n\n"
# Input items that only carry the offered tools or the trigger: not history to summarise.
_NOT_HISTORY: Final = frozenset({TRIGGER, "additional_tools"})


def _is_compaction(item: Any) -> bool:
    """Return whether ``item`` is a compaction item (its type may be any JSON value)."""
    if not isinstance(item, dict):
        return False
    kind = item.get("type")
    return isinstance(kind, str) and kind in ITEM_TYPES


def _compaction_ids(items: Sequence[Any]) -> list[str]:
    return [
        item["encrypted_content"]
        for item in items
        if _is_compaction(item) and isinstance(item.get("encrypted_content"), str)
    ]


async def expand(request: web.Request, body: dict[str, Any], raw_input: Any) -> Any:
    """Return ``raw_input`` with each compaction item replaced by its summary, as user text.

    Items whose summary the caller does not own (or that expired) are left out.
    """
    items = as_items(raw_input)
    if not any(_is_compaction(item) for item in items):
        return raw_input
    ids = _compaction_ids(items)
    found = await request.app[STATE_STORE].summaries(owner_of(request, body), ids) if ids else {}
    whole: list[Any] = []
    for item in items:
        if not _is_compaction(item):
            whole.append(item)
            continue
        content = item.get("encrypted_content")
        summary = found.get(content) if isinstance(content, str) else None
        if summary is None:
            log.info(
                "compaction item not found for this client, left out",
                extra={"id": str(item.get("encrypted_content"))[:80]},
            )
            continue
        whole.append({"type": "message", "role": "user", "content": SUMMARY_HEAD + summary})
    return whole


def triggered(raw_input: Any) -> bool:
    """Return whether a Responses ``input`` asks for a compaction (a ``compaction_trigger``)."""
    return isinstance(raw_input, list) and any(
        isinstance(item, dict) and item.get("type") == TRIGGER for item in raw_input
    )


def _item(summary_id: str) -> dict[str, Any]:
    return {"id": summary_id, "type": "compaction", "encrypted_content": summary_id}


class CompactionRenderer:
    """Renders a compaction: one ``compaction`` item once SAI's summary is kept.

    The summary is gathered, not streamed: the stream carries the Response's
    lifecycle and one item. An answer SAI did not give (an error explained in
    ``message`` mode) is a message item with the explanation instead.
    """

    eager = True

    def __init__(
        self, request: web.Request, owner: str, ids: str, echo: dict[str, Any], *, v1: bool
    ) -> None:
        self._state = request.app[STATE_STORE]
        self._owner = owner
        self._id = f"resp_{ids}"
        self._summary_id = new_id("cmp")
        self._echo = echo
        self._v1 = v1
        self._created = int(time.time())
        self._sequence = 0
        self._model = ""
        self._pieces: list[str] = []
        self.summary: str | None = None  # kept by the handler when not streamed
        self._kept = False
        self.retained: list[dict[str, Any]] = []  # v1: the user messages that stay

    # --- the objects

    def _output(self, ok: bool, text: str) -> list[dict[str, Any]]:
        if not ok:
            return [message_item(f"msg_{self._summary_id[4:]}", text, "completed")]
        return [*self.retained, _item(self._summary_id)]

    def _response(self, status: str, model: str, output: list[Any], **extra: Any) -> dict[str, Any]:
        if self._v1:
            return {"id": self._id, "object": "response.compaction",
                    "created_at": self._created, "output": output, **extra}  # fmt: skip
        return response_object(self._id, self._created, status, model, output, self._echo, **extra)

    def body(self, answer: Answer) -> dict[str, Any]:
        if answer.outcome == "ok":
            self.summary = answer.text
        return self._response(
            "completed", answer.model, self._output(answer.outcome == "ok", answer.text),
            completed_at=int(time.time()), usage=usage(answer.usage),
        )  # fmt: skip

    async def keep_summary(self) -> None:
        """Keep the summary (not streamed: before the handler returns the answer)."""
        if self.summary is not None:
            await self._state.keep_summary(self._owner, self._summary_id, self.summary)

    # --- the stream

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        sequence = self._sequence
        self._sequence += 1
        return event(kind, sequence, fields)

    def head(self, model: str) -> bytes:
        self._model = model
        response = self._response("in_progress", model, [])
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def ping(self) -> bytes:
        return COMMENT_PING

    def text(self, piece: str) -> bytes:
        self._pieces.append(piece)
        return b""

    def calls(self, calls: Sequence[ToolCall]) -> bytes:
        return b""  # no tool is offered: a call written anyway is not the summary's business

    async def keep(self, answer: Answer) -> bytes:
        """Keep the summary before the item goes out: the next turn finds it on any replica."""
        if answer.outcome == "ok":
            await self._state.keep_summary(self._owner, self._summary_id, "".join(self._pieces))
            self._kept = True
        return b""

    def finish(self, answer: Answer) -> bytes:
        # Kept: SAI's summary. Not kept: an error explained as text (``message`` mode).
        (item,) = self._output(self._kept, "".join(self._pieces))
        frames = self._event("response.output_item.added", {"output_index": 0, "item": item})
        frames += self._event("response.output_item.done", {"output_index": 0, "item": item})
        response = self._response(
            "completed", answer.model or self._model, [item],
            completed_at=int(time.time()), usage=usage(answer.usage),
        )  # fmt: skip
        return frames + self._event("response.completed", {"response": response})

    def failure(self, error: UpstreamError) -> bytes:
        response = self._response(
            "failed", self._model, [], error=error_object(error), usage=usage(Usage())
        )
        return self._event("response.failed", {"response": response})


async def respond(
    request: web.Request, body: dict[str, Any], whole: Any, *, v1: bool = False
) -> web.StreamResponse:
    """Answer a compaction: SAI summarises ``whole`` (the history), the summary is kept."""
    history = [
        item for item in as_items(whole)
        if not (isinstance(item, dict) and item.get("type") in _NOT_HISTORY)
    ]  # fmt: skip
    if not history:
        raise InvalidRequest("There is nothing to compact: 'input' holds no history",
                             param="input")  # fmt: skip
    owner = owner_of(request, body)
    state = request.app[STATE_STORE]
    await state.room(owner, 0)  # a client past its quota is refused before SAI is called
    conversation, echo = parse(
        {**body, "input": history, "tools": None, "tool_choice": None, "text": None,
         "store": False, "stream": False if v1 else body.get("stream")}
    )  # fmt: skip
    conversation.turns.append(Turn("user", SUMMARISE))
    exchange = Exchange(request, body, conversation, protocol="responses")
    renderer = CompactionRenderer(request, owner, exchange.ids, echo, v1=v1)
    if v1:
        renderer.retained = [
            item for item in as_items(body.get("input"))
            if isinstance(item, dict) and item.get("type", "message") == "message"
            and item.get("role") == "user"
        ]  # fmt: skip
    del body
    response = await exchange.respond(renderer)
    await renderer.keep_summary()
    return response


async def compact(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses/compact``: the history summarised into one compaction item."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    whole = await expand(request, body, body.get("input"))
    return await respond(request, body, whole, v1=True)
