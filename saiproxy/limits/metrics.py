"""The limits' metrics, and the modes they run in."""

from __future__ import annotations

from typing import Final, Literal

from prometheus_client import Counter, Gauge

from ..base.metrics import Metrics

__all__ = ["MODES", "LimitMetrics", "Mode"]

Mode = Literal["local", "shared", "fallback"]
MODES: Final[tuple[Mode, ...]] = ("local", "shared", "fallback")


class LimitMetrics:
    """The limits' metrics: per client only for the configured proxy keys (a bounded set)."""

    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.metrics = metrics
        self.mode = Gauge(
            "saiproxy_limits_mode",
            "1 for the mode the limits run in: local (no store), shared, fallback (store down).",
            ["mode"],
            registry=registry,
        )
        self.limited = Counter(
            "saiproxy_limited_requests",
            "Requests refused by a limit, by the limit that refused them.",
            ["reason"],
            registry=registry,
        )
        self.store_failures = Counter(
            "saiproxy_limits_store_failures",
            "Calls to the limits store that failed or timed out.",
            registry=registry,
        )
        self.client_requests = Counter(
            "saiproxy_client_requests",
            "Admitted requests per proxy key (its hashed ID).",
            ["client"],
            registry=registry,
        )
        self.client_tokens = Counter(
            "saiproxy_client_tokens",
            "Tokens per proxy key (its hashed ID), input and output.",
            ["client", "direction"],
            registry=registry,
        )
        self.client_limited = Counter(
            "saiproxy_client_limited_requests",
            "Refused requests per proxy key (its hashed ID).",
            ["client"],
            registry=registry,
        )

    def set_mode(self, mode: Mode) -> None:
        for name in MODES:
            self.mode.labels(name).set(1 if name == mode else 0)
