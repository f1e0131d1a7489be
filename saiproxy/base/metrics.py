"""Prometheus metrics: what the proxy served and how SAI behaved. No per-user labels."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.openmetrics import exposition as openmetrics

__all__ = ["LATENCY_BUCKETS", "Metrics", "metrics_response"]

LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The process's metrics, in a registry of their own (one per application)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # labels() takes a lock and builds a tuple on every call; the label sets
        # here are few and fixed, so the children are kept.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        counter, gauge, histogram = self.counter, self.gauge, self._histogram
        self.requests = counter(
            "saiproxy_requests",
            "HTTP requests served, by route, status and outcome.",
            "path", "status", "outcome",
        )  # fmt: skip
        self.latency = histogram(
            "saiproxy_request_latency_seconds",
            "Time from request to the end of the answer, chat completions only.",
        )
        self.ttfb = histogram(
            "saiproxy_time_to_first_byte_seconds",
            "Time from request to SAI's first piece of the answer.",
        )
        self.upstream_attempts = counter(
            "saiproxy_upstream_attempts",
            "Calls made to SAI, by HTTP status (or 'timeout' / 'connection_error').",
            "status",
        )
        self.retries = counter(
            "saiproxy_upstream_retries",
            "Retries of SAI calls, by the failure that caused them.",
            "reason",
        )
        self.fallbacks = counter(
            "saiproxy_credential_fallbacks", "Rate-limited calls moved to SAI_COOKIE."
        )
        self.tool_calls_unrecognised = counter(
            "saiproxy_tool_calls_unrecognised",
            "Tool-call blocks in SAI's answers that were left as text, by reason.",
            "reason",
        )
        self.log_write_failures = gauge(
            "saiproxy_log_write_failures",
            "Batches of log lines this process failed to write since it started.",
        )
        self.trace_spans_dropped = gauge(
            "saiproxy_trace_spans_dropped",
            "Trace spans this process dropped since it started: export queue full or "
            "collector unreachable (0 with tracing off).",
        )
        self.in_flight = gauge("saiproxy_in_flight_requests", "Chat completions being served now.")
        self.open_streams = gauge("saiproxy_open_streams", "Streaming answers open now.")

    def counter(self, name: str, documentation: str, *labels: str) -> Counter:
        """Return a new counter in this registry."""
        return Counter(name, documentation, labels, registry=self.registry)

    def gauge(self, name: str, documentation: str, *labels: str) -> Gauge:
        """Return a new gauge in this registry."""
        return Gauge(name, documentation, labels, registry=self.registry)

    def _histogram(self, name: str, documentation: str) -> Histogram:
        """Return a latency histogram, by whether the answer streamed."""
        return Histogram(
            name, documentation, ["stream"], buckets=LATENCY_BUCKETS, registry=self.registry
        )

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """Return the labelled child of a metric, looked up once per label set."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self, *, openmetrics_format: bool = False) -> bytes:
        """Return the text exposition format, or OpenMetrics (with the latencies' exemplars)."""
        if openmetrics_format:
            body: bytes = openmetrics.generate_latest(self.registry)  # type: ignore[no-untyped-call]
            return body
        return generate_latest(self.registry)


def metrics_response(metrics: Metrics, accept: str = "") -> web.Response:
    """Return the metrics as a Prometheus text response, OpenMetrics when the scrape asks.

    Only OpenMetrics carries exemplars (the trace ID of a latency observation).
    """
    wants_openmetrics = "application/openmetrics-text" in accept
    response = web.Response(body=metrics.render(openmetrics_format=wants_openmetrics))
    response.headers["Content-Type"] = (
        openmetrics.CONTENT_TYPE_LATEST if wants_openmetrics else CONTENT_TYPE_LATEST
    )
    return response
