"""One client request through SAI, whatever its protocol: the core every adapter shares.

An adapter parses its body into a :class:`Conversation`, opens an
:class:`Exchange` and hands it a :class:`~saiproxy.core.render.Renderer`.
The exchange picks the credential, checks the context size, calls SAI (with
the client's retries and fallback), turns SAI's text into prose, tool calls
and finish reasons, and decides in one place what an upstream failure
becomes (:meth:`Exchange.policy`): a real HTTP status, an in-band error, or an
explanation the user reads. It logs and counts every request the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Literal, TypeVar

import orjson
from aiohttp import web

from ..auth import Credential
from ..errors import (
    BodyTimeout,
    BodyTooLarge,
    ContextTooLong,
    InvalidRequest,
    ModelNotFound,
    ShutdownCut,
    UpstreamError,
)
from ..keys import AUTH_CHAIN, KEEP_ALIVE, METRICS, OUTCOME, REQUEST_ID, SAI, SETTINGS, STATE
from ..limits import gate
from ..logs import RESPONSE_FINISHED, event
from ..sai import SaiCall, SaiClient, SaiStream
from ..settings import ModelConfig, Settings
from .answer import AnswerFilter, Rejected, check_json
from .conversation import Answer, Conversation, Finish, Turn, Usage
from .prompt import estimate_tokens, header_tokens, sai_payload
from .render import Choices, Renderer
from .sse import EventStream

log = logging.getLogger("saiproxy.exchange")

ERROR_HEADER: Final = "X-Saiproxy-Error"
EAGER_GRACE: Final = 0.05  # seconds an eager stream waits for SAI before it opens anyway
Policy = Literal["raise", "in_band", "explain"]
_T = TypeVar("_T")

_SUFFIXES = itertools.count(secrets.randbits(40))


def unique_suffix() -> str:
    """Return a process-unique suffix: a random start, counted up (no entropy per call)."""
    return f"{next(_SUFFIXES) & 0xFFFFFFFFFFFF:012x}"


# A body this large is parsed in a thread, one at a time. orjson holds the GIL,
# but in a thread the loop still gets turns: 8 MiB of 300,000 tiny messages
# stalled the loop 375 ms inline and 156 ms in a thread (and holds ~190 MB
# while parsed, so one at a time also bounds memory).
LARGE_BODY: Final = 256 * 1024


async def read_json(request: web.Request) -> Any:
    """Return the request body parsed as JSON; 413 over MAX_BODY_BYTES, 400 if not JSON.

    aiohttp reads a body only when asked, with no timer of its own: a client
    sending a few bytes now and then would hold the request (and its
    connection) forever. The whole body must arrive within BODY_READ_TIMEOUT,
    or the answer is a 408 and the connection is closed.
    """
    settings = request.app[SETTINGS]
    try:
        if request.content.is_eof():
            raw = await request.read()  # all here already (the usual case): no timer to set
        else:
            async with asyncio.timeout(settings.body_read_timeout):
                raw = await request.read()
    except TimeoutError:
        log.info("request body too slow", extra={"timeout_s": settings.body_read_timeout})
        raise BodyTimeout(
            f"The request body did not arrive within {settings.body_read_timeout:g} s "
            "(BODY_READ_TIMEOUT)"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(
            f"The request body is larger than the limit of {settings.max_body_bytes} bytes "
            "(MAX_BODY_BYTES)"
        ) from None
    try:
        if len(raw) < LARGE_BODY:
            return orjson.loads(raw)
        async with request.app[STATE].large_bodies:
            # In a thread the parse yields the GIL every switch interval, so the
            # loop keeps serving the other requests meanwhile.
            return await asyncio.to_thread(orjson.loads, raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """Return a JSON response."""
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


class Exchange:
    """One request in flight: what was asked, what SAI is doing, how it ended."""

    # Slots: ten thousand open streams each hold one (a dict would cost ~1 KB more).
    __slots__ = (
        "_body", "call", "chars", "choice", "conversation", "created", "early",
        "finish_reason", "first_byte", "loop", "max_output", "model", "model_config", "outcome",
        "protocol",
        "request", "request_id", "settings", "started", "status", "suffix", "tool_calls",
        "usage",
    )  # fmt: skip

    def __init__(
        self,
        request: web.Request,
        body: Any,
        conversation: Conversation,
        *,
        protocol: str,
    ) -> None:
        self.request = request
        self.settings: Settings = request.app[SETTINGS]
        # Looked up once: on Python 3.11 every lookup is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.conversation = conversation
        self.protocol = protocol
        self.started = time.monotonic()
        self.created = int(time.time())
        self.request_id = request[REQUEST_ID]
        self.suffix = unique_suffix()
        self.model_config = self._model(conversation.model)
        # SAI's model header names the model; without it, the name the client asked for.
        self.model = conversation.model or self.model_config.name
        self._body = body
        self.call: SaiCall | None = None
        self.early: UpstreamError | None = None  # an outcome known without calling SAI
        self.chars = 0
        self.status = 200
        self.outcome = "ok"
        self.finish_reason: str | None = None
        self.first_byte: float | None = None
        self.usage = Usage()
        self.tool_calls = 0
        self.choice: int | None = None  # its index when one of several (respond_all)
        self.max_output: int | None = None  # the answer's token bound the client asked for

    @property
    def sai(self) -> SaiClient:
        return self.request.app[SAI]

    @property
    def ids(self) -> str:
        """Return the part every ID of this answer shares: request ID and a unique suffix."""
        return f"{self.request_id}-{self.suffix}"

    def _model(self, name: str | None) -> ModelConfig:
        model = self.settings.model_for(name)
        if model is None:
            raise ModelNotFound(
                f"The model {name!r} does not exist; see GET /v1/models", param="model"
            )
        return model

    # --- the request's life

    async def respond(self, renderer: Renderer) -> web.StreamResponse:
        """Answer the request with ``renderer``'s shapes, streamed or not."""
        with _Answering(self.request, (self,)):
            try:
                self._begin()
                await gate.admit(self.request, (self,))  # the limits, once, before SAI
                if self.conversation.stream:
                    return await self._stream(renderer)
                return await self._complete(renderer)
            except BaseException as exc:
                self._note(exc)
                raise

    def _begin(self) -> None:
        """Prepare the call and log the request as received, whatever happens."""
        credential: dict[str, Any] = {"credential": None}
        try:
            credential = self._prepare()
        finally:
            self._log_received(credential)
        self.max_output = gate.requested_output(self._body)
        self._body = None  # parsed already; a long stream need not keep the raw JSON

    def _note(self, exc: BaseException) -> None:
        """Note how an exception ended this exchange, for its finish line."""
        if isinstance(exc, asyncio.CancelledError):
            self.outcome, self.status = "client_disconnected", 499
        elif isinstance(exc, Exception):
            self.outcome = getattr(exc, "code", None) or type(exc).__name__
            self.status = getattr(exc, "status", 500)

    def _prepare(self) -> dict[str, Any]:
        """Decide the early outcome, or the credential and the SAI call; return credential facts."""
        payload, self.chars = sai_payload(self.conversation, int(time.time() * 1000))
        estimated = estimate_tokens(self.chars)
        if estimated > self.settings.max_context_tokens:
            self.early = ContextTooLong(estimated, self.settings.max_context_tokens)
            return {}
        credential = self.request.app[AUTH_CHAIN].select(self.request, self._body)
        self.call = self._new_call(payload, credential)
        return credential.describe()

    def _new_call(self, payload: dict[str, Any], credential: Credential) -> SaiCall:
        # orjson's result keeps a 4 KB buffer whatever the length; the payload lives as
        # long as the call (retries need it), so it is kept as an exact-size copy.
        body = bytes(memoryview(orjson.dumps(payload)))
        return self.sai.new_call(self.model_config, body, credential, self.request_id)

    def policy(self, error: UpstreamError, *, prepared: bool) -> Policy:
        """Decide what an upstream failure becomes: the one place ERROR_MODE is read.

        ``http`` mode: a real status while nothing was sent, else an in-band
        error in the protocol's shape. ``message`` mode: the explanation as the
        answer's text, with a finish reason every client accepts.
        """
        self.outcome = error.code or "error"
        if self.settings.error_mode == "http":
            return "in_band" if prepared else "raise"
        return "explain"

    def explained(self, error: UpstreamError, *, relayed: bool) -> Answer:
        """Return the answer that explains ``error`` (``message`` mode).

        After part of the answer went out, it is marked truncated (``length``),
        never a clean stop.
        """
        text = error.chat_text()
        finish: Finish = "length" if relayed else error.finish_reason
        self.finish_reason = finish
        return Answer("\n\n" + text if relayed else text, self.model, finish, outcome=self.outcome)

    # --- non-streamed

    async def _complete(self, renderer: Renderer) -> web.Response:
        answer = await self._settled()
        headers = {ERROR_HEADER: answer.outcome} if answer.outcome != "ok" else None
        return json_response(renderer.body(answer), headers=headers)

    async def _settled(self) -> Answer:
        """Return the answer, or its failure explained (``message`` mode); raise for a status."""
        try:
            try:
                return await self._answer()
            except asyncio.CancelledError:
                raise self._cut_short() from None
        except UpstreamError as error:
            if self.policy(error, prepared=False) == "raise":
                raise
            return self.explained(error, relayed=False)

    async def _answer(self) -> Answer:
        conversation = self.conversation
        fetched = await self.sai.fetch(self._known_call())
        self.first_byte = fetched.opened_at
        self.model = fetched.headers.get("model") or self.model
        self._count(fetched.headers, len(fetched.text))
        text = fetched.text
        output = conversation.output
        if output is not None and (problem := check_json(text, output)) is not None:
            text = await self._repair(text, problem)
        answer_filter = AnswerFilter(conversation, self._rejected)
        prose = answer_filter.feed(text) + answer_filter.close()
        return self._answered(answer_filter, prose)

    async def _repair(self, text: str, problem: str) -> str:
        """Ask SAI once more for JSON that parses and follows the schema (TOOL_REPAIR_RETRIES)."""
        output = self.conversation.output
        assert output is not None and self.call is not None
        for attempt in range(self.settings.tool_repair_retries):
            log.info(
                "structured output invalid, asking again",
                extra={"problem": problem[:200], "repair": attempt + 1},
            )
            retry = Conversation(
                [
                    *self.conversation.turns,
                    Turn("assistant", text),
                    Turn(
                        "user",
                        f"Your answer could not be used: {problem}. Answer again with only "
                        "the JSON object, no prose and no code fence.",
                    ),
                ],
                system=self.conversation.system,
                output=output,
            )
            payload, chars = sai_payload(retry, int(time.time() * 1000))
            fetched = await self.sai.fetch(self._new_call(payload, self.call.credential))
            text = fetched.text
            self._count(fetched.headers, len(text), prompt_chars=chars)
            problem_again = check_json(text, output)
            if problem_again is None:
                return text
            problem = problem_again
        log.warning(
            "structured output still invalid, answered as is", extra={"problem": problem[:200]}
        )
        return text

    # --- streamed

    async def _stream(self, renderer: Renderer) -> web.StreamResponse:
        state = self.request.app[STATE]
        response = EventStream(renderer.ping())
        stream = _Stream(self, renderer, response)
        state.open_streams += 1
        try:
            with contextlib.suppress(_StreamEnded):
                # A task of its own: every piece then resumes the few frames of
                # the relay, not also the dozen of aiohttp's handler and the
                # middlewares above it (a cancellation still reaches it).
                await self.loop.create_task(stream.run())
            await response.write_eof()
            return response
        except asyncio.CancelledError:
            cut = self._cut_short()
            with contextlib.suppress(_StreamEnded):
                await stream.failed(cut, relayed=stream.relayed)
            await response.write_eof()
            return response
        finally:
            state.open_streams -= 1
            self.request.app[KEEP_ALIVE].discard(response)

    # --- shared

    def _cut_short(self) -> ShutdownCut:
        """Take back shutdown's cancellation of this task and return the error it means.

        A cancellation from anywhere else (the client hung up) propagates.
        """
        task = asyncio.current_task(self.loop)
        if not self.request.app[STATE].cutting or task is None:
            raise asyncio.CancelledError
        task.uncancel()
        log.warning("answer cut by shutdown", extra={"timeout_s": self.settings.shutdown_timeout})
        return ShutdownCut()

    def _known_call(self) -> SaiCall:
        if self.early is not None:
            raise self.early
        assert self.call is not None
        return self.call

    def _count(
        self, headers: Any, completion_chars: int, *, prompt_chars: int | None = None
    ) -> None:
        """Add one SAI answer's tokens: its headers, else estimates from the characters."""
        prompt_chars = self.chars if prompt_chars is None else prompt_chars
        self.usage.prompt_tokens += header_tokens(headers, "prompttokens", prompt_chars)
        self.usage.completion_tokens += header_tokens(headers, "completiontokens", completion_chars)

    def _answered(self, answer_filter: AnswerFilter, text: str) -> Answer:
        """Return the finished answer and note its finish reason."""
        calls = answer_filter.calls
        finish: Finish
        if answer_filter.stop_sequence is not None:
            finish = "stop_sequence"
        elif calls:
            finish = "tool_calls"
        else:
            finish = "stop"
        self.finish_reason = finish
        self.tool_calls = len(calls)
        return Answer(text, self.model, finish, calls, answer_filter.stop_sequence, self.usage)

    def _rejected(self, rejected: Rejected) -> None:
        metrics = self.request.app[METRICS]
        metrics.child(metrics.tool_calls_unrecognised, rejected.reason).inc()
        log.warning(
            "tool call not recognised, left as text",
            extra={"reason": rejected.reason, "detail": rejected.detail[:300]},
        )

    def _choice_field(self) -> dict[str, int]:
        return {"choice": self.choice} if self.choice is not None else {}

    def _log_received(self, credential: dict[str, Any]) -> None:
        """Log the request as received, with the credential decision."""
        conversation = self.conversation
        event(
            log,
            "request received",
            {
                "path": self.request.path,
                "protocol": self.protocol,
                "stream": conversation.stream,
                "model": self.model_config.name,
                "requested_model": conversation.model,
                "messages": len(conversation.turns),
                "roles": conversation.role_counts(),
                "chars": self.chars,
                "estimated_tokens": estimate_tokens(self.chars),
                "unwrapped": conversation.unwrapped,
                "tools": len(conversation.offered_tools),
                **credential,
                **self._choice_field(),
            },
        )
        if conversation.unwrapped:
            log.info(
                "IDE plugin wrapper removed",
                extra={
                    "count": conversation.unwrapped,
                    "chars_before": conversation.unwrapped_chars_before,
                    "chars_after": conversation.unwrapped_chars_after,
                },
            )
        if isinstance(self.early, ContextTooLong):
            log.info(
                "context too long, not calling SAI",
                extra={"estimated_tokens": estimate_tokens(self.chars),
                       "limit": self.settings.max_context_tokens},
            )  # fmt: skip
        if self.settings.verbose_logging:
            log.debug(
                "message previews",
                extra={"previews": [f"{t.role}: {t.text[:80]}" for t in conversation.turns]},
            )
            if self.call is not None:
                log.debug("SAI payload built", extra={"payload_bytes": len(self.call.payload)})

    def _finish(self) -> None:
        """Log the finish line and record the latency figures."""
        now = time.monotonic()
        latency = now - self.started
        generating = now - self.first_byte if self.first_byte is not None else 0.0
        metrics = self.request.app[METRICS]
        stream = "true" if self.conversation.stream else "false"
        metrics.child(metrics.latency, stream).observe(latency)
        if self.first_byte is not None:
            metrics.child(metrics.ttfb, stream).observe(self.first_byte - self.started)
        usage = self.usage
        event(
            log,
            RESPONSE_FINISHED,
            {
                "path": self.request.path,
                "status": self.status,
                "outcome": self.outcome,
                "finish_reason": self.finish_reason,
                "tool_calls": self.tool_calls,
                "latency_ms": round(latency * 1000, 1),
                "ttfb_ms": round((self.first_byte - self.started) * 1000, 1)
                if self.first_byte is not None
                else None,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
                "tokens_per_second": round(usage.completion_tokens / generating, 1)
                if generating > 0
                else None,
                "model": self.model,
                **(self.call.summary() if self.call is not None else {}),
                **self._choice_field(),
            },
        )


async def respond_all(exchanges: Sequence[Exchange], choices: Choices) -> web.StreamResponse:
    """Answer one request from several conversations at once: one choice each, in one response.

    Each exchange makes its own SAI call (concurrently), with its own credential
    decision, log lines (same request ID, ``choice`` = its index) and error
    policy; streamed, their frames interleave in one stream with one
    terminator. A failure that must be a real HTTP status, or an in-band error
    that ends the stream, stops the other choices.
    """
    first = exchanges[0]
    request, state = first.request, first.request.app[STATE]
    for index, exchange in enumerate(exchanges):
        exchange.choice = index
    # Shutdown waits for it within its budget (a cut past it closes the connection).
    with _Answering(request, exchanges):
        try:
            for exchange in exchanges:
                exchange._begin()
            await gate.admit(request, exchanges)  # the limits, once, before SAI
        except BaseException as exc:
            for exchange in exchanges:  # e.g. no credential: the request ends for every choice
                exchange._note(exc)
            raise
        if not first.conversation.stream:
            answers = await _together(exchanges, lambda _, exchange: exchange._settled())
            failed = next((answer.outcome for answer in answers if answer.outcome != "ok"), None)
            headers = {ERROR_HEADER: failed} if failed is not None else None
            return json_response(choices.body(answers), headers=headers)
        response = EventStream(choices.choice(0).ping())
        streams = [
            _Stream(exchange, choices.choice(index), response)
            for index, exchange in enumerate(exchanges)
        ]
        state.open_streams += 1
        try:
            try:
                await _together(
                    exchanges, lambda index, _: streams[index].run(keep_alive=index == 0)
                )
            except _StreamEnded:
                pass
            except asyncio.CancelledError:
                await _cut_together(first, streams, choices, response)
            else:
                await response.write(choices.finish([s.answer for s in streams if s.answer]))
            await response.write_eof()
            return response
        finally:
            state.open_streams -= 1
            request.app[KEEP_ALIVE].discard(response)


async def _cut_together(
    first: Exchange, streams: Sequence[_Stream], choices: Choices, response: EventStream
) -> None:
    """End the choices of a stream that shutdown cut, as a single stream ends.

    A cancellation that is not shutdown's (the client hung up) propagates.
    Each unfinished choice gets its ending (``message`` mode: the explanation
    and a truncated finish); an in-band error ends them all at once. With
    nothing sent yet, the cut is a real status.
    """
    cut = first._cut_short()
    unfinished = [stream for stream in streams if stream.answer is None]
    for stream in unfinished:
        stream.exchange.outcome, stream.exchange.status = cut.code or "error", 200
    try:
        for stream in unfinished:
            await stream.failed(cut, relayed=stream.relayed)
    except _StreamEnded:
        return
    except UpstreamError as error:
        for stream in unfinished:
            stream.exchange._note(error)
        raise
    await response.write(choices.finish([s.answer for s in streams if s.answer]))


class _Answering:
    """A request being answered: counted in flight, known to shutdown, logged when done."""

    __slots__ = ("_exchanges", "_request", "_state", "_task")

    def __init__(self, request: web.Request, exchanges: Sequence[Exchange]) -> None:
        self._request = request
        self._state = request.app[STATE]
        self._exchanges = exchanges
        self._task = asyncio.current_task(exchanges[0].loop)

    def __enter__(self) -> None:
        self._state.in_flight += 1
        if self._task is not None:
            self._state.answering.add(self._task)

    def __exit__(self, *exc_info: object) -> None:
        exchanges = self._exchanges
        gate.settle(self._request, exchanges)  # however it ended: tokens corrected, lease ended
        self._request[OUTCOME] = next((e.outcome for e in exchanges if e.outcome != "ok"), "ok")
        self._state.in_flight -= 1
        if self._task is not None:
            self._state.answering.discard(self._task)
        # The finish lines and the latency figures are recorded once the answer
        # is on its way: here they would sit between SAI's answer and the client.
        loop = exchanges[0].loop
        for exchange in exchanges:
            loop.call_soon(exchange._finish)


async def _settled(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], within: float | None
) -> None:
    """Wait until ``future`` is done or ``within`` seconds have passed, whichever is first.

    ``asyncio.wait({future}, timeout=within)`` with the loop at hand (see
    :attr:`Exchange.loop`); the future is never cancelled.
    """
    if future.done():
        return
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(within, wake) if within is not None else None
    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        future.remove_done_callback(wake)


async def _together(
    exchanges: Sequence[Exchange], work: Callable[[int, Exchange], Awaitable[_T]]
) -> list[_T]:
    """Run ``work`` for every exchange concurrently; the first failure cancels the rest.

    Each exchange notes how it ended; those cancelled because another failed
    are noted ``cancelled`` with the failure's status.
    """

    async def one(index: int, exchange: Exchange) -> _T:
        try:
            return await work(index, exchange)
        except BaseException as exc:
            exchange._note(exc)
            raise

    loop = exchanges[0].loop
    tasks = [loop.create_task(one(i, e)) for i, e in enumerate(exchanges)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failure = next(
            (t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()),
            None,
        )
        if failure is None:
            return [task.result() for task in tasks]
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for task, exchange in zip(tasks, exchanges, strict=True):
            if task.cancelled():
                exchange.outcome = "cancelled"
                exchange.status = getattr(failure, "status", 500)
        raise failure
    finally:
        # The client went away (or this task was cancelled): so do the SAI calls.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Stream:
    """The streamed answer of one exchange: started or not, what went out, how it ends."""

    __slots__ = ("answer", "exchange", "relayed", "renderer", "response", "started")

    def __init__(self, exchange: Exchange, renderer: Renderer, response: EventStream) -> None:
        self.exchange = exchange
        self.renderer = renderer
        self.response = response
        self.started = False
        self.relayed = False  # some of the answer went out
        self.answer: Answer | None = None  # how it finished, once it has

    async def run(self, *, keep_alive: bool = True) -> None:
        """Wait for SAI (keeping the client's connection alive), then relay or fail.

        Of several streams sharing a response only one need send keep-alives:
        whichever way it stops waiting, the response has started (and the SSE
        response pings by itself from then on) or the request has failed.
        """
        exchange, renderer, response = self.exchange, self.renderer, self.response
        interval = exchange.settings.ping_interval if keep_alive else None
        loop = exchange.loop
        opening = loop.create_task(
            exchange.sai.open(exchange._known_call())
            if exchange.early is None
            else _raise(exchange.early)
        )
        try:
            if renderer.eager and exchange.early is None:
                # These clients expect the opening event at once. A SAI that
                # answers within the grace opens the stream itself, with its
                # model name and no write of its own (a fast failure is then
                # still a real status in http mode).
                await _settled(loop, opening, EAGER_GRACE)
                if not opening.done():
                    await self.start(exchange.model)
            # Until SAI answers 200 nothing need be sent, so a failure can still be a
            # real HTTP status; if the first keep-alive falls due first, the stream starts.
            while not opening.done():
                await _settled(loop, opening, interval)
                if not opening.done():
                    await self.prepare()
                    await response.write(renderer.ping())
            try:
                upstream = opening.result()
            except UpstreamError as error:
                await self.failed(error)
            else:
                await self.relay(upstream)
        finally:
            if not opening.done():
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                    await opening

    async def prepare(self) -> None:
        """Send the status line and headers, if not yet sent; keep the stream alive from then on."""
        if not self.response.prepared:
            await self.response.prepare(self.exchange.request)
            self.exchange.request.app[KEEP_ALIVE].add(self.response)

    async def start(self, model: str) -> None:
        """Send the opening frames, if not yet sent."""
        await self.prepare()
        if not self.started:
            self.started = True
            await self.response.write(self.renderer.head(model))

    async def failed(self, error: UpstreamError, *, relayed: bool = False) -> None:
        """End the stream with ``error`` as the policy says; re-raise it for a real status."""
        exchange, renderer, response = self.exchange, self.renderer, self.response
        policy = exchange.policy(error, prepared=response.prepared)
        if policy == "raise":
            raise error
        if policy == "in_band":
            exchange.finish_reason = "error"
            await self.prepare()
            await response.write(renderer.failure(error))
            raise _StreamEnded(error)
        if not response.prepared:
            response.headers[ERROR_HEADER] = exchange.outcome
        await self.start(exchange.model)
        answer = exchange.explained(error, relayed=relayed)
        await response.write(renderer.text(answer.text))
        answer.text = ""
        self.answer = answer
        await response.write(renderer.finish(answer))

    async def relay(self, upstream: SaiStream) -> None:
        """Forward SAI's body piece by piece as prose, then the calls and the finish."""
        exchange, renderer, response = self.exchange, self.renderer, self.response
        write = response.write
        conversation = exchange.conversation
        answer_filter = (
            AnswerFilter(conversation, exchange._rejected)
            if conversation.offered_tools or conversation.stop or conversation.output
            else None
        )
        chars = 0
        async with upstream:
            exchange.model = upstream.headers.get("model") or exchange.model
            await self.start(exchange.model)
            upstream.watch(exchange.loop)
            # SAI answered: no attempt will resend the payload, and only the finish
            # needs the conversation's shape. An agent's 100 KB history need not
            # stay for the length of the stream.
            upstream.call.payload = b""
            exchange.conversation.turns.clear()
            # The loop every token goes through: one await per piece.
            read, text_of, text = upstream.read_chunk, upstream.text_of, renderer.text
            try:
                while True:
                    try:
                        piece = text_of(await read())
                    except upstream.BROKEN as exc:
                        raise upstream.body_error(exc) from None
                    if piece is None:
                        break
                    if not piece:
                        continue  # a character still incomplete
                    if exchange.first_byte is None:
                        exchange.first_byte = time.monotonic()
                    chars += len(piece)
                    if answer_filter is not None:
                        piece = answer_filter.feed(piece)
                        if answer_filter.stopped:
                            if piece:
                                self.relayed = True
                                await write(text(piece))
                            break  # leaving closes SAI's answer: nobody reads the rest
                        if not piece:
                            continue
                    self.relayed = True
                    response.quiet = False
                    await write(text(piece))
            except UpstreamError as error:
                # Mid-stream: never let a broken body look like a clean stop.
                log.warning(
                    "upstream broke off mid-stream",
                    extra={"error": error.code, "chars_sent": chars},
                )
                if answer_filter is not None and (held := answer_filter.close()):
                    await write(renderer.text(held))
                await self.failed(error, relayed=True)
                return
        exchange._count(upstream.headers, chars)
        if answer_filter is None:
            exchange.finish_reason = "stop"
            self.answer = Answer("", exchange.model, "stop", usage=exchange.usage)
            await write(renderer.finish(self.answer))
            return
        held = answer_filter.close()
        if held:
            await write(renderer.text(held))
        self.answer = answer = exchange._answered(answer_filter, "")
        if answer.calls:
            await write(renderer.calls(answer.calls))
        await write(renderer.finish(answer))


class _StreamEnded(Exception):
    """A failure was reported in-band and the stream's terminator written: nothing may follow."""

    status = 200  # the stream had started: the client got a 200 and the error frame

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.code = error.code


async def _raise(error: UpstreamError) -> SaiStream:
    raise error
