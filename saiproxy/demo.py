"""An embedded fake SAI for ``saiproxy --demo``: try the proxy with no credentials."""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

DEMO_KEY: Final = "demo-key"
DEMO_TEMPLATE: Final = "demo-template"
WORD_DELAY: Final = 0.05


async def execute(request: web.Request) -> web.StreamResponse:
    """Answer like SAI: plain text, dripped word by word, token headers."""
    if request.headers.get("X-Api-Key") != DEMO_KEY and "Cookie" not in request.headers:
        return web.Response(status=401, text="invalid api key")
    body = await request.json()
    user = str(body.get("inputs", {}).get("user", ""))
    history = len(body.get("chatMessages", []))
    answer = (
        f"Hello from the saiproxy demo upstream! You said: {user!r} "
        f"({history} message(s) in the history, template "
        f"{request.match_info['template_id']})."
    )
    words = answer.split(" ")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/plain; charset=utf-8",
            "prompttokens": str(max(1, len(user) // 4)),
            "completiontokens": str(len(words)),
            "model": request.query.get("modelOverride", "sai-demo"),
        }
    )
    await response.prepare(request)
    for index, word in enumerate(words):
        await response.write((word if index == 0 else " " + word).encode())
        await asyncio.sleep(WORD_DELAY)
    await response.write_eof()
    return response


def create_demo_app() -> web.Application:
    """Return the fake SAI application."""
    app = web.Application()
    app.router.add_post("/api/templates/{template_id}/execute", execute)
    return app


async def start_demo_upstream() -> tuple[web.AppRunner, str]:
    """Start the fake SAI on a free loopback port; return its runner and URL."""
    runner = web.AppRunner(create_demo_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"
