"""Request handlers: parse, call SAI, answer. Translation lives in translate.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
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
from .metrics import Metrics, metrics_response
from .sai import SaiCall, SaiStream
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
class _Outcome:
    """What one completion ended as, for the finish log line."""

    started: float
    metrics: Metrics
    stream: bool
    status: int = 200
    outcome: str = "ok"
    finish_reason: str | None = None
    first_byte: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def mark_first_byte(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.monotonic()

    def finish(self) -> None:
        """Log the finish line and record the latency figures."""
        now = time.monotonic()
        latency = now - self.started
        generating = now - self.first_byte if self.first_byte is not None else 0.0
        stream = "true" if self.stream else "false"
        self.metrics.latency.labels(stream).observe(latency)
        if self.first_byte is not None:
            self.metrics.ttfb.labels(stream).observe(self.first_byte - self.started)
        log.info(
            "response finished",
            extra={
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
                **self.extra,
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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Answer an OpenAI chat completion from a SAI template execution."""
    settings = request.app[SETTINGS]
    started = time.monotonic()
    body = await _read_body(request, settings.max_body_bytes)
    chat = parse_chat_request(body)
    model = _model(settings, chat)
    log.info(
        "request received",
        extra={
            "path": request.path,
            "stream": chat.stream,
            "model": model.name,
            "requested_model": chat.model,
            "messages": len(chat.messages),
            "roles": chat.role_counts(),
            "chars": chat.chars,
            "unwrapped": chat.unwrapped,
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
    if settings.verbose_logging:
        log.debug(
            "message previews",
            extra={"previews": [f"{m.role}: {m.text[:80]}" for m in chat.messages]},
        )

    outcome = _Outcome(started, request.app[METRICS], chat.stream, model=model.name)
    request.app[METRICS].in_flight.inc()
    request_id = request[REQUEST_ID]
    completion_id = f"chatcmpl-{request_id}-{uuid.uuid4().hex[:12]}"
    created = int(time.time())
    try:
        call: SaiCall | None = None
        early: UpstreamError | None = None
        if chat.estimated_tokens > settings.max_context_tokens:
            log.info(
                "context too long, not calling SAI",
                extra={
                    "estimated_tokens": chat.estimated_tokens,
                    "limit": settings.max_context_tokens,
                },
            )
            early = ContextTooLong(chat.estimated_tokens, settings.max_context_tokens)
        else:
            credential = request.app[AUTH_CHAIN].select(request, body)
            payload = orjson.dumps(sai_payload(chat.messages, int(time.time() * 1000)))
            if settings.verbose_logging:
                log.debug("SAI payload built", extra={"payload_bytes": len(payload)})
            call = request.app[SAI].new_call(model, payload, credential, request_id)
        if chat.stream:
            return await _stream(request, chat, call, early, outcome, completion_id, created)
        return await _complete(request, chat, call, early, outcome, completion_id, created)
    except asyncio.CancelledError:
        outcome.outcome, outcome.status = "client_disconnected", 499
        raise
    except Exception as exc:
        outcome.outcome = type(exc).__name__
        outcome.status = getattr(exc, "status", 500)
        raise
    finally:
        request[OUTCOME] = outcome.outcome
        request.app[METRICS].in_flight.dec()
        outcome.finish()


def _error_completion(
    error: UpstreamError, outcome: _Outcome, completion_id: str, created: int, model: str
) -> web.Response:
    outcome.outcome, outcome.finish_reason = error.code or "error", error.finish_reason
    return _json(
        completion(
            completion_id=completion_id,
            created=created,
            model=model,
            text=error.chat_text(),
            finish_reason=error.finish_reason,
            usage_=usage(0, 0),
        )
    )


async def _complete(
    request: web.Request,
    chat: ChatRequest,
    call: SaiCall | None,
    early: UpstreamError | None,
    outcome: _Outcome,
    completion_id: str,
    created: int,
) -> web.Response:
    settings = request.app[SETTINGS]
    model_name = outcome.model or settings.default_model
    try:
        if early is not None:
            raise early
        assert call is not None
        answer = await request.app[SAI].fetch(call)
    except UpstreamError as error:
        if settings.error_mode == "http":
            raise
        return _error_completion(error, outcome, completion_id, created, model_name)
    outcome.first_byte = answer.opened_at
    prompt = header_tokens(answer.headers, "prompttokens", chat.chars)
    completion_tokens = header_tokens(answer.headers, "completiontokens", len(answer.text))
    model_name = answer.headers.get("model") or model_name
    outcome.prompt_tokens, outcome.completion_tokens = prompt, completion_tokens
    outcome.model, outcome.finish_reason = model_name, "stop"
    return _json(
        completion(
            completion_id=completion_id,
            created=created,
            model=model_name,
            text=answer.text,
            finish_reason="stop",
            usage_=usage(prompt, completion_tokens),
        )
    )


async def _stream(
    request: web.Request,
    chat: ChatRequest,
    call: SaiCall | None,
    early: UpstreamError | None,
    outcome: _Outcome,
    completion_id: str,
    created: int,
) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    state = request.app[STATE]
    response = EventSourceResponse(
        headers=SSE_HEADERS,
        sep="\n",
        allow_all_methods=True,
        ping_interval=settings.ping_interval,
    )
    opening: asyncio.Future[SaiStream]
    if early is not None:
        opening = asyncio.get_running_loop().create_future()
        opening.set_exception(early)
    else:
        assert call is not None
        opening = asyncio.ensure_future(request.app[SAI].open(call))
    state.open_streams.add(response)
    request.app[METRICS].open_streams.inc()
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
            await _stream_error(
                request,
                response,
                error,
                outcome,
                completion_id,
                created,
                settings.error_mode,
                chat.include_usage,
            )
            return response
        return await _relay(request, response, upstream, chat, outcome, completion_id, created)
    finally:
        state.open_streams.discard(response)
        request.app[METRICS].open_streams.dec()
        if response.prepared:
            response.stop_streaming()
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                await opening


async def _relay(
    request: web.Request,
    response: EventSourceResponse,
    upstream: SaiStream,
    chat: ChatRequest,
    outcome: _Outcome,
    completion_id: str,
    created: int,
) -> EventSourceResponse:
    settings = request.app[SETTINGS]
    async with upstream:
        model_name = upstream.headers.get("model") or outcome.model or settings.default_model
        outcome.model = model_name
        writer = ChunkWriter(completion_id, created, model_name)
        if not response.prepared:
            await response.prepare(request)
        await response.write(writer.role())
        chars = 0
        try:
            async for piece in upstream.text():
                outcome.mark_first_byte()
                chars += len(piece)
                await response.write(writer.content(piece))
        except UpstreamError as error:
            # Mid-stream: report in-band; never let a broken body look like "stop".
            log.warning(
                "upstream broke off mid-stream", extra={"error": error.code, "chars_sent": chars}
            )
            outcome.outcome, outcome.finish_reason = error.code or "error", "error"
            if settings.error_mode == "http":
                await response.write(writer.error(error.body()))
            else:
                await response.write(writer.content("\n\n" + error.chat_text()))
                await response.write(writer.finish("error"))
            await response.write(writer.DONE)
            await response.write_eof()
            return response
    prompt = header_tokens(upstream.headers, "prompttokens", chat.chars)
    completion_tokens = header_tokens(upstream.headers, "completiontokens", chars)
    outcome.prompt_tokens, outcome.completion_tokens = prompt, completion_tokens
    outcome.finish_reason = "stop"
    await response.write(writer.finish("stop"))
    if chat.include_usage:
        await response.write(writer.usage(usage(prompt, completion_tokens)))
    await response.write(writer.DONE)
    await response.write_eof()
    return response


async def _stream_error(
    request: web.Request,
    response: EventSourceResponse,
    error: UpstreamError,
    outcome: _Outcome,
    completion_id: str,
    created: int,
    mode: str,
    include_usage: bool,
) -> None:
    outcome.outcome, outcome.finish_reason = error.code or "error", error.finish_reason
    writer = ChunkWriter(completion_id, created, outcome.model or "")
    if not response.prepared:
        await response.prepare(request)
    if mode == "http":
        await response.write(writer.error(error.body()))
    else:
        await response.write(writer.role())
        await response.write(writer.content(error.chat_text()))
        await response.write(writer.finish(error.finish_reason))
        if include_usage:
            await response.write(writer.usage(usage(0, 0)))
    await response.write(writer.DONE)
    await response.write_eof()
