"""Every setting, declared once: a field of :class:`Settings` with its default, the
environment variable and TOML key it is read from, and the parser of its raw text."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Final, Literal

from yarl import URL

from . import parse
from .otel import TracingConfig
from .parse import DEFAULT_AUTH_CHAIN, AuthHandlerName, Secret

__all__ = [
    "DEFAULTS",
    "OPTIONS",
    "ErrorMode",
    "LogFormat",
    "ModelConfig",
    "Option",
    "Settings",
    "redact_url",
]

ErrorMode = Literal["message", "http"]
LogFormat = Literal["json", "text"]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A model name the clients use, and the SAI template that answers it."""

    name: str
    template_id: str
    model_override: str | None = None


@dataclass(frozen=True, slots=True)
class Option:
    """Where a setting comes from: its environment name (the TOML key is its lower case),
    its TOML table, and the parser of its raw text."""

    env: str
    section: str
    parse: Callable[[str], Any]
    secret: bool = False
    key: str | None = None  # its TOML key, when not the environment name in lower case

    @property
    def toml_key(self) -> str:
        """Return the setting's key in its TOML table."""
        return self.key or self.env.lower()


def _opt(
    env: str,
    section: str,
    parse: Callable[[str], Any],
    *,
    secret: bool = False,
    key: str | None = None,
) -> Any:
    return {"option": Option(env, section, parse, secret, key)}


def _limit(env: str, default: int = 0) -> Any:
    """A limit of the [limits] table: 0 means none; its TOML key drops the LIMITS_ prefix."""
    return field(
        default=default,
        metadata=_opt(env, "limits", parse.limit_value, key=env.removeprefix("LIMITS_").lower()),
    )


def _limits_option(env: str, parse: Callable[[str], Any], *, secret: bool = False) -> Any:
    return _opt(env, "limits", parse, secret=secret, key=env.removeprefix("LIMITS_").lower())


@dataclass(frozen=True, slots=True)
class Settings:
    """Every runtime setting of saiproxy, validated; each field names its source."""

    sai_url: URL = field(metadata=_opt("SAI_URL", "upstream", parse.url))
    models: Mapping[str, ModelConfig] = field(default_factory=dict)  # [models.NAME] tables
    default_model: str = "sai-model"  # top-level default_model in the TOML file
    # From the standard OTEL_* variables only (saiproxy.base.otel); None: off.
    tracing: TracingConfig | None = None
    sai_template_id: str | None = field(
        default=None, metadata=_opt("SAI_TEMPLATE_ID", "upstream", parse.text)
    )
    sai_key: Secret | None = field(
        default=None, metadata=_opt("SAI_KEY", "upstream", Secret, secret=True)
    )
    sai_cookie: Secret | None = field(
        default=None, metadata=_opt("SAI_COOKIE", "upstream", Secret, secret=True)
    )
    # The cookie SAI's sign-in sets: a user's cookie counts as one client by its value.
    sai_session_cookie: str = field(
        default=".AspNetCore.Cookies", metadata=_opt("SAI_SESSION_COOKIE", "upstream", parse.text)
    )
    host: str = field(default="0.0.0.0", metadata=_opt("HOST", "server", parse.text))
    port: int = field(default=4000, metadata=_opt("PORT", "server", parse.port))
    workers: int = field(default=1, metadata=_opt("WORKERS", "server", parse.positive_int))
    event_loop: str = field(
        default="auto",
        metadata=_opt("EVENT_LOOP", "server", parse.choice("auto", "asyncio", "uvloop")),
    )
    request_timeout: float = field(
        default=600.0, metadata=_opt("REQUEST_TIMEOUT", "upstream", parse.positive_float)
    )
    connect_timeout: float = field(
        default=10.0, metadata=_opt("CONNECT_TIMEOUT", "upstream", parse.positive_float)
    )
    max_retries: int = field(
        default=3, metadata=_opt("MAX_RETRIES", "upstream", parse.non_negative_int)
    )
    retry_backoff: float = field(
        default=0.5, metadata=_opt("RETRY_BACKOFF", "upstream", parse.non_negative_float)
    )
    upstream_connections: int = field(
        default=0, metadata=_opt("UPSTREAM_CONNECTIONS", "upstream", parse.non_negative_int)
    )
    max_context_tokens: int = field(
        default=128_000, metadata=_opt("MAX_CONTEXT_TOKENS", "server", parse.positive_int)
    )
    max_body_bytes: int = field(
        default=8 * 1024 * 1024, metadata=_opt("MAX_BODY_BYTES", "server", parse.positive_int)
    )
    max_answer_bytes: int = field(
        default=32 * 1024 * 1024, metadata=_opt("MAX_ANSWER_BYTES", "upstream", parse.positive_int)
    )
    keepalive_timeout: float = field(
        default=75.0, metadata=_opt("KEEPALIVE_TIMEOUT", "server", parse.positive_float)
    )
    body_read_timeout: float = field(
        default=30.0, metadata=_opt("BODY_READ_TIMEOUT", "server", parse.positive_float)
    )
    error_mode: ErrorMode = field(
        default="message", metadata=_opt("ERROR_MODE", "server", parse.choice("message", "http"))
    )
    strict_models: bool = field(
        default=False, metadata=_opt("STRICT_MODELS", "server", parse.boolean)
    )
    auth_chain: tuple[AuthHandlerName, ...] = field(
        default=DEFAULT_AUTH_CHAIN, metadata=_opt("AUTH_CHAIN", "auth", parse.auth_chain)
    )
    placeholders: tuple[str, ...] = field(
        default=("raspberry",), metadata=_opt("USER_KEY_PLACEHOLDERS", "auth", parse.lower_names)
    )
    proxy_api_keys: tuple[Secret, ...] = field(
        default=(), metadata=_opt("PROXY_API_KEYS", "auth", parse.secrets, secret=True)
    )
    # Read usage (GET /limits/usage, saiproxy usage): every client's; a proxy key reads its own.
    admin_api_keys: tuple[Secret, ...] = field(
        default=(), metadata=_opt("ADMIN_API_KEYS", "auth", parse.secrets, secret=True)
    )
    verbose_logging: bool = field(
        default=False, metadata=_opt("VERBOSE_LOGGING", "logging", parse.boolean)
    )
    log_level: str = field(
        default="info",
        metadata=_opt("LOG_LEVEL", "logging", parse.choice("debug", "info", "warning", "error")),
    )
    log_dir: str = field(default="logs", metadata=_opt("LOG_DIR", "logging", parse.text))
    log_file: bool = field(default=True, metadata=_opt("LOG_FILE", "logging", parse.boolean))
    log_format: LogFormat = field(
        default="json", metadata=_opt("LOG_FORMAT", "logging", parse.choice("json", "text"))
    )
    log_max_bytes: int = field(
        default=5 * 1024 * 1024, metadata=_opt("LOG_MAX_BYTES", "logging", parse.positive_int)
    )
    log_backups: int = field(
        default=3, metadata=_opt("LOG_BACKUPS", "logging", parse.non_negative_int)
    )
    shutdown_delay: float = field(
        default=2.0, metadata=_opt("SHUTDOWN_DELAY", "server", parse.non_negative_float)
    )
    shutdown_timeout: float = field(
        default=30.0, metadata=_opt("SHUTDOWN_TIMEOUT", "server", parse.non_negative_float)
    )
    ping_interval: float = field(
        default=15.0, metadata=_opt("PING_INTERVAL", "server", parse.positive_float)
    )
    tool_repair_retries: int = field(
        default=1, metadata=_opt("TOOL_REPAIR_RETRIES", "upstream", parse.non_negative_int)
    )
    # SAI calls one client request may make beyond one per prompt: retries, 429
    # fallbacks and structured-output repairs of all its prompts together.
    request_extra_calls: int = field(
        default=4, metadata=_opt("REQUEST_EXTRA_CALLS", "upstream", parse.non_negative_int)
    )
    prompt_concurrency: int = field(
        default=4, metadata=_opt("PROMPT_CONCURRENCY", "upstream", parse.positive_int)
    )
    max_json_depth: int = field(
        default=64, metadata=_opt("MAX_JSON_DEPTH", "server", parse.positive_int)
    )
    max_schema_bytes: int = field(
        default=128 * 1024, metadata=_opt("MAX_SCHEMA_BYTES", "server", parse.positive_int)
    )
    schema_check_timeout: float = field(
        default=2.0, metadata=_opt("SCHEMA_CHECK_TIMEOUT", "server", parse.positive_float)
    )
    allow_open_relay: bool = field(
        default=False, metadata=_opt("ALLOW_OPEN_RELAY", "auth", parse.boolean)
    )
    # [limits] (docs/limits.md): per client and for the shared SAI credentials; 0 = no limit.
    limits_url: Secret | None = field(
        default=None, metadata=_limits_option("LIMITS_URL", parse.store_url, secret=True)
    )
    limits_replicas: int = field(
        default=1, metadata=_limits_option("LIMITS_REPLICAS", parse.positive_int)
    )
    limits_timeout: float = field(
        default=0.25, metadata=_limits_option("LIMITS_TIMEOUT", parse.positive_float)
    )
    limits_probe_interval: float = field(
        default=1.0, metadata=_limits_option("LIMITS_PROBE_INTERVAL", parse.positive_float)
    )
    limits_lease: float = field(
        default=30.0, metadata=_limits_option("LIMITS_LEASE", parse.positive_float)
    )
    limits_renew_interval: float = field(
        default=10.0, metadata=_limits_option("LIMITS_RENEW_INTERVAL", parse.positive_float)
    )
    limits_output_reserve: int = field(
        default=1024, metadata=_limits_option("LIMITS_OUTPUT_RESERVE", parse.limit_value)
    )
    limits_budget_period: str = field(
        default="day", metadata=_limits_option("LIMITS_BUDGET_PERIOD", parse.choice("day", "month"))
    )
    limits_prefix: str = field(
        default="saiproxy:", metadata=_limits_option("LIMITS_PREFIX", parse.text)
    )
    limits_client_rpm: int = _limit("LIMITS_CLIENT_RPM")
    limits_client_tpm: int = _limit("LIMITS_CLIENT_TPM")
    limits_client_concurrency: int = _limit("LIMITS_CLIENT_CONCURRENCY")
    limits_client_budget: int = _limit("LIMITS_CLIENT_BUDGET")
    limits_global_rpm: int = _limit("LIMITS_GLOBAL_RPM")
    limits_global_tpm: int = _limit("LIMITS_GLOBAL_TPM")
    limits_global_concurrency: int = _limit("LIMITS_GLOBAL_CONCURRENCY")
    limits_global_budget: int = _limit("LIMITS_GLOBAL_BUDGET")
    # [state] (docs/protocols.md, "Stored responses and conversations"): where stored
    # Responses, their items and conversations live, for how long, and how much.
    state_url: Secret | None = field(
        default=None, metadata=_opt("STATE_URL", "state", parse.store_url, secret=True, key="url")
    )
    state_timeout: float = field(
        default=1.0, metadata=_opt("STATE_TIMEOUT", "state", parse.positive_float, key="timeout")
    )
    state_prefix: str = field(
        default="saiproxy:state:", metadata=_opt("STATE_PREFIX", "state", parse.text, key="prefix")
    )
    responses_ttl: float = field(
        default=7 * 86_400.0,
        metadata=_opt("RESPONSES_TTL", "state", parse.positive_float, key="responses_ttl"),
    )
    background_lease: float = field(
        default=15.0,
        metadata=_opt("BACKGROUND_LEASE", "state", parse.positive_float, key="background_lease"),
    )
    state_client_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_opt("STATE_CLIENT_BYTES", "state", parse.non_negative_int, key="client_bytes"),
    )
    state_max_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=_opt("STATE_MAX_BYTES", "state", parse.positive_int, key="max_bytes"),
    )

    def model_for(self, name: str | None) -> ModelConfig | None:
        """Return the model serving ``name``: unknown names map to the default unless strict."""
        if name is None or name == "":
            return self.models[self.default_model]
        found = self.models.get(name)
        if found is None and not self.strict_models:
            return self.models[self.default_model]
        return found

    def secrets(self) -> tuple[Secret, ...]:
        """Return every configured secret, for log masking."""
        values = [
            self.sai_key, self.sai_cookie, self.limits_url, self.state_url, *self.proxy_api_keys,
            *self.admin_api_keys,
        ]  # fmt: skip
        if self.sai_url.password:
            values.append(Secret(self.sai_url.password))
        return tuple(value for value in values if value is not None)

    @property
    def loggable_sai_url(self) -> str:
        """Return SAI_URL without its user info: a password in it must never be logged."""
        return redact_url(self.sai_url)


def redact_url(url: URL) -> str:
    """Return ``url`` as text without user name and password."""
    return str(url.with_user(None)) if url.user or url.password else str(url)


# Every setting read from the environment or the TOML file, by field name.
OPTIONS: Final[Mapping[str, Option]] = {
    f.name: f.metadata["option"] for f in fields(Settings) if "option" in f.metadata
}
DEFAULTS: Final[Mapping[str, Any]] = {
    f.name: f.default for f in fields(Settings) if f.default is not MISSING
}
