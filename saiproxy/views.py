"""Request handlers: parse, call SAI, answer. Translation lives in translate.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from . import __version__
from .errors import (
    BodyTooLarge,
    ContextTooLong,
    InvalidRequest,
    ModelNotFound,
    UpstreamError,
)
from .keys import AUTH_CHAIN, METRICS, OUTCOME, REQUEST_ID, SAI, SETTINGS, STATE
from .logs import event
from .metrics import metrics_response
from .sai import SaiAnswer, SaiCall, SaiClient, SaiStream
from .settings import ModelConfig, Settings
from .translate import (
    ChatRequest,
    ChunkWriter,
    completion,
    header_tokens,
    models_list,
    parse_chat_request,
    sai_payload,
    usage,
)

log = logging.getLogger(__name__)

SSE_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers; no upstream call."""
    return _json({"status": "ok", "version": __version__, "pid": os.getpid()})


async def readiness(request: web.Request) -> web.Response:
    """Readiness: 200 while serving, 503 once shutdown has begun."""
    if request.app[STATE].ready:
        return _json({"status": "ready"})
    return _json({"status": "shutting down"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics of this process."""
    return metrics_response(request.app[METRICS])


async def models(request: web.Request) -> web.Response:
    """List the configured models in OpenAI's shape."""
    settings = request.app[SETTINGS]
    return _json(models_list(list(settings.models), int(time.time())))


@dataclass(slots=True)
class _Exchange:
    """One chat completion in flight: what was asked, what SAI is doing, how it ended."""

    request: web.Request
    settings: Settings
    chat: ChatRequest
    model: str
    completion_id: str
    created: int
    started: float
    call: SaiCall | None = None
    early: UpstreamError | None = None  # an outcome known without calling SAI
    status: int = 200
    outcome: str = "ok"
    finish_reason: str | None = None
    first_byte: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def sai(self) -> SaiClient:
        return self.request.app[SAI]

    def _known_call(self) -> SaiCall:
        if self.early is not None:
            raise self.early
        assert self.call is not None
        return self.call

    async def open(self) -> SaiStream:
        """Open SAI's answer as it arrives, or raise the outcome already known."""
        return await self.sai.open(self._known_call())

    async def fetch(self) -> SaiAnswer:
        """Read SAI's whole answer, or raise the outcome already known."""
        return await self.sai.fetch(self._known_call())

    def failed(self, error: UpstreamError) -> None:
        """Record an upstream outcome that ends the answer."""
        self.outcome, self.finish_reason = error.code or "error", error.finish_reason

    def succeeded(self, headers: Any, completion_chars: int) -> None:
        """Record a complete answer and its token counts."""
        self.prompt_tokens = header_tokens(headers, "prompttokens", self.chat.chars)
        self.completion_tokens = header_tokens(headers, "completiontokens", completion_chars)
        self.finish_reason = "stop"

    def finish(self) -> None:
        """Log the finish line and record the latency figures."""
        now = time.monotonic()
        latency = now - self.started
        generating = now - self.first_byte if self.first_byte is not None else 0.0
        metrics = self.request.app[METRICS]
        stream = "true" if self.chat.stream else "false"
        metrics.child(metrics.latency, stream).observe(latency)
        if self.first_byte is not None:
            metrics.child(metrics.ttfb, stream).observe(self.first_byte - self.started)
        event(
            log,
            "response finished",
            {
                "path": self.request.path,
                "status": self.status,
                "outcome": self.outcome,
                "finish_reason": self.finish_reason,
                "latency_ms": round(latency * 1000, 1),
                "ttfb_ms": round((self.first_byte - self.started) * 1000, 1)
                if self.first_byte is not None
                else None,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "tokens_per_second": round(self.completion_tokens / generating, 1)
                if generating > 0
                else None,
                "model": self.model,
                **(self.call.summary() if self.call is not None else {}),
            },
        )


async def _read_body(request: web.Request, limit: int) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(
            f"The request body is larger than the limit of {limit} bytes (MAX_BODY_BYTES)"
        ) from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None


def _model(settings: Settings, chat: ChatRequest) -> ModelConfig:
    model = settings.model_for(chat.model)
    if model is None:
        raise ModelNotFound(
            f"The model {chat.model!r} does not exist; see GET /v1/models", param="model"
        )
    return model


_SUFFIXES = itertools.count(secrets.randbits(40))


def _completion_suffix() -> str:
    """Return a process-unique suffix: a random start, counted up (no entropy per call)."""
    return f"{next(_SUFFIXES) & 0xFFFFFFFFFFFF:012x}"


def _prepare(exchange: _Exchange, body: Any, model: ModelConfig) -> dict[str, Any]:
    """Decide the early outcome, or the credential and the SAI call; return the credential facts."""
    request, settings, chat = exchange.request, exchange.settings, exchange.chat
    if chat.estimated_tokens > settings.max_context_tokens:
        exchange.early = ContextTooLong(chat.estimated_tokens, settings.max_context_tokens)
        return {}
    credential = request.app[AUTH_CHAIN].select(request, body)
    # orjson's result keeps a 4 KB buffer whatever the length; the payload lives as
    # long as the call (retries need it), so it is kept as an exact-size copy.
    payload = bytes(memoryview(orjson.dumps(sai_payload(chat.messages, int(time.time() * 1000)))))
    exchange.call = request.app[SAI].new_call(model, payload, credential, request[REQUEST_ID])
    return credential.describe()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Answer an OpenAI chat completion from a SAI template execution."""
    settings = request.app[SETTINGS]
    started = time.monotonic()
    body = await _read_body(request, settings.max_body_bytes)
    chat = parse_chat_request(body)
    model = _model(settings, chat)
    exchange = _Exchange(
        # SAI's model header names the model; without it, the name the client asked for.
        request, settings, chat, chat.model or model.name,
        completion_id=f"chatcmpl-{request[REQUEST_ID]}-{_completion_suffix()}",
        created=int(time.time()), started=started,
    )  # fmt: skip
    state = request.app[STATE]
    state.in_flight += 1
    try:
        credential: dict[str, Any] = {"credential": None}
        try:
            credential = _prepare(exchange, body, model)
        finally:
            _log_received(exchange, model, credential)
        del body  # parsed into chat; a long stream need not keep the raw JSON alive
        if chat.stream:
            return await _stream(exchange)
        return await _complete(exchange)
    except asyncio.CancelledError:
        exchange.outcome, exchange.status = "client_disconnected", 499
        raise
    except Exception as exc:
        exchange.outcome = getattr(exc, "code", None) or type(exc).__name__
        exchange.status = getattr(exc, "status", 500)
        raise
    finally:
        request[OUTCOME] = exchange.outcome
        state.in_flight -= 1
        # The finish line and the latency figures are recorded once the answer
        # is on its way: here they would sit between SAI's answer and the client.
        asyncio.get_running_loop().call_soon(exchange.finish)


def _log_received(exchange: _Exchange, model: ModelConfig, credential: dict[str, Any]) -> None:
    """Log the request as received, with the credential decision."""
    request, chat = exchange.request, exchange.chat
    event(
        log,
        "request received",
        {
            "path": request.path,
            "stream": chat.stream,
            "model": model.name,
            "requested_model": chat.model,
            "messages": len(chat.messages),
            "roles": chat.role_counts(),
            "chars": chat.chars,
            "estimated_tokens": chat.estimated_tokens,
            "unwrapped": chat.unwrapped,
            **credential,
        },
    )
    if chat.unwrapped:
        log.info(
            "IDE plugin wrapper removed",
            extra={
                "count": chat.unwrapped,
                "chars_before": chat.unwrapped_chars_before,
                "chars_after": chat.unwrapped_chars_after,
            },
        )
    if isinstance(exchange.early, ContextTooLong):
        log.info(
            "context too long, not calling SAI",
            extra={"estimated_tokens": chat.estimated_tokens,
                   "limit": exchange.settings.max_context_tokens},
        )  # fmt: skip
    if exchange.settings.verbose_logging:
        log.debug(
            "message previews",
            extra={"previews": [f"{m.role}: {m.text[:80]}" for m in chat.messages]},
        )
        if exchange.call is not None:
            log.debug("SAI payload built", extra={"payload_bytes": len(exchange.call.payload)})


async def _complete(exchange: _Exchange) -> web.Response:
    try:
        answer = await exchange.fetch()
    except UpstreamError as error:
        if exchange.settings.error_mode == "http":
            raise
        exchange.failed(error)
        text, usage_ = error.chat_text(), usage(0, 0)
    else:
        exchange.first_byte = answer.opened_at
        exchange.model = answer.headers.get("model") or exchange.model
        exchange.succeeded(answer.headers, len(answer.text))
        text = answer.text
        usage_ = usage(exchange.prompt_tokens, exchange.completion_tokens)
    assert exchange.finish_reason is not None
    return _json(
        completion(
            completion_id=exchange.completion_id,
            created=exchange.created,
            model=exchange.model,
            text=text,
            finish_reason=exchange.finish_reason,
            usage_=usage_,
        )
    )


async def _stream(exchange: _Exchange) -> web.StreamResponse:
    request, settings = exchange.request, exchange.settings
    state = request.app[STATE]
    response = EventSourceResponse(
        headers=SSE_HEADERS,
        sep="\n",
        allow_all_methods=True,
        ping_interval=settings.ping_interval,
    )
    opening = asyncio.ensure_future(exchange.open())
    state.open_streams += 1
    try:
        # Until SAI answers 200 nothing is sent, so a failure can still be a real
        # HTTP status; if the first keep-alive falls due first, the stream starts.
        while not opening.done():
            await asyncio.wait({opening}, timeout=settings.ping_interval)
            if not opening.done():
                if not response.prepared:
                    await response.prepare(request)
                await response.write(ChunkWriter.PING)
        try:
            upstream = opening.result()
        except UpstreamError as error:
            if settings.error_mode == "http" and not response.prepared:
                raise
            await _stream_error(exchange, response, error)
        else:
            await _relay(exchange, response, upstream)
        await response.write(ChunkWriter.DONE)
        await response.write_eof()
        return response
    finally:
        state.open_streams -= 1
        if response.prepared:
            response.stop_streaming()
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                await opening


async def _relay(exchange: _Exchange, response: EventSourceResponse, upstream: SaiStream) -> None:
    """Forward SAI's body piece by piece, then the finish and usage frames."""
    async with upstream:
        exchange.model = upstream.headers.get("model") or exchange.model
        writer = ChunkWriter(exchange.completion_id, exchange.created, exchange.model)
        if not response.prepared:
            await response.prepare(exchange.request)
        await response.write(writer.role())
        chars = 0
        try:
            async for piece in upstream.text():
                if exchange.first_byte is None:
                    exchange.first_byte = time.monotonic()
                chars += len(piece)
                await response.write(writer.content(piece))
        except UpstreamError as error:
            # Mid-stream: report in-band; never let a broken body look like "stop".
            log.warning(
                "upstream broke off mid-stream", extra={"error": error.code, "chars_sent": chars}
            )
            exchange.outcome, exchange.finish_reason = error.code or "error", "error"
            if exchange.settings.error_mode == "http":
                await response.write(writer.error(error.body()))
            else:
                await response.write(writer.content("\n\n" + error.chat_text()))
                await response.write(writer.finish("error"))
            return
    exchange.succeeded(upstream.headers, chars)
    await response.write(writer.finish("stop"))
    if exchange.chat.include_usage:
        await response.write(
            writer.usage(usage(exchange.prompt_tokens, exchange.completion_tokens))
        )


async def _stream_error(
    exchange: _Exchange, response: EventSourceResponse, error: UpstreamError
) -> None:
    """Answer a failure before any content: the explanation, or an error frame in http mode."""
    exchange.failed(error)
    writer = ChunkWriter(exchange.completion_id, exchange.created, exchange.model)
    if not response.prepared:
        await response.prepare(exchange.request)
    if exchange.settings.error_mode == "http":
        await response.write(writer.error(error.body()))
        return
    await response.write(writer.role())
    await response.write(writer.content(error.chat_text()))
    await response.write(writer.finish(error.finish_reason))
    if exchange.chat.include_usage:
        await response.write(writer.usage(usage(0, 0)))
