"""Stored Responses, their items and conversations, each visible to its owner only.

Every key names its owner (``<kind>:<length of owner>:<owner>:<id>``): a
lookup by another client finds nothing, whatever the id, so isolation holds
by construction and a foreign id is simply not found (a 404). Ids are
unguessable anyway (``secrets.token_hex``), in OpenAI's prefixes.

What is kept (see docs/protocols.md, "Stored responses and conversations"):

- a response's record: the Response object, the ids of its input items, and
  the ids of the items that came before them (its ``previous_response_id``'s
  chain, or its conversation's items), so a continuation is one read of the
  record and one of the items;
- each item once, under its id: the request's input items and the answer's
  output items (``item_reference`` resolves any of them);
- a conversation's object, and the list of its item ids in order.

A background response is a record kept before SAI answers (``keep`` with its
``queued`` Response, ``restatus`` as it goes, kept again when it ends: its
status is what every replica reads), with its owner replica's lease
(``lease``), a cancel flag any replica may set (``ask_cancel``) and, when
streamed, its events (``add_events``). A compaction item's opaque content
is only the id of a summary kept under its owner (``keep_summary``), so that
no replica trusts what the client sends back.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from ..base.errors import StorageQuotaExceeded
from .backend import ENTRY_OVERHEAD, Backend

__all__ = ["MAX_ID", "STATE_STORE", "State", "StoredResponse", "as_items", "new_id", "stored_item"]

MAX_ID: Final = 256  # characters of an id a client names; longer ones are found nowhere
_ITEM_PREFIXES: Final = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "reasoning": "rs",
}


def new_id(prefix: str) -> str:
    """Return an unguessable id with OpenAI's ``prefix`` (``resp``, ``msg``, ``conv``, ...)."""
    return f"{prefix}_{secrets.token_hex(24)}"


def as_items(raw: Any) -> list[Any]:
    """Return a Responses ``input`` as items (a string is one user message)."""
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    return list(raw) if isinstance(raw, list) else []


def stored_item(item: dict[str, Any]) -> dict[str, Any]:
    """Return an input item as it is stored and listed: with an id and a status.

    A message's string content becomes one text part, as OpenAI lists it.
    """
    kind = item.get("type", "message")
    stored = {**item, "type": kind}
    if not isinstance(stored.get("id"), str) or not stored["id"]:
        stored["id"] = new_id(_ITEM_PREFIXES.get(kind, "item") if isinstance(kind, str) else "item")
    if kind == "message":
        content = stored.get("content")
        if isinstance(content, str):
            part = "output_text" if stored.get("role") == "assistant" else "input_text"
            text: dict[str, Any] = {"type": part, "text": content}
            if part == "output_text":
                text["annotations"] = []
            stored["content"] = [text]
    if kind in ("message", "function_call", "function_call_output") and "status" not in stored:
        stored["status"] = "completed"
    return stored


@dataclass(slots=True)
class StoredResponse:
    """A response's record."""

    response: dict[str, Any]
    input: list[str]  # its input items' ids
    context: list[str]  # the ids of the items before them
    owned: list[str]  # the item ids it wrote (deleted with it)
    receipt: int
    size: int  # the bytes of the items it wrote

    @property
    def output(self) -> list[str]:
        return [item["id"] for item in self.response.get("output", []) if "id" in item]


def _valid(item_id: Any) -> bool:
    return isinstance(item_id, str) and 0 < len(item_id) <= MAX_ID


class State:
    """The stored responses, items and conversations of every client."""

    def __init__(self, backend: Backend, prefix: str, quota: int) -> None:
        self.backend = backend
        self.prefix = prefix
        self.quota = quota

    def _key(self, kind: str, owner: str, id_: str) -> str:
        return f"{self.prefix}{kind}:{len(owner)}:{owner}:{id_}"

    # --- items

    async def items(self, owner: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Return the stored items among ``ids``, by id (absent or expired ones are left out)."""
        wanted = [i for i in dict.fromkeys(ids) if _valid(i)]
        found = await self.backend.get([self._key("i", owner, i) for i in wanted])
        return {i: orjson.loads(raw) for i, raw in zip(wanted, found, strict=True) if raw}

    async def item(self, owner: str, item_id: str) -> dict[str, Any] | None:
        return (await self.items(owner, [item_id])).get(item_id)

    def _over_quota(self) -> StorageQuotaExceeded:
        return StorageQuotaExceeded(
            f"Storing this would exceed this client's storage quota of {self.quota} bytes "
            "(STATE_CLIENT_BYTES): delete stored responses or conversations, or send "
            "'store': false",
            param="store",
        )

    async def room(self, owner: str, size: int) -> None:
        """Refuse (400) what would take the client past its quota; check before calling SAI."""
        if self.quota and await self.backend.used(owner) + size > self.quota:
            raise self._over_quota()

    # --- responses

    def _record(self, key: str, raw: bytes) -> StoredResponse:
        record = orjson.loads(raw)
        return StoredResponse(
            record["response"], record["input"], record["context"], record["owned"],
            record["receipt"], record["size"] + len(key) + len(raw) + ENTRY_OVERHEAD,
        )  # fmt: skip

    async def response(self, owner: str, response_id: str) -> StoredResponse | None:
        if not _valid(response_id):
            return None
        key = self._key("r", owner, response_id)
        (raw,) = await self.backend.get([key])
        return self._record(key, raw) if raw is not None else None

    async def chain(
        self, owner: str, response_id: str, more: Sequence[str]
    ) -> tuple[StoredResponse | None, list[str], dict[str, dict[str, Any]]]:
        """Return a response's record, the ids of its chain (every item before the next
        input) and the stored items among them and ``more``: one round trip."""
        if not _valid(response_id):
            return None, [], {}
        key = self._key("r", owner, response_id)
        prefix = self._key("i", owner, "")
        raw, ids, values = await self.backend.chain(key, prefix, [i for i in more if _valid(i)])
        if raw is None:
            return None, [], {}
        record = self._record(key, raw)
        chain = ids[: len(ids) - len([i for i in more if _valid(i)])]
        found = {i: orjson.loads(v) for i, v in zip(ids, values, strict=True) if v is not None}
        return record, chain, found

    async def keep(
        self,
        owner: str,
        response: dict[str, Any],
        new_items: Sequence[dict[str, Any]],
        input_ids: Sequence[str],
        context: Sequence[str],
        *,
        store: bool,
        conversation: str | None,
    ) -> None:
        """Keep an answered response: its new input items, its output items, its record;
        and add its input and output to its conversation."""
        output = [item for item in response.get("output", []) if _valid(item.get("id"))]
        entries = [
            (self._key("i", owner, item["id"]), orjson.dumps(item))
            for item in [*new_items, *output]
        ]
        receipt = self.backend.receipt()
        if store:
            owned = [] if conversation else [item["id"] for item in [*new_items, *output]]
            size = sum(len(key) + len(value) + ENTRY_OVERHEAD for key, value in entries)
            record = {
                "response": response, "input": list(input_ids), "context": list(context),
                "owned": owned, "receipt": receipt, "size": size if owned else 0,
                # What a continuation puts before its input, read with the record.
                "chain": [*context, *input_ids, *(item["id"] for item in output)],
            }  # fmt: skip
            entries.append((self._key("r", owner, response["id"]), orjson.dumps(record)))
        # The answer is given: it is kept even past the quota (checked before SAI was called).
        await self.backend.put(owner, entries, quota=0, receipt=receipt)
        if conversation:
            await self.backend.append(
                owner,
                self._key("l", owner, conversation),
                [*input_ids, *(item["id"] for item in output)],
            )

    async def forget(self, owner: str, response_id: str) -> bool:
        """Delete a response and the items it wrote (not those of a conversation)."""
        record = await self.response(owner, response_id)
        if record is None:
            return False
        keys = [self._key("r", owner, response_id)]
        keys += [self._key("i", owner, item_id) for item_id in record.owned]
        return await self.backend.delete(owner, keys, record.receipt, record.size) > 0

    # --- background responses

    async def restatus(self, owner: str, response: dict[str, Any]) -> None:
        """Replace a kept response's object (a background response's status), nothing else."""
        key = self._key("r", owner, response["id"])
        (raw,) = await self.backend.get([key])
        if raw is None:
            return
        record = orjson.loads(raw)
        record["response"] = response
        await self.backend.put(
            owner, [(key, orjson.dumps(record))], quota=0, receipt=self.backend.receipt()
        )

    async def lease(self, owner: str, response_id: str, until: float) -> None:
        """Say the replica running a background response is alive until ``until`` (epoch s)."""
        entry = (self._key("b", owner, response_id), b"%f" % until)
        await self.backend.put(owner, [entry], quota=0, receipt=self.backend.receipt())

    async def lease_until(self, owner: str, response_id: str) -> float | None:
        (raw,) = await self.backend.get([self._key("b", owner, response_id)])
        return float(raw) if raw is not None else None

    async def ask_cancel(self, owner: str, response_id: str) -> None:
        entry = (self._key("x", owner, response_id), b"1")
        await self.backend.put(owner, [entry], quota=0, receipt=self.backend.receipt())

    async def cancel_asked(self, owner: str, response_id: str) -> bool:
        (raw,) = await self.backend.get([self._key("x", owner, response_id)])
        return raw is not None

    async def add_events(self, owner: str, response_id: str, frames: Sequence[str]) -> None:
        """Add a streamed background response's events, in order (replayed from any replica)."""
        await self.backend.append(owner, self._key("e", owner, response_id), frames)

    async def events(self, owner: str, response_id: str) -> list[str]:
        return await self.backend.members(self._key("e", owner, response_id))

    # --- compaction summaries

    async def keep_summary(self, owner: str, summary_id: str, summary: str) -> None:
        """Keep a compaction's summary under the id its item carries (within the quota)."""
        entry = (self._key("s", owner, summary_id), orjson.dumps({"summary": summary}))
        written = await self.backend.put(
            owner, [entry], quota=self.quota, receipt=self.backend.receipt()
        )
        if written is None:
            raise self._over_quota()

    async def summaries(self, owner: str, ids: Sequence[str]) -> dict[str, str]:
        """Return the stored summaries among ``ids`` of ``owner``, by id (others are absent)."""
        wanted = [i for i in dict.fromkeys(ids) if _valid(i)]
        found = await self.backend.get([self._key("s", owner, i) for i in wanted])
        pairs = zip(wanted, found, strict=True)
        return {i: orjson.loads(raw)["summary"] for i, raw in pairs if raw}

    # --- conversations

    async def conversation(self, owner: str, conversation_id: str) -> dict[str, Any] | None:
        if not _valid(conversation_id):
            return None
        (raw,) = await self.backend.get([self._key("c", owner, conversation_id)])
        return orjson.loads(raw) if raw is not None else None

    async def save_conversation(self, owner: str, conversation: dict[str, Any]) -> None:
        key = self._key("c", owner, conversation["id"])
        written = await self.backend.put(
            owner, [(key, orjson.dumps(conversation))], quota=self.quota,
            receipt=self.backend.receipt(),
        )  # fmt: skip
        if written is None:
            raise self._over_quota()

    async def new_conversation(
        self, owner: str, metadata: dict[str, Any], items: Sequence[dict[str, Any]]
    ) -> dict[str, Any]:
        conversation: dict[str, Any] = {
            "id": new_id("conv"), "object": "conversation",
            "created_at": int(time.time()), "metadata": metadata,
        }  # fmt: skip
        await self.save_conversation(owner, conversation)
        if items:
            await self.add_items(owner, conversation["id"], items)
        return conversation

    async def drop_conversation(self, owner: str, conversation_id: str) -> bool:
        """Delete a conversation and its list of items (the items expire with their TTL)."""
        keys = [self._key("c", owner, conversation_id), self._key("l", owner, conversation_id)]
        return await self.backend.delete(owner, keys, -1, 0) > 0

    async def add_items(
        self, owner: str, conversation_id: str, items: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Store ``items`` (within the quota) and add them to the conversation; return them."""
        stored = [stored_item(item) for item in items]
        entries = [(self._key("i", owner, item["id"]), orjson.dumps(item)) for item in stored]
        written = await self.backend.put(
            owner, entries, quota=self.quota, receipt=self.backend.receipt()
        )
        if written is None:
            raise self._over_quota()
        await self.backend.append(
            owner, self._key("l", owner, conversation_id), [item["id"] for item in stored]
        )
        return stored

    async def item_ids(self, owner: str, conversation_id: str) -> list[str]:
        return await self.backend.members(self._key("l", owner, conversation_id))

    async def remove_item(self, owner: str, conversation_id: str, item_id: str) -> None:
        await self.backend.remove(self._key("l", owner, conversation_id), item_id)
        await self.backend.delete(owner, [self._key("i", owner, item_id)], -1, 0)


# Stored Responses and conversations (saiproxy/state/).
STATE_STORE: Final = web.AppKey("state_store", State)
