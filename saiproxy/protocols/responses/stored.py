"""Stored Responses: what ``POST /v1/responses`` keeps and continues, and the routes that read it.

``continuation`` turns a Responses body into the whole input SAI needs (the
stored chain of ``previous_response_id`` or the conversation's items, then
the new input, every ``item_reference`` resolved) and says what to keep once
SAI has answered. The handlers: ``GET``/``DELETE /v1/responses/{id}`` and
``GET /v1/responses/{id}/input_items``.
Everything is the caller's own: another client's id is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final

import orjson
from aiohttp import web

from ...base.errors import InvalidRequest, NotFound
from ...base.log import protocols_logger as log
from ...core.bodies import json_response
from ...state import owner_of
from ...state.store import STATE_STORE, State, as_items, stored_item
from .. import openai
from . import background
from .common import Continuation, not_found

__all__ = [
    "MAX_PAGE",
    "continuation",
    "delete_response",
    "get_response",
    "input_items",
    "item_list",
    "page",
]

# Input items that are not turns of the conversation: not kept in a chain.
_NOT_KEPT: Final = frozenset({"item_reference", "additional_tools"})
MAX_PAGE: Final = 100


def _conversation_id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(
            "'conversation' must be a conversation id or an object with its 'id'",
            param="conversation",
        )
    return value


def _continued(body: dict[str, Any]) -> tuple[bool, str | None, str | None]:
    """Return ``store``, ``previous_response_id`` and the conversation's id, checked."""
    store = openai.flag(body, "store", True)
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise InvalidRequest(
            "'previous_response_id' must be a string", param="previous_response_id"
        )
    conversation = _conversation_id(body.get("conversation"))
    if previous and conversation:
        raise InvalidRequest(
            "'previous_response_id' and 'conversation' cannot be used together",
            param="previous_response_id",
        )
    return store, previous, conversation


async def continuation(request: web.Request, body: dict[str, Any]) -> Continuation:
    """Return the request's whole input and what to keep; 404 for a chain not the caller's."""
    store, previous, conversation = _continued(body)
    raw = body.get("input")
    items = as_items(raw)
    references = [
        item["id"] for item in items
        if isinstance(item, dict) and item.get("type") == "item_reference"
        and isinstance(item.get("id"), str)
    ]  # fmt: skip
    if not items or not (store or previous or conversation or references):
        return Continuation(raw, store=store)  # nothing to read or keep (or parse refuses it)
    state = request.app[STATE_STORE]
    owner = owner_of(request, body)
    keeps = store or conversation is not None
    # Items the request names by reference and holds itself are resolved by the adapter.
    own = {item.get("id") for item in items if isinstance(item, dict)
           and item.get("type") != "item_reference"}  # fmt: skip
    stored = [r for r in references if r not in own]
    if keeps:
        # An item sent back whole with its id (an earlier answer's output, say) is
        # already stored: it is referred to, not stored again as this response's own.
        stored += [i for i in own if isinstance(i, str) and i not in stored]
    context, found = await _read(state, owner, previous, conversation, stored, keeps=keeps)
    missing = sum(1 for item_id in context if item_id not in found)
    if missing:
        log.info("stored items expired, left out of the chain", extra={"count": missing})
    whole, new_items, input_ids = _whole(items, context, found, keeps=keeps)
    if keeps and new_items:
        await state.room(owner, sum(len(orjson.dumps(item)) for item in new_items))
    return Continuation(
        whole, store=store, previous=previous or None, conversation=conversation,
        state=state, owner=owner, new_items=new_items, input_ids=input_ids, context=context,
    )  # fmt: skip


async def _read(
    state: State,
    owner: str,
    previous: str | None,
    conversation: str | None,
    stored: list[str],
    *,
    keeps: bool,
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Return the ids of the chain's items, in order, and the stored items found by id.

    With ``keeps``, the caller's room in the store is checked too: refused
    before SAI is called.
    """
    context: list[str] = []
    # Every read is started at once: the store client sends them together.
    room = asyncio.ensure_future(state.room(owner, 0)) if keeps else None
    try:
        if previous:
            record, context, found = await state.chain(owner, previous, stored)
            if record is None:
                raise NotFound(
                    f"Previous response with id '{previous[:80]}' not found.",
                    param="previous_response_id",
                )
        elif conversation:
            known, context = await asyncio.gather(
                state.conversation(owner, conversation), state.item_ids(owner, conversation)
            )
            if known is None:
                raise NotFound(f"Conversation with id '{conversation[:80]}' not found.",
                               param="conversation")  # fmt: skip
            found = await state.items(owner, [*context, *stored])
        else:
            found = await state.items(owner, stored) if stored else {}
    except BaseException:
        if room is not None:
            room.cancel()
            with contextlib.suppress(BaseException):
                await room
        raise
    if room is not None:
        await room  # the quota: refused before SAI is called
    return context, found


def _whole(
    items: list[Any], context: list[str], found: dict[str, dict[str, Any]], *, keeps: bool
) -> tuple[list[Any], list[dict[str, Any]], list[str]]:
    """Return the whole input for SAI, the items to store, and the ids of the request's input."""
    whole: list[Any] = [found[item_id] for item_id in context if item_id in found]
    new_items: list[dict[str, Any]] = []
    input_ids: list[str] = []
    for item in items:
        if not isinstance(item, dict):
            whole.append(item)  # parse refuses it
            continue
        kind = item.get("type")
        if kind == "item_reference" and item.get("id") in found:
            whole.append(found[item["id"]])
            input_ids.append(item["id"])
            continue
        if kind in _NOT_KEPT or not keeps:
            whole.append(item)
            continue
        if item.get("id") in found and kind != "item_reference":
            whole.append(item)  # SAI gets what the client sent
            input_ids.append(item["id"])
            continue
        kept = stored_item(item)
        new_items.append(kept)
        input_ids.append(kept["id"])
        whole.append(item)
    return whole, new_items, input_ids


# --- reading what is stored


def page(
    request: web.Request, items: Sequence[str], *, default_order: str = "desc"
) -> tuple[list[str], bool]:
    """Return the ids of the page ``after``/``before``/``limit``/``order`` ask for, and has_more.

    ``items`` are in the order they were added; ``after`` and ``before`` are
    item ids, exclusive, in the listing's order.
    """
    query = request.query
    order = query.get("order", default_order)
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'", param="order")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise InvalidRequest("'limit' must be an integer", param="limit") from None
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"'limit' must be between 1 and {MAX_PAGE}", param="limit")
    listed = list(items) if order == "asc" else list(reversed(items))
    after, before = query.get("after"), query.get("before")
    if after:
        listed = listed[listed.index(after) + 1 :] if after in listed else []
    if before:
        listed = listed[: listed.index(before)] if before in listed else listed
    return listed[:limit], len(listed) > limit


def item_list(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """Return OpenAI's list shape."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


async def _stored(request: web.Request) -> tuple[State, str, str]:
    return request.app[STATE_STORE], owner_of(request), request.match_info["response_id"]


async def get_response(request: web.Request) -> web.StreamResponse:
    """``GET /v1/responses/{id}``: the stored Response object (``stream=true``: its events)."""
    if request.query.get("stream") in ("true", "1"):
        return await background.replay(request)
    state, owner, response_id = await _stored(request)
    record = await state.response(owner, response_id)
    if record is None:
        raise not_found(response_id)
    return json_response(await background.settled(state, owner, record.response))


async def delete_response(request: web.Request) -> web.Response:
    """``DELETE /v1/responses/{id}``: OpenAI's deleted shape, then a 404 for the id."""
    state, owner, response_id = await _stored(request)
    if not await state.forget(owner, response_id):
        raise not_found(response_id)
    return json_response({"id": response_id, "object": "response", "deleted": True})


async def input_items(request: web.Request) -> web.Response:
    """``GET /v1/responses/{id}/input_items``: the request's input items, a page at a time."""
    state, owner, response_id = await _stored(request)
    record = await state.response(owner, response_id)
    if record is None:
        raise not_found(response_id)
    ids, has_more = page(request, record.input)
    found = await state.items(owner, ids)
    return json_response(item_list([found[i] for i in ids if i in found], has_more))
