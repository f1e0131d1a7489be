"""A scriptable fake SAI: an aiohttp app speaking SAI's template API on a real port.

One fake serves three uses: ``saiproxy --demo`` (see :mod:`saiproxy.demo`
and docs/demo.md), the tests (``tests/conftest.py``) and the benchmark
(``bench/fake_sai.py``). What it answers to a call, first match wins:

1. a reply routed to the call's user text (:meth:`FakeSai.route`);
2. the next scripted reply (:meth:`FakeSai.script`);
3. the ``answer`` function given at construction, if it returns a reply;
4. ``default``.

Every call is recorded in ``received`` unless ``record`` is off (load
tests: the list would only grow).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict

__all__ = [
    "EXECUTE_PATH",
    "Answer",
    "FakeSai",
    "Received",
    "Reply",
]

EXECUTE_PATH = "/api/templates/{template}/execute"


@dataclass
class Reply:
    """What the fake SAI answers to one call."""

    status: int = 200
    body: str | bytes | list[str | bytes] = "Hello from SAI"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before the status line
    chunk_delay: float = 0.0  # between body pieces
    reset_after: int | None = None  # abort the connection after this many pieces


@dataclass
class Received:
    """What the fake SAI received in one call."""

    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    json: Any

    @property
    def auth(self) -> tuple[str, str | None]:
        """Return the credential header it carried: ('X-Api-Key'|'Cookie', value)."""
        if "X-Api-Key" in self.headers:
            return "X-Api-Key", self.headers["X-Api-Key"]
        return "Cookie", self.headers.get(hdrs.COOKIE)

    @property
    def user(self) -> str:
        """Return the call's ``inputs.user`` text ("" when absent)."""
        inputs = self.json.get("inputs") if isinstance(self.json, dict) else None
        user = inputs.get("user") if isinstance(inputs, dict) else None
        return user if isinstance(user, str) else ""


Answer = Callable[[Received], "Reply | None"]


class FakeSai:
    """A scriptable SAI: queue replies, route them by user text, then inspect what arrived."""

    def __init__(
        self,
        *,
        default: Reply | None = None,
        answer: Answer | None = None,
        record: bool = True,
    ) -> None:
        self.replies: deque[Reply] = deque()
        self.routes: dict[str, deque[Reply]] = {}
        self.default = default or Reply()
        self.answer = answer
        self.record = record
        self.received: list[Received] = []
        self.open_responses = 0
        self.disconnects = 0
        self.url = ""
        self.app = web.Application()
        self.app.router.add_post(EXECUTE_PATH, self._execute)
        self._runner: web.AppRunner | None = None

    def script(self, *replies: Reply) -> None:
        """Answer the next calls with these replies, in order (then the default)."""
        self.replies.extend(replies)

    def route(self, user: str, *replies: Reply) -> None:
        """Answer calls whose user text is ``user`` with these replies, in order."""
        self.routes.setdefault(user, deque()).extend(replies)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: a free port); return and remember the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, backlog=4096).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _next_reply(self, call: Received) -> Reply:
        routed = self.routes.get(call.user) if self.routes else None
        if routed:
            return routed.popleft()
        if self.replies:
            return self.replies.popleft()
        if self.answer is not None:
            answered = self.answer(call)
            if answered is not None:
                return answered
        return self.default

    async def _execute(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if not (self.record or self.routes or self.replies or self.answer):
            return await self._send(request, self.default, whole=True)  # load: nothing to look at
        call = Received(
            request.path, dict(request.query), CIMultiDict(request.headers), orjson.loads(raw)
        )
        if self.record:
            self.received.append(call)
        return await self._send(request, self._next_reply(call))

    async def _send(
        self, request: web.Request, reply: Reply, *, whole: bool = False
    ) -> web.StreamResponse:
        """Send ``reply``; ``whole``: a one-piece body goes with a Content-Length (cheaper)."""
        self.open_responses += 1
        try:
            if reply.delay:
                await asyncio.sleep(reply.delay)
            pieces = reply.body if isinstance(reply.body, list) else [reply.body]
            if whole and len(pieces) == 1 and reply.reset_after is None:
                body = pieces[0]
                return web.Response(
                    status=reply.status,
                    body=body.encode() if isinstance(body, str) else body,
                    headers={hdrs.CONTENT_TYPE: "text/plain; charset=utf-8", **reply.headers},
                )
            response = web.StreamResponse(status=reply.status, headers=reply.headers)
            if hdrs.CONTENT_TYPE not in response.headers:
                response.content_type = "text/plain"
            response.enable_chunked_encoding()
            await response.prepare(request)
            for index, piece in enumerate(pieces):
                if index and reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
                if reply.reset_after is not None and index == reply.reset_after:
                    # In place of the next piece, after the same pause: what
                    # came before has reached the proxy as its own piece.
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await response.write(piece.encode() if isinstance(piece, str) else piece)
            await response.write_eof()
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        finally:
            self.open_responses -= 1
