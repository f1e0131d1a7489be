"""Anthropic Messages handlers: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``."""

from __future__ import annotations

from aiohttp import web

from ...base.errors import ModelNotFound
from ...base.keys import SETTINGS
from ...core.bodies import json_response, read_json
from ...core.exchange import Exchange
from ...core.prompt import estimate_tokens, sai_payload
from ...core.toolcache import TOOL_CACHES
from .. import openai
from .parse import USED_FIELDS, parse
from .render import MessagesRenderer

__all__ = ["count_tokens", "messages"]


async def messages(request: web.Request) -> web.StreamResponse:
    """Answer an Anthropic Messages request from a SAI template execution."""
    body = await read_json(request)
    conversation = parse(body, caches=request.app[TOOL_CACHES])
    openai.fields_ignored(body, USED_FIELDS, request.headers.get("anthropic-beta"))
    exchange = Exchange(request, body, conversation, protocol="messages")
    del body  # the exchange lets it go once parsed; a long stream need not keep it
    # message_start carries the input estimate; the exchange has it once prepared.
    renderer = MessagesRenderer(f"msg_{exchange.ids}", lambda: estimate_tokens(exchange.chars))
    return await exchange.respond(renderer)


async def count_tokens(request: web.Request) -> web.Response:
    """Return ``{"input_tokens": n}``: the estimate the early context check makes."""
    body = await read_json(request)
    caches = request.app[TOOL_CACHES]
    conversation = parse(body, counting=True, caches=caches)
    openai.fields_ignored(body, USED_FIELDS, request.headers.get("anthropic-beta"))
    if request.app[SETTINGS].model_for(conversation.model) is None:
        raise ModelNotFound(conversation.model)
    _, chars = sai_payload(conversation, 0, caches)
    return json_response({"input_tokens": estimate_tokens(chars)})
