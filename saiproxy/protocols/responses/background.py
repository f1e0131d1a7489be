"""Background Responses: ``background: true``, its status from any replica, cancel, replay.

The replica that takes the request answers at once with the ``queued``
Response and calls SAI in a task of its own, detached from the client's
connection, through the same exchange as any request (the limits, logs and
errors apply; a limit's refusal ends the response ``failed``). Its status
(``queued``, ``in_progress``, then ``completed``, ``failed`` or
``cancelled``) is the stored record's, read by every replica.

While it runs, the replica renews a lease in the state store
(``BACKGROUND_LEASE`` seconds, renewed every third of it) and reads the
response's cancel flag, which ``POST /v1/responses/{id}/cancel`` sets on any
replica. A replica that dies or is drained stops renewing: whoever reads the
response next, once the lease has passed, ends it ``failed`` with an error
that says so. A drained replica lets them end within its shutdown budget,
like any answer in flight, then ends those left ``failed``.

Created with ``stream: true`` its events are stored as they are made: the
request streams them, and ``GET /v1/responses/{id}?stream=true`` replays them
from any replica (``starting_after``: a sequence number), following the
response until it ends. SAI's answer is taken whole (not streamed): its
events follow ``response.in_progress`` once SAI has answered.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from aiohttp import web

from ...base.errors import InvalidRequest, ProxyError, StateUnavailable, UpstreamError
from ...base.keys import SETTINGS
from ...base.log import protocols_logger as log
from ...core.bodies import json_response
from ...core.conversation import Answer, Conversation
from ...core.exchange import Exchange
from ...core.sse import COMMENT_PING
from ...state import owner_of
from ...state.store import STATE_STORE, State
from .common import Continuation, error_object, event, not_found
from .render import ResponsesRenderer

__all__ = [
    "CANCEL_CHECK",
    "DRAINED",
    "LOST",
    "POLL",
    "RUNNING",
    "TERMINAL",
    "BackgroundRenderer",
    "Running",
    "cancel",
    "replay",
    "settled",
    "start",
]

TERMINAL: Final = frozenset({"completed", "failed", "cancelled", "incomplete"})
POLL: Final = 0.1  # seconds between two reads of a followed response (stream, cancel)
CANCEL_CHECK: Final = 0.25  # seconds between two reads of the cancel flag by the owner
LOST: Final = (
    "The replica running this background response stopped before it ended (its lease "
    "expired); send the request again"
)
DRAINED: Final = "The replica running this background response shut down; send the request again"


class Running:
    """The background responses an application runs, referenced until they end.

    The event loop keeps only weak references to tasks; each application owns
    its own set, so two applications in one process share none.
    """

    __slots__ = ("tasks",)

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def add(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


RUNNING = web.AppKey("background_responses", Running)


def _frames(raw: bytes) -> list[str]:
    return [frame.decode() for frame in raw.split(b"\n\n") if frame.strip()]


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "type": "server_error", "param": None}


class BackgroundRenderer(ResponsesRenderer):
    """The Responses renderer, keeping the answer to render its events afterwards."""

    answer: Answer | None = None

    def body(self, answer: Answer) -> dict[str, Any]:
        self.answer = answer
        return super().body(answer)

    def events(self, answer: Answer) -> bytes:
        """Return the events after ``response.in_progress`` for the whole ``answer``."""
        frames = self.text(answer.text) if answer.text else b""
        if answer.calls:
            frames += self.calls(answer.calls)
        return frames + self.finish(Answer("", answer.model, answer.finish, usage=answer.usage))


async def start(
    request: web.Request,
    body: dict[str, Any],
    found: Continuation,
    conversation: Conversation,
    echo: dict[str, Any],
) -> web.StreamResponse:
    """Keep the ``queued`` Response, start its task, answer it (or follow its events)."""
    if found.state is None or not found.store:
        raise InvalidRequest("'background' requires 'store': true", param="background")
    state, owner = found.state, found.owner
    lease = request.app[SETTINGS].background_lease
    streamed = conversation.stream
    conversation.stream = False  # SAI's answer is taken whole; the events are stored
    exchange = Exchange(request, body, conversation, protocol="responses")
    renderer = BackgroundRenderer(
        exchange.ids, exchange.created, {**echo, "background": True}, found
    )
    queued = renderer.pending("queued", exchange.model)
    # The lease first: a reader never finds the response without one.
    await state.lease(owner, renderer.response_id, time.time() + lease)
    await state.keep(
        owner, queued, found.new_items, found.input_ids, found.context,
        store=True, conversation=None,
    )  # fmt: skip
    if streamed:
        await state.add_events(owner, renderer.response_id, _frames(renderer.head(exchange.model)))
    task = asyncio.create_task(_run(state, owner, exchange, renderer, found, streamed, lease))
    request.app[RUNNING].add(task)
    if streamed:
        return await _follow(request, state, owner, renderer.response_id, -1)
    return json_response(queued)


async def _watch(
    state: State,
    owner: str,
    response_id: str,
    lease: float,
    work: asyncio.Task[Any],
    asked: asyncio.Event,
) -> None:
    """Renew the lease and read the cancel flag until the work ends; cancel it when asked."""
    renewed = time.monotonic()
    while True:
        await asyncio.sleep(min(CANCEL_CHECK, lease / 3))
        try:
            if time.monotonic() - renewed >= lease / 3:
                await state.lease(owner, response_id, time.time() + lease)
                renewed = time.monotonic()
            if await state.cancel_asked(owner, response_id):
                asked.set()
                work.cancel()
                return
        except StateUnavailable:
            # Tried again at the next tick; past the lease, readers end the response.
            log.warning("a background response's lease could not be renewed")


async def _run(
    state: State,
    owner: str,
    exchange: Exchange,
    renderer: BackgroundRenderer,
    found: Continuation,
    streamed: bool,
    lease: float,
) -> None:
    """Call SAI for a background response and keep how it ended."""
    model = exchange.model
    work = asyncio.current_task()
    assert work is not None
    asked = asyncio.Event()  # the cancel flag was read
    watch = asyncio.create_task(_watch(state, owner, renderer.response_id, lease, work, asked))
    final: dict[str, Any]
    frames: list[str] = []
    try:
        final, frames = await _answered(state, owner, exchange, renderer, streamed)
    except asyncio.CancelledError:
        work.uncancel()  # taken back: how it ended is still to be kept
        if asked.is_set():
            final = renderer.pending("cancelled", model)
        else:
            final = renderer.pending("failed", model, error=_error("server_error", DRAINED))
    except UpstreamError as error:
        final = renderer.pending("failed", model, error=error_object(error))
    except ProxyError as error:
        final = renderer.pending(
            "failed", model, error=_error(error.code or "server_error", error.message)
        )
    except Exception:
        log.exception("a background response failed")
        final = renderer.pending("failed", model, error=_error("server_error", "Internal error"))
    finally:
        watch.cancel()
    await _keep_ending(state, owner, renderer, found, streamed, final, frames)


async def _answered(
    state: State, owner: str, exchange: Exchange, renderer: BackgroundRenderer, streamed: bool
) -> tuple[dict[str, Any], list[str]]:
    """Call SAI; return the Response to keep and, when streamed, the events of its answer."""
    model = exchange.model
    await state.restatus(owner, renderer.pending("in_progress", model))
    await exchange.respond(renderer)
    answer = renderer.answer
    if renderer.completed is None:
        # An error explained as text (ERROR_MODE=message) is still a failure here:
        # the status is what a background response's client reads.
        code = answer.outcome if answer is not None else "server_error"
        text = answer.text.strip() if answer is not None else "No answer"
        return renderer.pending("failed", model, error=_error(code, text)), []
    # SAI answered.
    frames = _frames(renderer.events(answer)) if streamed and answer is not None else []
    return renderer.completed, frames


async def _keep_ending(
    state: State,
    owner: str,
    renderer: BackgroundRenderer,
    found: Continuation,
    streamed: bool,
    final: dict[str, Any],
    frames: list[str],
) -> None:
    """Keep how a background response ended: its last events, then its status."""
    response_id = renderer.response_id
    try:
        if streamed and not frames and final["status"] == "failed":
            sequence = len(await state.events(owner, response_id))
            frames = _frames(event("response.failed", sequence, {"response": final}))
        if frames:  # before the status: a follower that reads it ended has every event
            await state.add_events(owner, response_id, frames)
        if final.get("status") == "completed" and renderer.completed is not None:
            await found.keep(final)
        else:
            await state.restatus(owner, final)
    except Exception:
        # The store is gone (a drain closed it): readers end it after the lease.
        log.warning("a background response's ending could not be kept", exc_info=True)


async def settled(state: State, owner: str, response: dict[str, Any]) -> dict[str, Any]:
    """Return ``response``, ended ``failed`` if it runs nowhere any more (its lease passed)."""
    if response.get("status") in TERMINAL or not response.get("background"):
        return response
    until = await state.lease_until(owner, response["id"])
    if until is not None and until > time.time():
        return response
    failed = {**response, "status": "failed", "error": _error("server_error", LOST)}
    events = await state.events(owner, response["id"])
    if events:
        last = event("response.failed", len(events), {"response": failed})
        await state.add_events(owner, response["id"], _frames(last))
    await state.restatus(owner, failed)
    log.warning("a background response lost its replica, ended failed",
                extra={"id": response["id"][:80]})  # fmt: skip
    return failed


async def _current(state: State, owner: str, response_id: str) -> dict[str, Any]:
    record = await state.response(owner, response_id)
    if record is None:
        raise not_found(response_id)
    return await settled(state, owner, record.response)


async def _follow(
    request: web.Request, state: State, owner: str, response_id: str, after: int
) -> web.StreamResponse:
    """Stream a background response's events after sequence number ``after`` until it ends."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                 "X-Accel-Buffering": "no"}
    )  # fmt: skip
    await response.prepare(request)
    interval = request.app[SETTINGS].ping_interval
    sent, written = after + 1, time.monotonic()
    while True:
        current = await _current(state, owner, response_id)  # the status first: see _run
        frames = await state.events(owner, response_id)
        if frames[sent:]:
            await response.write(b"".join(f.encode() + b"\n\n" for f in frames[sent:]))
            written = time.monotonic()
        elif time.monotonic() - written >= interval:  # a quiet stream is kept alive
            await response.write(COMMENT_PING)
            written = time.monotonic()
        sent = max(sent, len(frames))
        if current.get("status") in TERMINAL:
            break
        await asyncio.sleep(POLL)
    await response.write_eof()
    return response


async def replay(request: web.Request) -> web.StreamResponse:
    """``GET /v1/responses/{id}?stream=true&starting_after=N``: its events, then until it ends."""
    state, owner = request.app[STATE_STORE], owner_of(request)
    response_id = request.match_info["response_id"]
    try:
        after = int(request.query.get("starting_after", "-1"))
    except ValueError:
        raise InvalidRequest(
            "'starting_after' must be an integer", param="starting_after"
        ) from None
    current = await _current(state, owner, response_id)
    if not current.get("background") or not await state.events(owner, response_id):
        raise InvalidRequest(
            "Only a background response created with 'stream': true can be streamed again",
            param="stream",
        )
    return await _follow(request, state, owner, response_id, after)


async def cancel(request: web.Request) -> web.Response:
    """``POST /v1/responses/{id}/cancel``: stop a background response, on any replica."""
    state, owner = request.app[STATE_STORE], owner_of(request)
    response_id = request.match_info["response_id"]
    current = await _current(state, owner, response_id)
    if not current.get("background"):
        raise InvalidRequest("Only background responses can be cancelled", param="response_id")
    if current.get("status") not in TERMINAL:
        await state.ask_cancel(owner, response_id)
        # The owner reads the flag within CANCEL_CHECK; a lost owner within the lease.
        deadline = time.monotonic() + request.app[SETTINGS].background_lease + 1
        while current.get("status") not in TERMINAL and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
            current = await _current(state, owner, response_id)
    return json_response(current)
