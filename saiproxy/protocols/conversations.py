"""OpenAI's Conversations API: a conversation's object and its items, stored for its owner.

``POST /v1/conversations``, ``GET``/``POST``/``DELETE /v1/conversations/{id}``,
``POST``/``GET /v1/conversations/{id}/items``, ``GET``/``DELETE
/v1/conversations/{id}/items/{item_id}``, in OpenAI's shapes; a Responses
request with ``conversation`` adds its input and output (:mod:`.stored`).
Another client's conversation is a 404.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from ..base.errors import InvalidRequest, NotFound
from ..core.bodies import json_response, read_json
from ..core.conversation import check_count
from ..state import owner_of
from ..state.store import STATE_STORE, State
from .responses.stored import item_list, page

__all__ = [
    "MAX_METADATA",
    "MAX_NEW_ITEMS",
    "add_items",
    "add_routes",
    "create",
    "delete",
    "delete_item",
    "get_item",
    "list_items",
    "retrieve",
    "update",
]

MAX_NEW_ITEMS: Final = 20  # items one request may add, as OpenAI allows
MAX_METADATA: Final = 16  # metadata keys, as OpenAI allows


def _metadata(body: dict[str, Any]) -> dict[str, Any]:
    metadata = body.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA:
        raise InvalidRequest(
            f"'metadata' must be an object of at most {MAX_METADATA} string values",
            param="metadata",
        )
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise InvalidRequest(
                "'metadata' keys are at most 64 characters, values strings of at most 512",
                param="metadata",
            )
    return metadata


def _items(body: dict[str, Any], *, required: bool) -> list[dict[str, Any]]:
    items = body.get("items")
    if items is None and not required:
        return []
    if not isinstance(items, list) or (required and not items):
        raise InvalidRequest("'items' must be a non-empty array of items", param="items")
    check_count(items, MAX_NEW_ITEMS, "items", "items")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidRequest(f"items[{index}] must be an object", param="items")
        if item.get("type", "message") == "message" and not isinstance(item.get("role"), str):
            raise InvalidRequest(f"items[{index}].role is required", param="items")
    return items


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    return body


async def _found(request: web.Request) -> tuple[State, str, dict[str, Any]]:
    """Return the state, the owner and the caller's conversation named in the path; else 404."""
    state = request.app[STATE_STORE]
    owner = owner_of(request)
    conversation_id = request.match_info["conversation_id"]
    conversation = await state.conversation(owner, conversation_id)
    if conversation is None:
        raise NotFound(
            f"Conversation with id '{conversation_id[:80]}' not found.", param="conversation_id"
        )
    return state, owner, conversation


async def create(request: web.Request) -> web.Response:
    """``POST /v1/conversations``: a new conversation, with up to 20 first items."""
    body = await _body(request)
    metadata, items = _metadata(body), _items(body, required=False)
    conversation = await request.app[STATE_STORE].new_conversation(
        owner_of(request), metadata, items
    )
    return json_response(conversation)


async def retrieve(request: web.Request) -> web.Response:
    """``GET /v1/conversations/{id}``."""
    _, _, conversation = await _found(request)
    return json_response(conversation)


async def update(request: web.Request) -> web.Response:
    """``POST /v1/conversations/{id}``: its metadata replaced."""
    state, owner, conversation = await _found(request)
    body = await _body(request)
    if "metadata" not in body:
        raise InvalidRequest("'metadata' is required", param="metadata")
    conversation = {**conversation, "metadata": _metadata(body)}
    await state.save_conversation(owner, conversation)
    return json_response(conversation)


async def delete(request: web.Request) -> web.Response:
    """``DELETE /v1/conversations/{id}``: OpenAI's deleted shape."""
    state, owner, conversation = await _found(request)
    await state.drop_conversation(owner, conversation["id"])
    return json_response(
        {"id": conversation["id"], "object": "conversation.deleted", "deleted": True}
    )


async def add_items(request: web.Request) -> web.Response:
    """``POST /v1/conversations/{id}/items``: the items added, as a list."""
    state, owner, conversation = await _found(request)
    items = _items(await _body(request), required=True)
    added = await state.add_items(owner, conversation["id"], items)
    return json_response(item_list(added, False))


async def list_items(request: web.Request) -> web.Response:
    """``GET /v1/conversations/{id}/items``: paginated (``after``, ``limit``, ``order``)."""
    state, owner, conversation = await _found(request)
    ids, has_more = page(request, await state.item_ids(owner, conversation["id"]))
    found = await state.items(owner, ids)
    return json_response(item_list([found[i] for i in ids if i in found], has_more))


async def _item_id(request: web.Request, state: State, owner: str, conversation_id: str) -> str:
    item_id = request.match_info["item_id"]
    if item_id not in await state.item_ids(owner, conversation_id):
        raise NotFound(f"Item with id '{item_id[:80]}' not found.", param="item_id")
    return item_id


async def get_item(request: web.Request) -> web.Response:
    """``GET /v1/conversations/{id}/items/{item_id}``."""
    state, owner, conversation = await _found(request)
    item_id = await _item_id(request, state, owner, conversation["id"])
    item = await state.item(owner, item_id)
    if item is None:
        raise NotFound(f"Item with id '{item_id[:80]}' not found.", param="item_id")
    return json_response(item)


async def delete_item(request: web.Request) -> web.Response:
    """``DELETE /v1/conversations/{id}/items/{item_id}``: the conversation, as OpenAI answers."""
    state, owner, conversation = await _found(request)
    item_id = await _item_id(request, state, owner, conversation["id"])
    await state.remove_item(owner, conversation["id"], item_id)
    return json_response(conversation)


def add_routes(router: web.UrlDispatcher, prefix: str) -> None:
    """Add the Conversations API's routes under ``prefix`` ("" or "/v1")."""
    base = f"{prefix}/conversations"
    one = f"{base}/{{conversation_id}}"
    router.add_post(base, create)
    router.add_get(one, retrieve)
    router.add_post(one, update)
    router.add_delete(one, delete)
    router.add_post(f"{one}/items", add_items)
    router.add_get(f"{one}/items", list_items)
    router.add_get(f"{one}/items/{{item_id}}", get_item)
    router.add_delete(f"{one}/items/{{item_id}}", delete_item)
