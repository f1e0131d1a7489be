"""A fake SAI for the limits' multi-replica checks: answers by the user's text, and counts.

``python -m bench.limits_sai --port N``. The user text chooses the answer:
``stream:<seconds>`` drips ten pieces over that long; ``tokens:<prompt>:<completion>``
reports those token counts; anything else answers at once. Each text's last word is
its tag: ``GET /stats`` returns, per tag, the calls
received, the calls open now and the most open at once, and ``POST /stats/reset``
clears them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from saiproxy.upstream.fake_sai import FakeSai, Received, Reply


class Stats:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.open: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    def reset(self) -> None:
        self.calls.clear()
        self.open.clear()
        self.peak.clear()


def answer(call: Received) -> Reply:
    text = call.user
    if text.startswith("stream:"):
        seconds = float(text.split(":")[1].split()[0])
        return Reply(
            body=[f"piece {i} " for i in range(10)],
            headers={"prompttokens": "5", "completiontokens": "20"},
            chunk_delay=seconds / 10,
        )
    if text.startswith("tokens:"):
        _, prompt, completion = text.split()[0].split(":")
        return Reply(body="ok", headers={"prompttokens": prompt, "completiontokens": completion})
    return Reply(body="ok", headers={"prompttokens": "5", "completiontokens": "5"})


def make_app() -> web.Application:
    fake = FakeSai(answer=answer, record=False)
    stats = Stats()

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/stats"):
            return await handler(request)
        body = orjson.loads(await request.read())
        user = str(body.get("inputs", {}).get("user", ""))
        tag = user.split()[-1] if user.strip() else "-"
        stats.calls[tag] += 1
        stats.open[tag] += 1
        stats.peak[tag] = max(stats.peak[tag], stats.open[tag])
        try:
            return await handler(request)
        finally:
            stats.open[tag] -= 1

    async def read(request: web.Request) -> web.Response:
        return web.json_response(
            {"calls": dict(stats.calls), "open": dict(stats.open), "peak": dict(stats.peak)}
        )

    async def reset(request: web.Request) -> web.Response:
        stats.reset()
        return web.json_response({})

    # The fake reads the body too: aiohttp keeps it once read.
    fake.record = True
    fake.app.middlewares.append(count)
    fake.app.router.add_get("/stats", read)
    fake.app.router.add_post("/stats/reset", reset)
    fake.received = _Forgetful()
    return fake.app


class _Forgetful(list[Received]):
    """Received calls are not kept: the load is long."""

    def append(self, item: Received) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    print(f"limits fake SAI on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None,
                backlog=4096)  # fmt: skip


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
