"""Tracing's configuration, from the standard OTEL_* variables only (no OpenTelemetry import).

In the bottom layer: the settings read it with everything else, and tracing/ uses it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

__all__ = [
    "SCHEMA_URL",
    "SEMCONV_VERSION",
    "TracingConfig",
    "TracingConfigError",
    "tracing_config",
]

# The GenAI semantic conventions followed (still "Development"): names and
# attributes as in this release. OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental
# drops the names it deprecates (gen_ai.system).
SEMCONV_VERSION: Final = "1.37.0"
SCHEMA_URL: Final = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
_SAMPLERS: Final = frozenset(
    {
        "always_on", "always_off", "traceidratio",
        "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio",
    }
)  # fmt: skip


class TracingConfigError(ValueError):
    """An OTEL_* variable saiproxy cannot follow; ``variable`` names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable} {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Tracing as the standard OTEL_* variables describe it (:func:`tracing_config`)."""

    exporter: str  # "otlp" or "console"
    endpoint: str | None  # the traces URL (…/v1/traces); None: the SDK's default
    service_name: str
    sampler: str
    sampler_arg: float | None
    resource_attributes: Mapping[str, str]
    capture_content: bool
    latest_semconv: bool  # OTEL_SEMCONV_STABILITY_OPT_IN has gen_ai_latest_experimental
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay: float = 5.0  # seconds
    export_timeout: float = 10.0  # seconds, one export to the collector


def _truthy(raw: str | None) -> bool:
    return (raw or "").strip().lower() == "true"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise TracingConfigError(name, f"must be a whole number, not {raw!r}") from None
    if value <= 0:
        raise TracingConfigError(name, "must be positive")
    return value


def tracing_config(env: Mapping[str, str]) -> TracingConfig | None:
    """Return tracing's configuration from the standard variables; None when tracing is off.

    Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``,
    ``console``) or, with it unset, when an OTLP endpoint is set
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``).
    ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off.
    """
    exporter = _exporter(env)
    if exporter is None:
        return None
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    endpoint = traces_endpoint or (
        f"{base_endpoint.rstrip('/')}/v1/traces" if base_endpoint else None
    )
    sampler, sampler_arg = _sampler(env)
    attributes = _resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    service = (env.get("OTEL_SERVICE_NAME") or "").strip() or attributes.get(
        "service.name", "saiproxy"
    )
    opt_in = {value.strip() for value in env.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",")}
    return TracingConfig(
        exporter=exporter,
        endpoint=endpoint,
        service_name=service,
        sampler=sampler,
        sampler_arg=sampler_arg,
        resource_attributes=attributes,
        capture_content=_truthy(env.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT")),
        latest_semconv="gen_ai_latest_experimental" in opt_in,
        max_queue_size=_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        max_export_batch_size=_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
        schedule_delay=_int(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000,
        export_timeout=_int(env, "OTEL_EXPORTER_OTLP_TIMEOUT", 10000) / 1000,
    )


def _exporter(env: Mapping[str, str]) -> str | None:
    """Return the exporter the variables name ("otlp" or "console"); None: tracing is off."""
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return None
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not exporter:
        if not (traces_endpoint or base_endpoint):
            return None
        exporter = "otlp"
    if exporter == "none":
        return None
    if exporter not in ("otlp", "console"):
        raise TracingConfigError(
            "OTEL_TRACES_EXPORTER", f"is {exporter!r}; saiproxy exports to otlp, console or none"
        )
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    ) or "http/protobuf"
    if exporter == "otlp" and protocol.strip() != "http/protobuf":
        raise TracingConfigError(
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            f"is {protocol!r}; saiproxy sends OTLP as http/protobuf (port 4318)",
        )
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        raise TracingConfigError(
            "OTEL_TRACES_EXPORTER"
            if env.get("OTEL_TRACES_EXPORTER")
            else "OTEL_EXPORTER_OTLP_ENDPOINT",
            "turns tracing on, but the OpenTelemetry SDK is not installed: "
            "pip install 'saiproxy[otel]'",
        )
    return exporter


def _sampler(env: Mapping[str, str]) -> tuple[str, float | None]:
    """Return the sampler the variables name, and its ratio when it takes one."""
    sampler = (env.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").strip().lower()
    if sampler not in _SAMPLERS:
        raise TracingConfigError(
            "OTEL_TRACES_SAMPLER", f"is {sampler!r}; one of {', '.join(sorted(_SAMPLERS))}"
        )
    sampler_arg: float | None = None
    raw_arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if raw_arg and sampler.endswith("traceidratio"):
        try:
            sampler_arg = float(raw_arg)
        except ValueError:
            sampler_arg = -1.0
        if not 0.0 <= sampler_arg <= 1.0:
            raise TracingConfigError(
                "OTEL_TRACES_SAMPLER_ARG", f"must be a ratio from 0 to 1, not {raw_arg!r}"
            )
    return sampler, sampler_arg


def _resource_attributes(raw: str) -> dict[str, str]:
    """Parse ``key=value,key=value`` (values percent-decoded), as the specification says."""
    attributes: dict[str, str] = {}
    for pair in raw.split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    return attributes
