"""One conversation through SAI, whatever its protocol: the exchange every adapter shares.

An adapter parses its body into a :class:`Conversation`, opens an
:class:`Exchange` and hands it a :class:`~saiproxy.core.render.Renderer`
(``await exchange.respond(renderer)``). The exchange picks the credential,
checks the context size, calls SAI (with the client's retries and fallback),
repairs structured output, turns SAI's text into prose, tool calls and
finish reasons, decides in one place what an upstream failure becomes
(:meth:`Exchange.policy`), counts tokens, and logs and measures every request
the same way: its finish line reports the answer's :class:`Ending`, once.

Every answer has one skeleton (:func:`answer_request`): begun and admitted
once, answered, concluded once. The streamed answer is relayed by
:mod:`.relay`, several conversations in one response are answered by
:mod:`.fanout`; both return what they learned and how each answer ended,
and the exchange records it. :mod:`.inflight` keeps what shutdown needs to
know.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from ..base.errors import ContextTooLong, UpstreamError
from ..base.keys import OUTCOME
from ..base.log import exchange_logger as log
from ..limits import gate
from ..limits.limits import LIMITS
from ..tracing import hooks as tracing
from ..upstream.auth import AUTH_CHAIN, Credential
from ..upstream.sai import CallBudget, SaiCall, SaiStream
from .answer import SCHEMA_CHECKER, AnswerFilter, output_problem
from .bodies import json_response
from .bounds import check_output_schema
from .conversation import Answer, Conversation, Finish, ToolCall, Turn, Usage
from .ending import ERROR_HEADER, Done, Ending, Policy
from .inflight import InFlight, cut_short
from .ledger import Ledger
from .prompt import estimate_tokens, sai_payload
from .relay import Stream, streamed
from .render import Renderer
from .sse import EventStream
from .toolcache import TOOL_CACHES

__all__ = [
    "Exchange",
    "admit",
    "answer_request",
    "conclude",
    "settle",
]


# Where each protocol takes the output format, for the 400 that names it.
_OUTPUT_PARAMS = {
    "chat": "response_format",
    "responses": "text.format",
    "messages": "output_format",
}


class Exchange(Ledger):
    """One conversation in flight: what was asked, what SAI is doing, what it cost."""

    __slots__ = ()

    # --- the request's life

    async def respond(self, renderer: Renderer) -> web.StreamResponse:
        """Answer the request with ``renderer``'s shapes, streamed or not."""
        return await answer_request((self,), partial(self._respond, renderer))

    async def _respond(self, renderer: Renderer) -> Done:
        if self.conversation.stream:
            stream = Stream(self, renderer, EventStream(renderer.ping()))
            try:
                return await streamed(stream)
            finally:
                self.record(stream.learned)
        answer = await self.answer()
        headers = {ERROR_HEADER: answer.outcome} if answer.outcome != "ok" else None
        return Done(
            json_response(renderer.body(answer), headers=headers), [Ending.answered(answer)]
        )

    def begin(self) -> None:
        """Prepare the call and log the request as received, whatever happens."""
        credential: dict[str, Any] = {"credential": None}
        try:
            credential = self._prepare()
        finally:
            self._log_received(credential)
        self.max_output = gate.requested_output(self._body)
        if self.span is not None:
            tracing.began(self.span, self, self._body)
        self._body = None  # parsed already; a long stream need not keep the raw JSON

    def _prepare(self) -> dict[str, Any]:
        """Decide the early outcome, or the credential and the SAI call; return credential facts."""
        output = self.conversation.output
        if output is not None and output.schema is not None:
            check_output_schema(
                output.schema, self.settings.max_schema_bytes, _OUTPUT_PARAMS.get(self.protocol, "")
            )
        caches = self.app[TOOL_CACHES]
        payload, self.chars = sai_payload(self.conversation, int(time.time() * 1000), caches)
        estimated = estimate_tokens(self.chars)
        if estimated > self.settings.max_context_tokens:
            self.early = ContextTooLong(estimated, self.settings.max_context_tokens)
            return {}
        credential = self.app[AUTH_CHAIN].select(self.request, self._body)
        self.call = self._new_call(payload, credential)
        return credential.describe()

    def _new_call(self, payload: dict[str, Any], credential: Credential) -> SaiCall:
        # orjson's result keeps a 4 KB buffer whatever the length; the payload lives as
        # long as the call (retries need it), so it is kept as an exact-size copy.
        body = bytes(memoryview(orjson.dumps(payload)))
        call = self.sai.new_call(self.model_config, body, credential, self.request_id, self.budget)
        if credential.user and self.app.get(LIMITS) is not None:
            call.before_shared = partial(gate.admit_shared, self.request)
        return call

    def policy(self, *, prepared: bool) -> Policy:
        """Return what an upstream failure becomes: the one place ERROR_MODE is read.

        ``http`` mode: a real status while nothing was sent (``prepared`` is
        false), else an in-band error in the protocol's shape. ``message``
        mode: the explanation as the answer's text, with a finish reason every
        client accepts.
        """
        if self.settings.error_mode == "http":
            return "in_band" if prepared else "raise"
        return "explain"

    def explained(self, error: UpstreamError, *, relayed: bool, model: str | None = None) -> Answer:
        """Return the answer that explains ``error`` (``message`` mode).

        After part of the answer went out, it is marked truncated (``length``),
        never a clean stop.
        """
        text = error.chat_text()
        finish: Finish = "length" if relayed else error.finish_reason
        outcome = error.code or "error"
        text = "\n\n" + text if relayed else text
        return Answer(text, model or self.model, finish, outcome=outcome)

    # --- non-streamed

    async def answer(self) -> Answer:
        """Return the whole answer, or its failure explained (``message`` mode), or raise."""
        try:
            try:
                return await self._answer()
            except asyncio.CancelledError:
                raise cut_short(self.request, self.loop) from None
        except UpstreamError as error:
            if self.policy(prepared=False) == "raise":
                raise
            return self.explained(error, relayed=False)

    async def _answer(self) -> Answer:
        conversation = self.conversation
        fetched = await self.sai.fetch(self._known_call())
        self.first_byte = fetched.first_byte_at  # of SAI's body, as a stream's first piece
        self.model = fetched.headers.get("model") or self.model
        self.count(fetched.headers, len(fetched.text))
        text = fetched.text
        output = conversation.output
        if output is not None and (problem := await self._output_problem(text)) is not None:
            with tracing.child(self.span, self.request, "saiproxy.output.repair"):
                text = await self._repair(text, problem)
        answer_filter = self.stream_filter()
        if answer_filter is None:  # no tools, stops or format: the text is all prose
            return self.answered(None, text, self.model, self.usage)
        prose = answer_filter.feed(text) + answer_filter.close()
        return self.answered(answer_filter, prose, self.model, self.usage)

    async def _repair(self, text: str, problem: str) -> str:
        """Ask SAI once more for JSON that parses and follows the schema (TOOL_REPAIR_RETRIES)."""
        output = self.conversation.output
        assert output is not None and self.call is not None
        for attempt in range(self.settings.tool_repair_retries):
            if not self.budget.take():
                log.warning(
                    "structured output invalid; the request's SAI calls are spent "
                    "(REQUEST_EXTRA_CALLS), answered as is",
                    extra={"problem": problem[:200]},
                )
                return text
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
            now = int(time.time() * 1000)
            payload, chars = sai_payload(retry, now, self.app[TOOL_CACHES])
            fetched = await self.sai.fetch(self._new_call(payload, self.call.credential))
            text = fetched.text
            self.count(fetched.headers, len(text), prompt_chars=chars)
            problem_again = await self._output_problem(text)
            if problem_again is None:
                return text
            problem = problem_again
        log.warning(
            "structured output still invalid, answered as is", extra={"problem": problem[:200]}
        )
        return text

    async def _output_problem(self, text: str) -> str | None:
        output = self.conversation.output
        assert output is not None
        checker = self.app[SCHEMA_CHECKER]
        if self.span is None:
            return await output_problem(text, output, checker)
        with tracing.child(self.span, self.request, "saiproxy.output.check") as span:
            problem = await output_problem(text, output, checker)
            if span is not None:
                span.set_attribute("saiproxy.output.valid", problem is None)
            return problem

    # --- streamed (the relay, core/relay.py, drives these)

    def open(self) -> Coroutine[Any, Any, SaiStream]:
        """Return the call that opens SAI's answer (raising the early outcome, if any)."""
        if self.early is not None:
            return _raise(self.early)
        assert self.call is not None
        return self.sai.open(self.call)

    def let_go(self, upstream: SaiStream) -> None:
        """Let the prompt go: SAI answered.

        No attempt will resend the payload, and only the finish needs the
        conversation's shape. An agent's 100 KB history need not stay for the
        length of the stream.
        """
        upstream.call.payload = b""
        self.conversation.turns.clear()

    def stream_filter(self) -> AnswerFilter | None:
        """Return the filter an answer goes through, streamed or whole; None when nothing
        needs filtering (no tools offered, no stop sequences, no output format)."""
        conversation = self.conversation
        if conversation.offered_tools or conversation.stop or conversation.output:
            return AnswerFilter(conversation, self._rejected)
        return None

    # --- shared

    def _known_call(self) -> SaiCall:
        if self.early is not None:
            raise self.early
        assert self.call is not None
        return self.call

    def answered(
        self, answer_filter: AnswerFilter | None, text: str, model: str, usage: Usage
    ) -> Answer:
        """Return the finished answer: ``text``, and the calls and stop the filter found
        (None: the answer needed no filter)."""
        if answer_filter is None:
            calls: list[ToolCall] = []
            stop_sequence = None
        else:
            calls, stop_sequence = answer_filter.calls, answer_filter.stop_sequence
        finish: Finish
        if stop_sequence is not None:
            finish = "stop_sequence"
        elif calls:
            finish = "tool_calls"
        else:
            finish = "stop"
        if self.span is not None:
            tracing.answered(self.span, self, text, calls)
        return Answer(text, model, finish, calls, stop_sequence, usage)


async def answer_request(
    exchanges: Sequence[Exchange],
    respond: Callable[[], Awaitable[Done]],
    *,
    choices: bool = False,
) -> web.StreamResponse:
    """Answer a client request: begin and admit its exchanges once, ``respond``, conclude once.

    The one skeleton of every answer, one conversation or several
    (``choices``: each is a choice of one response, its index in its log
    lines). However it ends, each answer's ending is recorded before what
    failed is raised.
    """
    first = exchanges[0]
    endings: Sequence[Ending] = [Ending()] * len(exchanges)
    done: Done | None = None
    if len(exchanges) > 1:
        # The SAI calls the request may make beyond one per prompt: its answers' together.
        shared = CallBudget(first.settings.request_extra_calls)
        for exchange in exchanges:
            exchange.budget = shared
    if choices:
        for index, exchange in enumerate(exchanges):
            exchange.choice = index
    # Shutdown waits for it within its budget (a cut past it closes the connection).
    with InFlight(first.request, first.loop):
        try:
            for exchange in exchanges:
                exchange.begin()
            if first.app.get(LIMITS) is not None:
                with tracing.admission(first.span, first.request):
                    await admit(exchanges)  # the limits, once, before SAI
            done = await respond()
            endings = done.endings
            if done.failure is not None:
                raise done.failure
            response: web.StreamResponse | None = done.response
            assert response is not None
            return response
        except BaseException as exc:
            if done is None or exc is not done.failure:
                # e.g. no credential: the request ends for every answer
                endings = [Ending.failed(exc)] * len(exchanges)
            raise
        finally:
            conclude(exchanges, endings)
            # Raised, the failure's traceback holds this frame: it must not hold the failure.
            done = None


def conclude(exchanges: Sequence[Exchange], endings: Sequence[Ending]) -> None:
    """Record how a request ended: its outcome for the request metric, each answer's finish line.

    The finish lines and the latency figures are recorded once the answer is
    on its way: done at once they would sit between SAI's answer and the client.
    """
    request = exchanges[0].request
    request[OUTCOME] = next((e.outcome for e in endings if e.outcome != "ok"), "ok")
    settle(exchanges)  # however it ended: tokens corrected, lease ended
    if (span := exchanges[0].span) is not None:
        tracing.concluded(span, exchanges, endings)
    call_soon = exchanges[0].loop.call_soon
    for exchange, ending in zip(exchanges, endings, strict=True):
        call_soon(exchange.finish, ending)


async def admit(exchanges: Sequence[Exchange]) -> None:
    """Admit a client request to the limits once, before SAI: its prompts' estimate and
    each answer's bound (raises RateLimited when a limit refuses it)."""
    calls = [exchange.call for exchange in exchanges if exchange.call is not None]
    if not calls:
        return  # answered without SAI (the context check): nothing to limit
    prompt = sum(estimate_tokens(exchange.chars) for exchange in exchanges)
    outputs = [exchange.max_output for exchange in exchanges]
    await gate.admit(exchanges[0].request, calls[0].credential, prompt, outputs)


def settle(exchanges: Sequence[Exchange]) -> None:
    """Settle the request's admission with what SAI received and counted.

    SAI's counts when they came; else, once SAI was called, the prompt's
    estimate (and the part of the answer that arrived is in ``usage``
    already): a request abandoned before SAI's counts arrive still costs
    what SAI received.
    """
    input_tokens = output_tokens = 0
    accepted = False
    for exchange in exchanges:
        usage, call = exchange.usage, exchange.call
        if usage.total_tokens:
            input_tokens += usage.prompt_tokens
            output_tokens += usage.completion_tokens
        elif call is not None and call.attempts:
            input_tokens += estimate_tokens(exchange.chars)
        if call is not None and call.credential.user and call.last_status == 200:
            accepted = True
    gate.settle(exchanges[0].request, input_tokens, output_tokens, accepted)


async def _raise(error: UpstreamError) -> SaiStream:
    raise error
