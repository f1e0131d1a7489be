"""One conversation through SAI, whatever its protocol: the exchange every adapter shares.

An adapter parses its body into a :class:`Conversation`, opens an
:class:`Exchange` and hands it a :class:`~saiproxy.core.render.Renderer`
(``await exchange.respond(renderer)``). The exchange picks the credential,
checks the context size, calls SAI (with the client's retries and fallback),
repairs structured output, turns SAI's text into prose, tool calls and
finish reasons, decides in one place what an upstream failure becomes
(:meth:`Exchange.policy`), counts tokens, and logs and measures every request
the same way: its finish line reports the answer's :class:`Ending`, once.

The streamed answer is relayed by :mod:`.relay`, several conversations in one
response are answered by :mod:`.fanout`, and :mod:`.inflight` keeps what
shutdown needs to know.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Coroutine, Sequence
from functools import partial
from typing import Any, Literal

import orjson
from aiohttp import web

from ..base.errors import ContextTooLong, ModelNotFound, UpstreamError
from ..base.keys import (
    AUTH_CHAIN,
    CALL_BUDGET,
    LIMITS,
    METRICS,
    OUTCOME,
    REQUEST_ID,
    SAI,
    SCHEMA_CHECKER,
    SETTINGS,
)
from ..base.settings import ModelConfig, Settings
from ..limits import gate
from ..logs import RESPONSE_FINISHED, event
from ..tracing import hooks as tracing
from ..upstream.auth import Credential
from ..upstream.sai import CallBudget, SaiCall, SaiClient, SaiStream
from .answer import AnswerFilter, Rejected, output_problem
from .bodies import json_response
from .bounds import check_output_schema
from .conversation import Answer, Conversation, Finish, Turn, Usage
from .ending import ERROR_HEADER, Ending
from .inflight import InFlight, cut_short
from .prompt import estimate_tokens, header_tokens, sai_payload
from .relay import respond_streamed
from .render import Renderer

__all__ = [
    "Exchange",
    "Policy",
    "admit",
    "conclude",
    "settle",
    "unique_suffix",
]

log = logging.getLogger("saiproxy.exchange")

Policy = Literal["raise", "in_band", "explain"]

_SUFFIXES = itertools.count(secrets.randbits(40))
# Where each protocol takes the output format, for the 400 that names it.
_OUTPUT_PARAMS = {
    "chat": "response_format",
    "responses": "text.format",
    "messages": "output_format",
}


def unique_suffix() -> str:
    """Return a process-unique suffix: a random start, counted up (no entropy per call)."""
    return f"{next(_SUFFIXES) & 0xFFFFFFFFFFFF:012x}"


class Exchange:
    """One conversation in flight: what was asked, what SAI is doing, what it cost."""

    # Slots: ten thousand open streams each hold one (a dict would cost ~1 KB more).
    __slots__ = (
        "_body", "call", "chars", "choice", "conversation", "created", "early", "first_byte",
        "loop", "max_output", "model", "model_config", "protocol", "rejected",
        "rejected_detail", "request", "request_id", "settings", "span", "started", "suffix",
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
        # The request's server span; None: not traced. Tracing off, one attribute
        # check: a missing request key costs a KeyError inside ``get`` (about 1 us).
        self.span = request.get(tracing.SPAN) if self.settings.tracing is not None else None
        self.suffix = unique_suffix()
        self.model_config = self._model(conversation.model)
        # SAI's model header names the model; without it, the name the client asked for.
        self.model = conversation.model or self.model_config.name
        self._body = body
        self.call: SaiCall | None = None
        self.early: UpstreamError | None = None  # an outcome known without calling SAI
        self.chars = 0
        self.first_byte: float | None = None
        self.usage = Usage()
        self.choice: int | None = None  # its index when one of several (fanout.respond_all)
        self.max_output: int | None = None  # the answer's token bound the client asked for
        # Call blocks left as text, by reason, and the first one's detail: one log line at the end.
        self.rejected: dict[str, int] = {}
        self.rejected_detail = ""

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
            raise ModelNotFound(name)
        return model

    # --- the request's life

    async def respond(self, renderer: Renderer) -> web.StreamResponse:
        """Answer the request with ``renderer``'s shapes, streamed or not."""
        ending = Ending()
        with InFlight(self.request, self.loop):
            try:
                self.begin()
                with tracing.admission(self.span, self.request):
                    await admit((self,))  # the limits, once, before SAI
                if self.conversation.stream:
                    response, ending = await respond_streamed(self, renderer)
                else:
                    answer = await self.answer()
                    ending = Ending.answered(answer)
                    headers = {ERROR_HEADER: answer.outcome} if answer.outcome != "ok" else None
                    response = json_response(renderer.body(answer), headers=headers)
                return response
            except BaseException as exc:
                ending = Ending.failed(exc)
                raise
            finally:
                conclude((self,), (ending,))

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
        call = self.sai.new_call(self.model_config, body, credential, self.request_id, self.budget)
        if credential.user and self.request.app.get(LIMITS) is not None:
            call.before_shared = partial(gate.admit_shared, self.request)
        return call

    @property
    def budget(self) -> CallBudget:
        """Return the SAI calls the client request may still make beyond one per prompt."""
        budget = self.request.get(CALL_BUDGET)
        if budget is None:
            budget = self.request[CALL_BUDGET] = CallBudget(self.settings.request_extra_calls)
        return budget

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

    def explained(self, error: UpstreamError, *, relayed: bool) -> Answer:
        """Return the answer that explains ``error`` (``message`` mode).

        After part of the answer went out, it is marked truncated (``length``),
        never a clean stop.
        """
        text = error.chat_text()
        finish: Finish = "length" if relayed else error.finish_reason
        outcome = error.code or "error"
        return Answer("\n\n" + text if relayed else text, self.model, finish, outcome=outcome)

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
        answer_filter = AnswerFilter(conversation, self._rejected)
        prose = answer_filter.feed(text) + answer_filter.close()
        return self.answered(answer_filter, prose)

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
            payload, chars = sai_payload(retry, int(time.time() * 1000))
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
        checker = self.request.app[SCHEMA_CHECKER]
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

    def opened(self, upstream: SaiStream) -> None:
        """Note the model SAI's answer names, and let the prompt go.

        SAI answered: no attempt will resend the payload, and only the finish
        needs the conversation's shape. An agent's 100 KB history need not
        stay for the length of the stream.
        """
        self.model = upstream.headers.get("model") or self.model
        upstream.call.payload = b""
        self.conversation.turns.clear()

    def stream_filter(self) -> AnswerFilter | None:
        """Return the filter a streamed answer goes through; None when nothing needs filtering."""
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

    def count(
        self, headers: Any, completion_chars: int, *, prompt_chars: int | None = None
    ) -> None:
        """Add one SAI answer's tokens: its headers, else estimates from the characters."""
        prompt_chars = self.chars if prompt_chars is None else prompt_chars
        self.usage.prompt_tokens += header_tokens(headers, "prompttokens", prompt_chars)
        self.usage.completion_tokens += header_tokens(headers, "completiontokens", completion_chars)

    def answered(self, answer_filter: AnswerFilter, text: str) -> Answer:
        """Return the finished answer: ``text``, and the calls and stop the filter found."""
        calls = answer_filter.calls
        finish: Finish
        if answer_filter.stop_sequence is not None:
            finish = "stop_sequence"
        elif calls:
            finish = "tool_calls"
        else:
            finish = "stop"
        if self.span is not None:
            tracing.answered(self.span, self, text, calls)
        return Answer(text, self.model, finish, calls, answer_filter.stop_sequence, self.usage)

    def _rejected(self, rejected: Rejected) -> None:
        metrics = self.request.app[METRICS]
        metrics.child(metrics.tool_calls_unrecognised, rejected.reason).inc()
        if not self.rejected:
            self.rejected_detail = rejected.detail[:300]
        self.rejected[rejected.reason] = self.rejected.get(rejected.reason, 0) + 1

    def _log_rejected(self) -> None:
        """Log the call blocks left as text: one line per answer, however many there were."""
        if self.rejected:
            log.warning(
                "tool calls not recognised, left as text",
                extra={
                    "count": sum(self.rejected.values()),
                    "reasons": self.rejected,
                    "detail": self.rejected_detail,
                    **self._choice_field(),
                },
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

    def finish(self, ending: Ending) -> None:
        """Log the finish line (how the answer ended, what it cost) and record the latencies."""
        now = time.monotonic()
        latency = now - self.started
        generating = now - self.first_byte if self.first_byte is not None else 0.0
        metrics = self.request.app[METRICS]
        stream = "true" if self.conversation.stream else "false"
        exemplar = tracing.exemplar(self.span) if self.span is not None else None
        metrics.child(metrics.latency, stream).observe(latency, exemplar)
        if self.first_byte is not None:
            metrics.child(metrics.ttfb, stream).observe(self.first_byte - self.started, exemplar)
        usage = self.usage
        # Raised, the early outcome's traceback holds this exchange's frames: a
        # cycle that would keep the whole conversation until the collector runs.
        self.early = None
        self._log_rejected()
        event(
            log,
            RESPONSE_FINISHED,
            {
                "path": self.request.path,
                "status": ending.status,
                "outcome": ending.outcome,
                "finish_reason": ending.finish_reason,
                "tool_calls": ending.tool_calls,
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
