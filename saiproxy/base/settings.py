"""Settings: environment, Docker secrets and the TOML file, validated in one place.

Precedence for every setting: environment variable, then ``NAME_FILE`` (for
secrets), then the TOML file, then the built-in default. A value that names a
file under the secrets directory (``/run/secrets/``) is read from that file.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal

from yarl import URL

from .otel import TracingConfig, TracingConfigError, tracing_config

__all__ = [
    "DEFAULT_AUTH_CHAIN",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_MODEL_KEY",
    "MAX_LIMIT",
    "MODELS_TABLE",
    "MODEL_KEYS",
    "OPTIONS",
    "SECRETS_DIR",
    "AuthHandlerName",
    "ErrorMode",
    "LogFormat",
    "ModelConfig",
    "Option",
    "Secret",
    "Settings",
    "SettingsError",
    "known_toml_keys",
    "load_settings",
    "redact_url",
    "setting",
    "unknown_toml_keys",
]

SECRETS_DIR: Final = "/run/secrets"
DEFAULT_CONFIG_PATH: Final = "config/saiproxy.toml"


class AuthHandlerName(StrEnum):
    """The handlers AUTH_CHAIN may name (saiproxy/upstream/auth.py builds one for each)."""

    METADATA = "metadata"
    HEADER = "header"
    BEARER = "bearer"
    SYSTEM_KEY = "system_key"
    SYSTEM_COOKIE = "system_cookie"


DEFAULT_AUTH_CHAIN: Final = (
    AuthHandlerName.METADATA,
    AuthHandlerName.HEADER,
    AuthHandlerName.SYSTEM_KEY,
    AuthHandlerName.SYSTEM_COOKIE,
)

ErrorMode = Literal["message", "http"]
LogFormat = Literal["json", "text"]


class SettingsError(Exception):
    """A setting is missing or invalid; ``variable`` names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class Secret:
    """A secret string whose ``repr`` and ``str`` never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the value, for the one place that must send it."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return f"Secret(<{len(self._value)} chars>)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A model name the clients use, and the SAI template that answers it."""

    name: str
    template_id: str
    model_override: str | None = None


# --- parsers: each takes the raw text and returns the typed value or raises ValueError


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


# The largest limit a setting may name: the limits store's scripts count in Lua numbers
# (doubles), exact only below 2^53.
MAX_LIMIT: Final = 10**13


def _limit_value(raw: str) -> int:
    value = _non_negative_int(raw)
    if value > MAX_LIMIT:
        raise ValueError(f"must be at most {MAX_LIMIT}, got {value}")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {raw}")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError(f"must not be negative, got {raw}")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port number 0-65535, got {value}")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def _names(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _lower_names(raw: str) -> tuple[str, ...]:
    return tuple(name.lower() for name in _names(raw))


def _secrets(raw: str) -> tuple[Secret, ...]:
    return tuple(Secret(value) for value in _names(raw))


def _auth_chain(raw: str) -> tuple[AuthHandlerName, ...]:
    names = _names(raw)
    if not names:
        raise ValueError("must name at least one handler")
    known = ", ".join(AuthHandlerName)
    for name in names:
        if name not in AuthHandlerName.__members__.values():
            raise ValueError(f"unknown handler {name!r}; known: {known}")
    return tuple(AuthHandlerName(name) for name in names)


def _url(raw: str) -> URL:
    url = URL(raw.strip().rstrip("/"))
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return url


def _str(raw: str) -> str:
    return raw.strip()


def _store_url(raw: str) -> Secret:
    """A Valkey or Redis URL (it may hold a password, so it is kept as a secret)."""
    value = raw.strip()
    scheme = value.partition("://")[0].lower()
    if scheme not in ("redis", "rediss", "valkey", "valkeys", "unix"):
        raise ValueError("must be a redis://, rediss://, valkey://, valkeys:// or unix:// URL")
    return Secret(value)


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
        metadata=_opt(env, "limits", _limit_value, key=env.removeprefix("LIMITS_").lower()),
    )


def _limits_option(env: str, parse: Callable[[str], Any], *, secret: bool = False) -> Any:
    return _opt(env, "limits", parse, secret=secret, key=env.removeprefix("LIMITS_").lower())


@dataclass(frozen=True, slots=True)
class Settings:
    """Every runtime setting of saiproxy, validated; each field names its source."""

    sai_url: URL = field(metadata=_opt("SAI_URL", "upstream", _url))
    models: Mapping[str, ModelConfig] = field(default_factory=dict)  # [models.NAME] tables
    default_model: str = "sai-model"  # top-level default_model in the TOML file
    # From the standard OTEL_* variables only (saiproxy.base.otel); None: off.
    tracing: TracingConfig | None = None
    sai_template_id: str | None = field(
        default=None, metadata=_opt("SAI_TEMPLATE_ID", "upstream", _str)
    )
    sai_key: Secret | None = field(
        default=None, metadata=_opt("SAI_KEY", "upstream", Secret, secret=True)
    )
    sai_cookie: Secret | None = field(
        default=None, metadata=_opt("SAI_COOKIE", "upstream", Secret, secret=True)
    )
    # The cookie SAI's sign-in sets: a user's cookie counts as one client by its value.
    sai_session_cookie: str = field(
        default=".AspNetCore.Cookies", metadata=_opt("SAI_SESSION_COOKIE", "upstream", _str)
    )
    host: str = field(default="0.0.0.0", metadata=_opt("HOST", "server", _str))
    port: int = field(default=4000, metadata=_opt("PORT", "server", _port))
    workers: int = field(default=1, metadata=_opt("WORKERS", "server", _positive_int))
    event_loop: str = field(
        default="auto", metadata=_opt("EVENT_LOOP", "server", _choice("auto", "asyncio", "uvloop"))
    )
    request_timeout: float = field(
        default=600.0, metadata=_opt("REQUEST_TIMEOUT", "upstream", _positive_float)
    )
    connect_timeout: float = field(
        default=10.0, metadata=_opt("CONNECT_TIMEOUT", "upstream", _positive_float)
    )
    max_retries: int = field(default=3, metadata=_opt("MAX_RETRIES", "upstream", _non_negative_int))
    retry_backoff: float = field(
        default=0.5, metadata=_opt("RETRY_BACKOFF", "upstream", _non_negative_float)
    )
    upstream_connections: int = field(
        default=0, metadata=_opt("UPSTREAM_CONNECTIONS", "upstream", _non_negative_int)
    )
    max_context_tokens: int = field(
        default=128_000, metadata=_opt("MAX_CONTEXT_TOKENS", "server", _positive_int)
    )
    max_body_bytes: int = field(
        default=8 * 1024 * 1024, metadata=_opt("MAX_BODY_BYTES", "server", _positive_int)
    )
    max_answer_bytes: int = field(
        default=32 * 1024 * 1024, metadata=_opt("MAX_ANSWER_BYTES", "upstream", _positive_int)
    )
    keepalive_timeout: float = field(
        default=75.0, metadata=_opt("KEEPALIVE_TIMEOUT", "server", _positive_float)
    )
    body_read_timeout: float = field(
        default=30.0, metadata=_opt("BODY_READ_TIMEOUT", "server", _positive_float)
    )
    error_mode: ErrorMode = field(
        default="message", metadata=_opt("ERROR_MODE", "server", _choice("message", "http"))
    )
    strict_models: bool = field(default=False, metadata=_opt("STRICT_MODELS", "server", _bool))
    auth_chain: tuple[AuthHandlerName, ...] = field(
        default=DEFAULT_AUTH_CHAIN, metadata=_opt("AUTH_CHAIN", "auth", _auth_chain)
    )
    placeholders: tuple[str, ...] = field(
        default=("raspberry",), metadata=_opt("USER_KEY_PLACEHOLDERS", "auth", _lower_names)
    )
    proxy_api_keys: tuple[Secret, ...] = field(
        default=(), metadata=_opt("PROXY_API_KEYS", "auth", _secrets, secret=True)
    )
    # Read usage (GET /limits/usage, saiproxy usage): every client's; a proxy key reads its own.
    admin_api_keys: tuple[Secret, ...] = field(
        default=(), metadata=_opt("ADMIN_API_KEYS", "auth", _secrets, secret=True)
    )
    verbose_logging: bool = field(default=False, metadata=_opt("VERBOSE_LOGGING", "logging", _bool))
    log_level: str = field(
        default="info",
        metadata=_opt("LOG_LEVEL", "logging", _choice("debug", "info", "warning", "error")),
    )
    log_dir: str = field(default="logs", metadata=_opt("LOG_DIR", "logging", _str))
    log_file: bool = field(default=True, metadata=_opt("LOG_FILE", "logging", _bool))
    log_format: LogFormat = field(
        default="json", metadata=_opt("LOG_FORMAT", "logging", _choice("json", "text"))
    )
    log_max_bytes: int = field(
        default=5 * 1024 * 1024, metadata=_opt("LOG_MAX_BYTES", "logging", _positive_int)
    )
    log_backups: int = field(default=3, metadata=_opt("LOG_BACKUPS", "logging", _non_negative_int))
    shutdown_delay: float = field(
        default=2.0, metadata=_opt("SHUTDOWN_DELAY", "server", _non_negative_float)
    )
    shutdown_timeout: float = field(
        default=30.0, metadata=_opt("SHUTDOWN_TIMEOUT", "server", _non_negative_float)
    )
    ping_interval: float = field(
        default=15.0, metadata=_opt("PING_INTERVAL", "server", _positive_float)
    )
    tool_repair_retries: int = field(
        default=1, metadata=_opt("TOOL_REPAIR_RETRIES", "upstream", _non_negative_int)
    )
    # SAI calls one client request may make beyond one per prompt: retries, 429
    # fallbacks and structured-output repairs of all its prompts together.
    request_extra_calls: int = field(
        default=4, metadata=_opt("REQUEST_EXTRA_CALLS", "upstream", _non_negative_int)
    )
    prompt_concurrency: int = field(
        default=4, metadata=_opt("PROMPT_CONCURRENCY", "upstream", _positive_int)
    )
    max_json_depth: int = field(
        default=64, metadata=_opt("MAX_JSON_DEPTH", "server", _positive_int)
    )
    max_schema_bytes: int = field(
        default=128 * 1024, metadata=_opt("MAX_SCHEMA_BYTES", "server", _positive_int)
    )
    schema_check_timeout: float = field(
        default=2.0, metadata=_opt("SCHEMA_CHECK_TIMEOUT", "server", _positive_float)
    )
    allow_open_relay: bool = field(default=False, metadata=_opt("ALLOW_OPEN_RELAY", "auth", _bool))
    # [limits] (docs/limits.md): per client and for the shared SAI credentials; 0 = no limit.
    limits_url: Secret | None = field(
        default=None, metadata=_limits_option("LIMITS_URL", _store_url, secret=True)
    )
    limits_replicas: int = field(
        default=1, metadata=_limits_option("LIMITS_REPLICAS", _positive_int)
    )
    limits_timeout: float = field(
        default=0.25, metadata=_limits_option("LIMITS_TIMEOUT", _positive_float)
    )
    limits_probe_interval: float = field(
        default=1.0, metadata=_limits_option("LIMITS_PROBE_INTERVAL", _positive_float)
    )
    limits_lease: float = field(
        default=30.0, metadata=_limits_option("LIMITS_LEASE", _positive_float)
    )
    limits_renew_interval: float = field(
        default=10.0, metadata=_limits_option("LIMITS_RENEW_INTERVAL", _positive_float)
    )
    limits_output_reserve: int = field(
        default=1024, metadata=_limits_option("LIMITS_OUTPUT_RESERVE", _limit_value)
    )
    limits_budget_period: str = field(
        default="day", metadata=_limits_option("LIMITS_BUDGET_PERIOD", _choice("day", "month"))
    )
    limits_prefix: str = field(default="saiproxy:", metadata=_limits_option("LIMITS_PREFIX", _str))
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
        default=None, metadata=_opt("STATE_URL", "state", _store_url, secret=True, key="url")
    )
    state_timeout: float = field(
        default=1.0, metadata=_opt("STATE_TIMEOUT", "state", _positive_float, key="timeout")
    )
    state_prefix: str = field(
        default="saiproxy:state:", metadata=_opt("STATE_PREFIX", "state", _str, key="prefix")
    )
    responses_ttl: float = field(
        default=7 * 86_400.0,
        metadata=_opt("RESPONSES_TTL", "state", _positive_float, key="responses_ttl"),
    )
    background_lease: float = field(
        default=15.0,
        metadata=_opt("BACKGROUND_LEASE", "state", _positive_float, key="background_lease"),
    )
    state_client_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_opt("STATE_CLIENT_BYTES", "state", _non_negative_int, key="client_bytes"),
    )
    state_max_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=_opt("STATE_MAX_BYTES", "state", _positive_int, key="max_bytes"),
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
_DEFAULTS: Final[Mapping[str, Any]] = {
    f.name: f.default for f in fields(Settings) if f.default is not MISSING
}


# What the TOML file may hold besides the options' tables: the top-level keys
# read by load_settings, and the keys of each [models.NAME] table.
DEFAULT_MODEL_KEY: Final = "default_model"
MODELS_TABLE: Final = "models"
MODEL_KEYS: Final = ("template_id", "model_override")


def known_toml_keys() -> dict[str, frozenset[str]]:
    """Return every table of the TOML file and the keys it may hold, from the definitions.

    Derived from :data:`OPTIONS` (each option's table and key), so a setting
    added there is known here at once.
    """
    tables: dict[str, set[str]] = {}
    for option in OPTIONS.values():
        tables.setdefault(option.section, set()).add(option.toml_key)
    return {name: frozenset(keys) for name, keys in tables.items()}


def _closest(name: str, known: Collection[str]) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def unknown_toml_keys(toml: Mapping[str, Any]) -> list[str]:
    """Return a line for every key or table of ``toml`` no setting reads, with the closest
    known name (a misspelt key would otherwise be ignored without a word)."""
    tables = known_toml_keys()
    top = {*tables, MODELS_TABLE, DEFAULT_MODEL_KEY}
    problems: list[str] = []
    for key, value in toml.items():
        if key not in top:
            what = "table" if isinstance(value, Mapping) else "key"
            problems.append(f"unknown {what} {key!r}{_closest(key, top)}")
        elif key in tables and isinstance(value, Mapping):
            for inner in value:
                if inner not in tables[key]:
                    elsewhere = [name for name, keys in tables.items() if inner in keys]
                    hint = (
                        f" (it belongs in [{elsewhere[0]}])"
                        if elsewhere
                        else _closest(inner, tables[key])
                    )
                    problems.append(f"unknown key {inner!r} in [{key}]{hint}")
        elif key == MODELS_TABLE and isinstance(value, Mapping):
            for model, entry in value.items():
                if isinstance(entry, Mapping):
                    problems.extend(
                        f"unknown key {inner!r} in [models.{model}]{_closest(inner, MODEL_KEYS)}"
                        for inner in entry
                        if inner not in MODEL_KEYS
                    )
    return problems


class _Source:
    """Where raw values come from: environment, secret files, TOML."""

    def __init__(self, env: Mapping[str, str], toml: Mapping[str, Any], secrets_dir: str) -> None:
        self.env = env
        self.toml = toml
        self.secrets_dir = secrets_dir.rstrip("/") + "/"

    def value(self, option: Option) -> Any:
        """Return the option's parsed value, or None when it is not set anywhere."""
        raw = self._raw(option)
        if raw is None or raw.strip() == "":
            return None
        try:
            return option.parse(raw)
        except ValueError as exc:
            raise SettingsError(
                option.env, "invalid value" if option.secret else str(exc)
            ) from None

    def _raw(self, option: Option) -> str | None:
        name = option.env
        value = self.env.get(name)
        if value is None or value == "":
            file_name = self.env.get(f"{name}_FILE")
            if file_name:
                return self._read(f"{name}_FILE", file_name)
            value = self._from_toml(option)
        if value is None:
            return None
        if option.secret and value.startswith(self.secrets_dir):
            return self._read(name, value)
        return value

    def _from_toml(self, option: Option) -> str | None:
        table = self.toml.get(option.section, {})
        if not isinstance(table, Mapping):
            raise SettingsError(f"[{option.section}]", "must be a table in the config file")
        value = table.get(option.toml_key)
        if value is None:
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list):
            return ",".join(str(item) for item in value)
        return str(value)

    @staticmethod
    def _read(name: str, path: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            # The path is configuration, not a secret; the content never appears.
            raise SettingsError(name, f"cannot read secret file {path} ({exc.strerror})") from None


def _config_path(env: Mapping[str, str]) -> str:
    return env.get("SAIPROXY_CONFIG") or DEFAULT_CONFIG_PATH


def _load_toml(env: Mapping[str, str]) -> dict[str, Any]:
    explicit = env.get("SAIPROXY_CONFIG")
    path = Path(_config_path(env))
    if not path.exists():
        if explicit:
            raise SettingsError("SAIPROXY_CONFIG", f"file {path} does not exist")
        return {}
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError("SAIPROXY_CONFIG", f"cannot read {path}: {exc}") from None


def _load_models(toml: Mapping[str, Any], default_template: str | None) -> dict[str, ModelConfig]:
    table = toml.get(MODELS_TABLE, {})
    if not isinstance(table, Mapping):
        raise SettingsError("[models]", "must be a table of model tables")
    models: dict[str, ModelConfig] = {}
    for name, entry in table.items():
        if not isinstance(entry, Mapping):
            raise SettingsError(f"[models.{name}]", "must be a table")
        template_key, override_key = MODEL_KEYS
        template = str(entry.get(template_key) or "").strip() or default_template
        if not template:
            raise SettingsError(
                "SAI_TEMPLATE_ID", f"is required: model {name!r} names no template_id"
            )
        override = str(entry.get(override_key) or "").strip() or None
        models[name] = ModelConfig(name, template, override)
    return models


def setting(
    name: str, env: Mapping[str, str] | None = None, *, secrets_dir: str = SECRETS_DIR
) -> Any:
    """Return one setting (by field name) as configured, or its default; nothing else is checked.

    For the few places that need a setting before, or without, a whole valid
    configuration: the event loop is chosen before settings load, and
    ``saiproxy trace`` runs where no SAI is configured.
    """
    env = os.environ if env is None else env
    value = _Source(env, _load_toml(env), secrets_dir).value(OPTIONS[name])
    return _DEFAULTS[name] if value is None else value


def load_settings(
    env: Mapping[str, str] | None = None, *, secrets_dir: str = SECRETS_DIR
) -> Settings:
    """Build validated settings from the environment and the config file."""
    env = os.environ if env is None else env
    toml = _load_toml(env)
    unknown = unknown_toml_keys(toml)
    if unknown:
        raise SettingsError(_config_path(env), "; ".join(unknown))
    source = _Source(env, toml, secrets_dir)
    values: dict[str, Any] = {}
    for attr, option in OPTIONS.items():
        value = source.value(option)
        if value is not None:
            values[attr] = value

    if "sai_url" not in values:
        raise SettingsError("SAI_URL", "is required (the base URL of the SAI service)")
    if "sai_key" not in values and "sai_cookie" not in values:
        raise SettingsError("SAI_KEY", "SAI_KEY or SAI_COOKIE is required")

    template = values.get("sai_template_id")
    models = _load_models(toml, template)
    default_model = str(toml.get(DEFAULT_MODEL_KEY) or _DEFAULTS["default_model"])
    if not models:
        if not template:
            raise SettingsError("SAI_TEMPLATE_ID", "is required (no model names a template_id)")
        models[default_model] = ModelConfig(default_model, template)
    if default_model not in models:
        raise SettingsError("default_model", f"{default_model!r} is not in [models]")

    kinds = ("limits_client_", "limits_global_")
    limited = any(values.get(name) for name in OPTIONS if name.startswith(kinds))
    if values.get("workers", 1) > 1 and limited and "limits_url" not in values:
        raise SettingsError(
            "WORKERS",
            "must be 1 when the limits live in the process: each worker would keep its own "
            "and admit the limits WORKERS times over; set LIMITS_URL to share them "
            "(docs/limits.md)",
        )
    chain = values.get("auth_chain", DEFAULT_AUTH_CHAIN)
    if values.get("proxy_api_keys") and AuthHandlerName.BEARER in chain:
        raise SettingsError(
            "PROXY_API_KEYS",
            "cannot be used with the bearer handler in AUTH_CHAIN (both read Authorization)",
        )
    try:
        tracing = tracing_config(env)
    except TracingConfigError as exc:
        raise SettingsError(exc.variable, exc.problem) from None
    return Settings(models=models, default_model=default_model, tracing=tracing, **values)
