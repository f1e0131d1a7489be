"""The floor: the least an aiohttp proxy can do, to compare saiproxy with.

    python -m bench.floor --port 9001 --upstream http://127.0.0.1:9000/api/templates/bench/execute

One handler: read the client's JSON, post a SAI payload through one pooled
ClientSession, answer a minimal chat completion; streamed, relay each piece
of SAI's body as one frame the moment it arrives. No logging, metrics,
credentials, validation or error handling. The same stack as saiproxy
(aiohttp server and client, orjson, uvloop when installed, the same
garbage-collector thresholds, accept queue and socket options), so the gap
between this and direct calls is what the stack itself costs on the
machine, and the gap between saiproxy and this is what saiproxy's own work
costs.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
import orjson
from aiohttp import web

from saiproxy.web.server import tune_garbage_collector

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    messages = body["messages"]
    payload = {"inputs": {"system": messages[0]["content"], "user": messages[-1]["content"]}}
    if body.get("stream"):
        return await relay(request, payload)
    async with request.app[SESSION].post(
        request.app[UPSTREAM],
        data=orjson.dumps(payload),
        headers={"Content-Type": "application/json"},
    ) as upstream:
        text = (await upstream.read()).decode()
    answer = {
        "id": "chatcmpl-floor",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
    }  # fmt: skip
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


_HEAD = b'data: {"choices":[{"index":0,"delta":{"content":'
_TAIL = b"}}]}\n\n"
_END = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'


async def relay(request: web.Request, payload: Mapping[str, object]) -> web.StreamResponse:
    """The bare streaming relay: read a piece, write a frame, nothing else."""
    async with request.app[SESSION].post(
        request.app[UPSTREAM], data=orjson.dumps(payload),
        headers={"Content-Type": "application/json"},
    ) as upstream:  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        read = upstream.content.readany
        while chunk := await read():
            await response.write(_HEAD + orjson.dumps(chunk.decode()) + _TAIL)
        await response.write(_END)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    tune_garbage_collector()
    # The listener and connection settings saiproxy uses (a deep accept queue, no SO_KEEPALIVE).
    web.run_app(
        app, host="127.0.0.1", port=args.port, access_log=None, print=None,
        loop=loop_factory(), backlog=4096, tcp_keepalive=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
