"""OpenAI Responses handlers: ``POST /v1/responses`` and ``POST /v1/responses/input_tokens``.

What is stored and continued (``store``, ``previous_response_id``,
``conversation``, ``item_reference`` to a stored item) is :mod:`.stored`'s;
compaction (a ``compaction_trigger`` item, a ``compaction`` item sent back)
is :mod:`.compaction`'s; ``background`` is :mod:`.background`'s.
"""

from __future__ import annotations

from aiohttp import web

from ...base.errors import InvalidRequest
from ...core.bodies import json_response, read_json
from ...core.exchange import Exchange
from ...core.prompt import estimate_tokens, sai_payload
from ...core.toolcache import TOOL_CACHES
from .. import openai
from . import background, compaction
from .parse import USED_FIELDS, parse
from .render import ResponsesRenderer
from .stored import continuation

__all__ = ["input_tokens", "responses"]


async def responses(request: web.Request) -> web.StreamResponse:
    """Answer an OpenAI Responses call from a SAI template execution."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    found = await continuation(request, body)
    whole = await compaction.expand(request, body, found.input)
    if compaction.triggered(whole):
        return await compaction.respond(request, body, whole)
    conversation, echo = parse(
        {**body, "input": whole} if found.state or whole is not found.input else body,
        request.app[TOOL_CACHES],
    )
    echo["previous_response_id"] = found.previous
    echo["conversation"] = {"id": found.conversation} if found.conversation else None
    openai.fields_ignored(body, USED_FIELDS, request.headers.get("OpenAI-Beta"))
    if body.get("background") is True:
        return await background.start(request, body, found, conversation, echo)
    exchange = Exchange(request, body, conversation, protocol="responses")
    del body  # the exchange lets it go once parsed; a long stream need not keep it
    kept = found if found.keeps else None
    renderer = ResponsesRenderer(exchange.ids, exchange.created, echo, kept)
    response = await exchange.respond(renderer)
    if renderer.completed is not None:  # not streamed: kept before the answer goes out
        await found.keep(renderer.completed)
    return response


async def input_tokens(request: web.Request) -> web.Response:
    """``POST /v1/responses/input_tokens``: the estimate of what SAI would be sent.

    The same count as the context check: the chain, the input, the
    instructions and the tool definitions, characters / 4.
    """
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    # Counting stores nothing.
    found = await continuation(request, {**body, "store": False})
    whole = await compaction.expand(request, body, found.input)  # a summary counts as sent
    caches = request.app[TOOL_CACHES]
    conversation, _ = parse({**body, "store": False, "input": whole}, caches)
    _, chars = sai_payload(conversation, 0, caches)
    tokens = estimate_tokens(chars)
    return json_response({"object": "response.input_tokens", "input_tokens": tokens})
