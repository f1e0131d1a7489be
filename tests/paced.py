"""A fake SAI paced by events, not by the clock: for tests that assert an order.

conftest's FakeSai paces its replies with sleeps, so a check such as "the
client saw the first piece before SAI sent the last one" holds only on a
machine fast enough for the sleeps. Here a reply is a list of pieces and
gates: SAI sends the pieces up to a gate, then waits until the gate opens
(the test opens it, or it opens by itself once given events were noted).

Everything either side does is noted, in order, in ``events``:
``("arrived", user)``, ``("sent", user, piece)``, ``("ended", user)``,
``("aborted", user)`` (SAI broke off, at an ABORT), ``("cut", user)`` (the
proxy hung up first), ``("opened", gate)``, and whatever the test notes with
:meth:`PacedSai.note`. A gate still shut after ``LIMIT`` seconds opens by
itself and notes ``("gave up", name)``: a proxy that never lets the expected
order happen fails the test's assertions instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict

from saiproxy.upstream.fake_sai import EXECUTE_PATH, Received

from .conftest import on_loopback

LIMIT = 20.0  # seconds a gate waits before it gives up (only a failing proxy makes it wait)

Event = tuple[str, ...]


class Gate:
    """A point in a reply that SAI does not pass until the gate opens."""

    def __init__(self, sai: PacedSai, name: str, after: Iterable[Event]) -> None:
        self.name = name
        self.after = tuple(after)
        self._sai = sai
        self._open = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def open(self) -> None:
        """Let every reply waiting here go on."""
        if not self._open.is_set():
            self._sai.note("opened", self.name)
            self._open.set()

    async def wait(self) -> None:
        try:
            await asyncio.wait_for(self._open.wait(), LIMIT)
        except TimeoutError:
            self._sai.note("gave up", self.name)
            self._open.set()


ABORT = object()  # in a reply: drop the connection there, as SAI breaking off


@dataclass
class Paced:
    """What SAI answers to one call: pieces, gates, and ABORT, in order."""

    items: tuple[str | Gate | object, ...]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class PacedSai:
    """SAI's template API on a loopback port, answering as the test paces it."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.received: list[Received] = []
        self.url = ""
        self.default = Paced(("Hello from SAI",))  # for every call no route claims
        self._routes: dict[str, deque[Paced]] = {}
        self._pending: list[Gate] = []  # gates that open once their events are noted
        self._noted = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post(EXECUTE_PATH, self._execute)

    def route(
        self,
        user: str,
        *items: str | Gate | object,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next call whose user text is ``user`` with ``items``."""
        self._routes.setdefault(user, deque()).append(Paced(items, status, headers or {}))

    def gate(self, name: str, *, after: Iterable[Event] = ()) -> Gate:
        """Return a shut gate; with ``after``, it opens once all those events are noted."""
        gate = Gate(self, name, after)
        if gate.after:
            self._pending.append(gate)
            self._check_pending()
        return gate

    def note(self, *event: str) -> None:
        """Note an event (SAI's own, or the test's) in the one ordered list."""
        self.events.append(event)
        self._check_pending()
        self._noted.set()

    def index(self, *event: str) -> int:
        """Return where ``event`` was first noted (ValueError: never)."""
        return self.events.index(event)

    def count(self, kind: str) -> int:
        """Return how many events of this kind (``"cut"``, ``"ended"``...) were noted."""
        return sum(1 for event in self.events if event[0] == kind)

    async def seen(self, *event: str) -> None:
        """Wait until ``event`` is noted (TimeoutError after LIMIT seconds)."""
        async with asyncio.timeout(LIMIT):
            while event not in self.events:
                self._noted.clear()
                await self._noted.wait()

    async def settled(self) -> None:
        """Wait until every call that arrived has ended, aborted or been cut."""
        async with asyncio.timeout(LIMIT):
            while self.count("arrived") > sum(map(self.count, ("ended", "cut", "aborted"))):
                self._noted.clear()
                await self._noted.wait()

    def _check_pending(self) -> None:
        for gate in list(self._pending):
            if all(event in self.events for event in gate.after):
                self._pending.remove(gate)
                gate.open()

    async def _execute(self, request: web.Request) -> web.StreamResponse:
        call = Received(
            request.path,
            dict(request.query),
            CIMultiDict(request.headers),
            orjson.loads(await request.read()),
        )
        self.received.append(call)
        user = call.user
        self.note("arrived", user)
        routed = self._routes.get(user)
        reply = routed.popleft() if routed else self.default
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        if hdrs.CONTENT_TYPE not in response.headers:
            response.content_type = "text/plain"
        response.enable_chunked_encoding()
        try:
            for item in reply.items:
                if isinstance(item, Gate):
                    await item.wait()
                    continue
                if not response.prepared:
                    await response.prepare(request)
                if item is ABORT:
                    assert request.transport is not None
                    request.transport.abort()
                    self.note("aborted", user)
                    return response
                assert isinstance(item, str)
                await response.write(item.encode())
                self.note("sent", user, item)
            if not response.prepared:
                await response.prepare(request)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.note("cut", user)
            raise
        self.note("ended", user)
        return response


@contextlib.asynccontextmanager
async def paced_sai() -> AsyncIterator[PacedSai]:
    """Serve a PacedSai on a loopback port for the ``async with`` block."""
    sai = PacedSai()
    async with on_loopback(sai.app) as sai.url:
        yield sai
