"""What the rest of saiproxy calls: the server-span middleware and the hooks on spans.

The exchange and the SAI client call these with the span in hand, so with
tracing off (no span) they are never reached. OpenTelemetry's objects are
only touched through spans that :mod:`.sdk` made.

Tracing sits below the layers it observes: what a hook reads of an
exchange, an ending or a SAI call is declared here as a small protocol
(:class:`Traced`, :class:`Ended`; :class:`.sdk.Attempt`), and the core and the SAI
client hand over objects that fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence, Sized
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..base.otel import TracingConfig
from ..logs import trace_var

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .sdk import Attempt, Pipeline

__all__ = [
    "PROVIDER",
    "SPAN",
    "TRACING",
    "UNTRACED",
    "Tracing",
    "admission",
    "answered",
    "attempt_ended",
    "attempt_started",
    "began",
    "child",
    "concluded",
    "exemplar",
    "tracing_of",
]


PROVIDER: Final = "sai"
SPAN: Final[web.RequestKey[Any]] = web.RequestKey("otel_span")
# Paths no span is made for: probes and scrapes would drown the traces.
UNTRACED: Final = frozenset({"/health", "/health/readiness", "/metrics", "/", "/openapi.json"})
_OPERATIONS: Final = {"completions": "text_completion"}  # the rest are "chat"
# Sampling fields a client may send, by GenAI attribute (first name found wins).
_SAMPLING: Final = (
    ("gen_ai.request.max_tokens", ("max_tokens", "max_completion_tokens", "max_output_tokens")),
    ("gen_ai.request.temperature", ("temperature",)),
    ("gen_ai.request.top_p", ("top_p",)),
    ("gen_ai.request.top_k", ("top_k",)),
    ("gen_ai.request.frequency_penalty", ("frequency_penalty",)),
    ("gen_ai.request.presence_penalty", ("presence_penalty",)),
    ("gen_ai.request.seed", ("seed",)),
    ("gen_ai.request.choice.count", ("n",)),
)


class _Turn(Protocol):
    @property
    def role(self) -> str: ...
    @property
    def text(self) -> str: ...


class Asked(Protocol):
    """What the server span reads of the conversation asked (core/conversation.py's)."""

    @property
    def model(self) -> str | None: ...
    @property
    def stream(self) -> bool: ...
    @property
    def system(self) -> str: ...
    @property
    def stop(self) -> tuple[str, ...]: ...
    @property
    def output(self) -> object | None: ...
    @property
    def offered_tools(self) -> Sized: ...
    @property
    def turns(self) -> Sequence[_Turn]: ...


class _Model(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def template_id(self) -> str: ...


class _Usage(Protocol):
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...


class Traced(Protocol):
    """What the server span's hooks read of one exchange (core/exchange.py's Exchange)."""

    @property
    def request(self) -> web.Request: ...
    @property
    def protocol(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def started(self) -> float: ...
    @property
    def first_byte(self) -> float | None: ...
    @property
    def conversation(self) -> Asked: ...
    @property
    def model_config(self) -> _Model: ...
    @property
    def call(self) -> Attempt | None: ...
    @property
    def usage(self) -> _Usage: ...
    def client_id(self) -> str:
        """Return the client's ID as the limits name it: a hash, never the key."""


class Ended(Protocol):
    """What the server span reads of how one answer ended (core/ending.py's Ending)."""

    @property
    def outcome(self) -> str: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def tool_calls(self) -> int: ...


class Tracing:
    """The process's tracing: its pipeline (started in the process), and the hooks on spans.

    ``exporter`` replaces the configured one (the tests' in-memory exporter).
    """

    def __init__(
        self, config: TracingConfig, *, secrets: Sequence[str] = (), exporter: Any = None
    ) -> None:
        self.config = config
        self._secrets = list(secrets)
        self._exporter = exporter
        self.pipeline: Pipeline | None = None
        self._dropped_before = 0  # kept once the pipeline is shut down

    async def running(self, app: web.Application) -> AsyncIterator[None]:
        """Run the pipeline for the application's life (a ``cleanup_ctx``); flush it at the end."""
        from . import sdk  # OpenTelemetry is imported here, in the serving process, only

        self.pipeline = sdk.Pipeline(self.config, self._secrets, self._exporter)
        try:
            yield
        finally:
            # After the drain: the spans of the requests that just finished go
            # out, within sdk.FLUSH_TIMEOUT; what is left then counts as dropped.
            pipeline = self.pipeline
            await _in_thread(pipeline.shutdown)
            self._dropped_before = pipeline.processor.dropped.count
            self.pipeline = None

    def flush(self, timeout: float = 5.0) -> bool:
        """Export every span ended so far (blocking); False when it took longer than ``timeout``."""
        pipeline = self.pipeline
        return pipeline is None or pipeline.processor.force_flush(int(timeout * 1000))

    def dropped(self) -> int:
        """Return the spans this process dropped (the metric reads it when scraped)."""
        pipeline = self.pipeline
        return pipeline.processor.dropped.count if pipeline is not None else self._dropped_before

    def middleware(self) -> Middleware:
        """Return the middleware that makes each request's server span (outermost)."""

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            pipeline = self.pipeline
            if pipeline is None or request.path in UNTRACED:
                return await handler(request)
            span, token = pipeline.start_server_span(request)
            request[SPAN] = span
            ids = pipeline.log_ids(span)
            ids_token = trace_var.set(ids) if ids is not None else None
            status = 499  # the client went away before an answer
            try:
                response = await handler(request)
                status = response.status
                return response
            except BaseException as exc:
                # The front middleware renders every failure: what arrives here
                # is a cancellation (the client hung up) or an HTTP exception.
                status = getattr(exc, "status", status)
                raise
            finally:
                pipeline.end_server_span(span, request, status, token)
                if ids_token is not None:
                    trace_var.reset(ids_token)

        return middleware


async def _in_thread(work: Any) -> None:
    await asyncio.get_running_loop().run_in_executor(None, work)


def tracing_of(request: web.Request) -> Tracing:
    """Return the application's tracing (only called with a span in hand)."""
    return request.app[TRACING]


# --- hooks the exchange calls with its span (never when tracing is off)


def began(span: Span, exchange: Traced, body: Any) -> None:
    """Note the request's GenAI facts on the server span: model, operation, sampling fields."""
    if not span.is_recording():
        return
    pipeline = tracing_of(exchange.request).pipeline
    if pipeline is None:
        return
    operation = _OPERATIONS.get(exchange.protocol, "chat")
    requested = exchange.conversation.model or exchange.model_config.name
    span.update_name(f"{operation} {requested}")
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": requested,
        "saiproxy.protocol": exchange.protocol,
        "saiproxy.stream": exchange.conversation.stream,
        "saiproxy.model": exchange.model_config.name,
        "saiproxy.template_id": exchange.model_config.template_id,
    }
    if not pipeline.config.latest_semconv:
        attributes["gen_ai.system"] = PROVIDER  # the name v1.36.0 and earlier read
    if isinstance(body, dict):
        for attribute, names in _SAMPLING:
            for name in names:
                value = body.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    attributes[attribute] = value
                    break
        stop = exchange.conversation.stop
        if stop:
            attributes["gen_ai.request.stop_sequences"] = list(stop)
    output = exchange.conversation.output
    if output is not None:
        attributes["gen_ai.output.type"] = "json"
    if exchange.conversation.offered_tools:
        attributes["saiproxy.tools"] = len(exchange.conversation.offered_tools)
    call = exchange.call
    if call is not None:
        attributes["saiproxy.credential.kind"] = call.credential.kind
        attributes["saiproxy.client.id"] = exchange.client_id()
    if pipeline.config.capture_content:
        conversation = exchange.conversation
        if conversation.system:
            attributes["gen_ai.system_instructions"] = pipeline.masked_json(
                [{"type": "text", "content": conversation.system}]
            )
        attributes["gen_ai.input.messages"] = pipeline.masked_json(
            [
                {"role": turn.role, "parts": [{"type": "text", "content": turn.text}]}
                for turn in conversation.turns
            ]
        )
    span.set_attributes(attributes)


def answered(span: Span, exchange: Traced, text: str, calls: Sequence[Any]) -> None:
    """Record a whole answer's content (only with content capture on)."""
    if not span.is_recording():
        return
    pipeline = tracing_of(exchange.request).pipeline
    if pipeline is None or not pipeline.config.capture_content:
        return
    parts: list[dict[str, Any]] = [{"type": "text", "content": text}] if text else []
    for call in calls:
        parts.append(
            {
                "type": "tool_call",
                "id": getattr(call, "id", None),
                "name": getattr(call, "name", None),
                "arguments": getattr(call, "arguments", None),
            }
        )
    span.set_attribute(
        "gen_ai.output.messages",
        pipeline.masked_json([{"role": "assistant", "parts": parts}]),
    )


def child(span: Span | None, request: web.Request, name: str, **attributes: Any) -> Any:
    """Return a context manager with a child span of ``span`` (none without a span)."""
    if span is None or not span.is_recording():
        return contextlib.nullcontext()
    pipeline = tracing_of(request).pipeline
    if pipeline is None:
        return contextlib.nullcontext()
    return pipeline.child(span, name, attributes)


def admission(span: Span | None, request: web.Request) -> Any:
    """Return the limits' admission span's context manager (tracing off: nothing)."""
    if span is None:
        return _NOTHING
    return child(span, request, "saiproxy.limits.admit")


_NOTHING: Final = contextlib.nullcontext()


def concluded(span: Span, exchanges: Sequence[Traced], endings: Sequence[Ended]) -> None:
    """Record how the request ended on its server span: response, usage, finish, errors, timing."""
    for exchange in exchanges:
        # An attempt the client's hang-up cancelled ended nowhere else.
        if exchange.call is not None and exchange.call.span is not None:
            attempt_ended(exchange.call, "cancelled")
    if not span.is_recording():
        return
    first = exchanges[0]
    prompt = sum(e.usage.prompt_tokens for e in exchanges)
    completion = sum(e.usage.completion_tokens for e in exchanges)
    attributes: dict[str, Any] = {
        "gen_ai.response.model": first.model,
        "gen_ai.usage.input_tokens": prompt,
        "gen_ai.usage.output_tokens": completion,
        "saiproxy.outcome": next((e.outcome for e in endings if e.outcome != "ok"), "ok"),
    }
    reasons = [e.finish_reason for e in endings if e.finish_reason is not None]
    if reasons:
        attributes["gen_ai.response.finish_reasons"] = reasons
    tool_calls = sum(e.tool_calls for e in endings)
    if tool_calls:
        attributes["saiproxy.tool_calls"] = tool_calls
    call = first.call
    if call is not None:
        attributes["saiproxy.sai.attempts"] = call.attempts
        attributes["saiproxy.sai.retries"] = call.retries
    failed = next((e for e in endings if e.outcome != "ok"), None)
    if failed is not None:
        attributes["error.type"] = failed.outcome
    if first.first_byte is not None:
        ttft = first.first_byte - first.started
        attributes["gen_ai.server.time_to_first_token"] = round(ttft, 6)
        if first.conversation.stream:
            now = time.monotonic()
            wall = time.time_ns()
            span.add_event(
                "saiproxy.stream.first_token",
                timestamp=wall - int((now - first.first_byte) * 1e9),
            )
            span.add_event(
                "saiproxy.stream.end",
                {"saiproxy.finish_reasons": reasons} if reasons else None,
                timestamp=wall,
            )
    span.set_attributes(attributes)
    if failed is not None:
        pipeline = tracing_of(first.request).pipeline
        if pipeline is not None:
            pipeline.set_error(span, failed.outcome)


def exemplar(span: Span | None) -> dict[str, str] | None:
    """Return a latency observation's exemplar: the request's trace id, when it was sampled."""
    if span is None:
        return None
    context = span.get_span_context()
    if not context.trace_flags.sampled:
        return None
    return {"trace_id": f"{context.trace_id:032x}"}


# --- hooks the SAI client calls


def attempt_started(call: Attempt, headers: dict[str, str], tracing: Tracing) -> None:
    """Start the attempt's client span, and send its context to SAI (``traceparent``)."""
    pipeline = tracing.pipeline
    if pipeline is not None:
        call.span = pipeline.start_attempt(call, headers)


def attempt_ended(call: Attempt, status: int | str, *, complete: bool | None = None) -> None:
    """End the attempt's client span with how it went."""
    span, call.span = call.span, None
    if span is None:
        return
    if span.is_recording():
        if isinstance(status, int):
            span.set_attribute("http.response.status_code", status)
        if complete is not None:
            span.set_attribute("saiproxy.sai.body_complete", complete)
        if status != 200:
            span.set_attribute("error.type", str(status))
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, str(status)))
    span.end()


TRACING: Final = web.AppKey("tracing", Tracing)  # absent when tracing is off
