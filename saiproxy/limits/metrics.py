"""The limits' metrics, and the modes they run in."""

from __future__ import annotations

from typing import Final, Literal

from ..base.metrics import Metrics

__all__ = ["MODES", "LimitMetrics", "Mode"]

Mode = Literal["local", "shared", "fallback"]
MODES: Final[tuple[Mode, ...]] = ("local", "shared", "fallback")


class LimitMetrics:
    """The limits' metrics: per client only for the configured proxy keys (a bounded set)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        counter = metrics.counter
        self.mode = metrics.gauge(
            "saiproxy_limits_mode",
            "1 for the mode the limits run in: local (no store), shared, fallback (store down).",
            "mode",
        )
        self.limited = counter(
            "saiproxy_limited_requests",
            "Requests refused by a limit, by the limit that refused them.",
            "reason",
        )
        self.store_failures = counter(
            "saiproxy_limits_store_failures", "Calls to the limits store that failed or timed out."
        )
        self.client_requests = counter(
            "saiproxy_client_requests", "Admitted requests per proxy key (its hashed ID).", "client"
        )
        self.client_tokens = counter(
            "saiproxy_client_tokens",
            "Tokens per proxy key (its hashed ID), input and output.",
            "client", "direction",
        )  # fmt: skip
        self.client_limited = counter(
            "saiproxy_client_limited_requests",
            "Refused requests per proxy key (its hashed ID).",
            "client",
        )

    def set_mode(self, mode: Mode) -> None:
        for name in MODES:
            self.mode.labels(name).set(1 if name == mode else 0)
