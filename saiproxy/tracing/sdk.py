"""The OpenTelemetry SDK side of tracing: provider, sampler, exporter, a bounded batch queue.

Imported only when tracing is configured (the ``otel`` extra installs the
SDK). Each serving process builds one :class:`Pipeline` when its application
starts (after the fork, for WORKERS>1) and shuts it down in the drain.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Final, Protocol

import orjson
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from .. import __version__
from ..base.keys import REQUEST_ID
from ..base.log import tracing_logger as log
from ..base.otel import SCHEMA_URL, TracingConfig
from ..logs.mask import Masker

__all__ = [
    "FLUSH_TIMEOUT",
    "Attempt",
    "BoundedBatchProcessor",
    "Dropped",
    "Pipeline",
    "content_json",
]


_PROPAGATOR: Final = TraceContextTextMapPropagator()
_INSTRUMENTATION: Final = "saiproxy"
# Seconds the queued spans get to go out after the drain: within the margin
# that stop_grace_period leaves above SHUTDOWN_DELAY + SHUTDOWN_TIMEOUT.
FLUSH_TIMEOUT: Final = 5.0


class _Credential(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def source(self) -> str: ...


class Attempt(Protocol):
    """What an attempt's client span reads of a SAI call (upstream/sai.py's SaiCall)."""

    span: Any  # the attempt's span while it is open
    url: URL
    template_id: str
    attempts: int
    retries: int

    @property
    def credential(self) -> _Credential: ...
    @property
    def tried(self) -> Sequence[_Credential]: ...


class Dropped:
    """Spans dropped on the way out, for the metric (read when scraped)."""

    __slots__ = ("_warned", "count")

    def __init__(self) -> None:
        self.count = 0
        self._warned = False

    def add(self, spans: int, why: str) -> None:
        self.count += spans
        if not self._warned:
            self._warned = True  # once per process: a collector down for an hour is one line
            log.warning(
                "trace spans dropped (%s); requests are not affected, "
                "saiproxy_trace_spans_dropped counts them",
                why,
            )


# A collector that is down makes the exporter log every failed batch and every
# retry: the one WARNING is Dropped's, the count is the metric. (Its lines
# still show with VERBOSE_LOGGING, which logs at DEBUG.)
_EXPORTER_LOGGER: Final = logging.getLogger("opentelemetry.exporter")


class BoundedBatchProcessor(SpanProcessor):
    """Queue ended spans (bounded) and export them in batches from a thread.

    The SDK's BatchSpanProcessor does the same but does not say how many
    spans it dropped: here a full queue and a failed export are counted
    (:attr:`dropped`), so a collector that is down costs requests nothing
    and shows in the metrics. The request path only appends to a deque.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int,
        max_batch: int,
        delay: float,
    ) -> None:
        self._exporter = exporter
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._max_queue = max_queue_size
        self._max_batch = max_batch
        self._delay = delay
        self._wake = threading.Event()
        # Spans queued and spans handled (sent or dropped) so far: a flush waits
        # until every span queued before it is handled.
        self._queued = 0
        self._handled = 0
        self._progress = threading.Condition()
        self._stopping = False
        self.dropped = Dropped()
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            _EXPORTER_LOGGER.setLevel(logging.CRITICAL)
        self._thread = threading.Thread(target=self._run, name="saiproxy-otel", daemon=True)
        self._thread.start()

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        if len(self._queue) >= self._max_queue:
            self.dropped.add(1, "the export queue is full: the collector is slow or unreachable")
            return
        self._queue.append(span)
        self._queued += 1  # only the loop's thread ends spans: no lock needed
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._export_all()
            if self._stopping:
                return

    def _export_all(self) -> None:
        queue = self._queue
        while queue:
            batch = [queue.popleft() for _ in range(min(self._max_batch, len(queue)))]
            try:
                result = self._exporter.export(batch)
            except Exception:  # an exporter must not raise; if it does, the spans are gone
                log.debug("span export raised", exc_info=True)
                result = SpanExportResult.FAILURE
            if result is not SpanExportResult.SUCCESS:
                self.dropped.add(len(batch), "the collector did not take them")
            with self._progress:
                self._handled += len(batch)
                self._progress.notify_all()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        target = self._queued
        self._wake.set()
        with self._progress:
            return self._progress.wait_for(lambda: self._handled >= target, timeout_millis / 1000)

    def shutdown(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Export what is queued within ``timeout`` seconds; count what is left as dropped."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.dropped.add(len(self._queue), "the collector was too slow at shutdown")
            self._queue.clear()
        self._exporter.shutdown()  # an export still retrying gives up


def _sampler(config: TracingConfig) -> sampling.Sampler:
    ratio = 1.0 if config.sampler_arg is None else config.sampler_arg
    name = config.sampler
    root: sampling.Sampler
    if name.endswith("always_off"):
        root = sampling.ALWAYS_OFF
    elif name.endswith("traceidratio"):
        root = sampling.TraceIdRatioBased(ratio)
    else:
        root = sampling.ALWAYS_ON
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Headers (OTEL_EXPORTER_OTLP_HEADERS, often a token) are read by the
    # exporter itself and never pass through saiproxy's settings or logs.
    return OTLPSpanExporter(endpoint=config.endpoint, timeout=config.export_timeout)


class Pipeline:
    """One process's provider, tracer and export queue; and the span work the hooks delegate."""

    def __init__(
        self, config: TracingConfig, secrets: Sequence[str], exporter: SpanExporter | None
    ) -> None:
        self.config = config
        resource = Resource.create(
            {
                **config.resource_attributes,
                "service.name": config.service_name,
                "service.version": __version__,
                # Each worker is a process with its own provider: its spans say which.
                "process.pid": os.getpid(),
            }
        )
        self.processor = BoundedBatchProcessor(
            exporter or _exporter(config),
            max_queue_size=config.max_queue_size,
            max_batch=config.max_export_batch_size,
            delay=config.schedule_delay,
        )
        self.provider = TracerProvider(
            resource=resource, sampler=_sampler(config), shutdown_on_exit=False
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer(_INSTRUMENTATION, __version__, schema_url=SCHEMA_URL)
        self._masker = Masker(secrets)

    def shutdown(self) -> None:
        self.processor.shutdown()

    # --- the server span

    def start_server_span(self, request: web.Request) -> tuple[Span, object]:
        parent = _PROPAGATOR.extract(request.headers)
        url = request.url
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "server.address": url.host or "",
            "network.protocol.version": f"{request.version.major}.{request.version.minor}",
        }
        if url.port is not None:
            attributes["server.port"] = url.port
        user_agent = request.headers.get("User-Agent")
        if user_agent:
            attributes["user_agent.original"] = user_agent[:256]
        route = request.match_info.route.resource
        name = request.method
        if route is not None:
            attributes["http.route"] = route.canonical
            name = f"{request.method} {route.canonical}"
        span = self.tracer.start_span(name, parent, SpanKind.SERVER, attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    def end_server_span(self, span: Span, request: web.Request, status: int, token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]
        if span.is_recording():
            span.set_attribute("http.response.status_code", status)
            request_id = request.get(REQUEST_ID)
            if request_id is not None:
                span.set_attribute("saiproxy.request_id", request_id)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
                span.set_attribute("error.type", str(status))
        span.end()

    @staticmethod
    def log_ids(span: Span) -> tuple[str, str] | None:
        context = span.get_span_context()
        if not context.trace_flags.sampled:
            return None
        return f"{context.trace_id:032x}", f"{context.span_id:016x}"

    def masked_json(self, value: Any) -> str:
        return self._masker.mask_unique(content_json(value))

    @staticmethod
    def set_error(span: Span, error_type: str) -> None:
        span.set_status(Status(StatusCode.ERROR, error_type))

    # --- children

    @contextlib.contextmanager
    def child(self, parent: Span, name: str, attributes: dict[str, Any]) -> Iterator[Span]:
        context = trace.set_span_in_context(parent, Context())
        span = self.tracer.start_span(name, context, SpanKind.INTERNAL, attributes or None)
        try:
            yield span
        except BaseException as exc:
            span.set_attribute("error.type", getattr(exc, "code", None) or type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR))
            raise
        finally:
            span.end()

    def start_attempt(self, call: Attempt, headers: dict[str, str]) -> Span:
        url = call.url
        credential = call.credential
        attributes: dict[str, Any] = {
            "http.request.method": "POST",
            "server.address": url.host or "",
            "url.full": str(url.with_query(None)),
            "gen_ai.provider.name": "sai",
            "saiproxy.sai.attempt": call.attempts,
            "saiproxy.sai.retry": call.retries,
            "saiproxy.sai.fallback": bool(call.tried) and credential != call.tried[0],
            "saiproxy.credential.kind": credential.kind,
            "saiproxy.credential.source": credential.source,
            "saiproxy.template_id": call.template_id,
        }
        if url.port is not None:
            attributes["server.port"] = url.port
        span = self.tracer.start_span("POST", None, SpanKind.CLIENT, attributes)
        _PROPAGATOR.inject(headers, trace.set_span_in_context(span))
        return span


def content_json(value: Any) -> str:
    """Return ``value`` as the JSON text a content attribute holds."""
    return orjson.dumps(value).decode()
