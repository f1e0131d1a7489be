"""Settings: environment, Docker secrets and the TOML file, validated in one place.

Precedence for every setting: environment variable, then ``NAME_FILE`` (for
secrets), then the TOML file, then the built-in default. A value that names a
file under the secrets directory (``/run/secrets/``) is read from that file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from yarl import URL

SECRETS_DIR: Final = "/run/secrets"
DEFAULT_CONFIG_PATH: Final = "config/saiproxy.toml"
KNOWN_AUTH_HANDLERS: Final = ("metadata", "header", "bearer", "system_key", "system_cookie")
DEFAULT_AUTH_CHAIN: Final = ("metadata", "header", "system_key", "system_cookie")

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


@dataclass(frozen=True, slots=True)
class Settings:
    """Every runtime setting of saiproxy, validated."""

    sai_url: URL
    models: Mapping[str, ModelConfig]
    default_model: str
    sai_key: Secret | None = None
    sai_cookie: Secret | None = None
    host: str = "0.0.0.0"
    port: int = 4000
    request_timeout: float = 600.0
    connect_timeout: float = 10.0
    max_retries: int = 3
    retry_backoff: float = 0.5
    upstream_connections: int = 0
    max_context_tokens: int = 128_000
    max_body_bytes: int = 8 * 1024 * 1024
    max_answer_bytes: int = 32 * 1024 * 1024
    keepalive_timeout: float = 75.0
    body_read_timeout: float = 30.0
    error_mode: ErrorMode = "message"
    strict_models: bool = False
    auth_chain: tuple[str, ...] = DEFAULT_AUTH_CHAIN
    placeholders: tuple[str, ...] = ("raspberry",)
    proxy_api_keys: tuple[Secret, ...] = ()
    verbose_logging: bool = False
    log_level: str = "info"
    log_dir: str = "logs"
    log_file: bool = True
    log_format: LogFormat = "json"
    log_max_bytes: int = 5 * 1024 * 1024
    log_backups: int = 3
    shutdown_delay: float = 2.0
    shutdown_timeout: float = 30.0
    ping_interval: float = 15.0
    tool_repair_retries: int = 1
    workers: int = 1

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
        values = [self.sai_key, self.sai_cookie, *self.proxy_api_keys]
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


def _url(raw: str) -> URL:
    url = URL(raw.strip().rstrip("/"))
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return url


def _str(raw: str) -> str:
    return raw.strip()


@dataclass(frozen=True, slots=True)
class _Option:
    env: str
    section: str
    parse: Callable[[str], Any]
    attr: str
    secret: bool = False


_OPTIONS: Final = (
    _Option("HOST", "server", _str, "host"),
    _Option("PORT", "server", _port, "port"),
    _Option("WORKERS", "server", _positive_int, "workers"),
    _Option("MAX_BODY_BYTES", "server", _positive_int, "max_body_bytes"),
    _Option("KEEPALIVE_TIMEOUT", "server", _positive_float, "keepalive_timeout"),
    _Option("BODY_READ_TIMEOUT", "server", _positive_float, "body_read_timeout"),
    _Option("STRICT_MODELS", "server", _bool, "strict_models"),
    _Option("ERROR_MODE", "server", _choice("message", "http"), "error_mode"),
    _Option("MAX_CONTEXT_TOKENS", "server", _positive_int, "max_context_tokens"),
    _Option("PING_INTERVAL", "server", _positive_float, "ping_interval"),
    _Option("TOOL_REPAIR_RETRIES", "upstream", _non_negative_int, "tool_repair_retries"),
    _Option("SHUTDOWN_DELAY", "server", _non_negative_float, "shutdown_delay"),
    _Option("SHUTDOWN_TIMEOUT", "server", _non_negative_float, "shutdown_timeout"),
    _Option("SAI_URL", "upstream", _url, "sai_url"),
    _Option("REQUEST_TIMEOUT", "upstream", _positive_float, "request_timeout"),
    _Option("CONNECT_TIMEOUT", "upstream", _positive_float, "connect_timeout"),
    _Option("MAX_RETRIES", "upstream", _non_negative_int, "max_retries"),
    _Option("RETRY_BACKOFF", "upstream", _non_negative_float, "retry_backoff"),
    _Option("UPSTREAM_CONNECTIONS", "upstream", _non_negative_int, "upstream_connections"),
    _Option("MAX_ANSWER_BYTES", "upstream", _positive_int, "max_answer_bytes"),
    _Option("SAI_KEY", "upstream", Secret, "sai_key", secret=True),
    _Option("SAI_COOKIE", "upstream", Secret, "sai_cookie", secret=True),
    _Option("AUTH_CHAIN", "auth", _names, "auth_chain"),
    _Option("USER_KEY_PLACEHOLDERS", "auth", _names, "placeholders"),
    _Option("VERBOSE_LOGGING", "logging", _bool, "verbose_logging"),
    _Option("LOG_LEVEL", "logging", _choice("debug", "info", "warning", "error"), "log_level"),
    _Option("LOG_DIR", "logging", _str, "log_dir"),
    _Option("LOG_FILE", "logging", _bool, "log_file"),
    _Option("LOG_FORMAT", "logging", _choice("json", "text"), "log_format"),
    _Option("LOG_MAX_BYTES", "logging", _positive_int, "log_max_bytes"),
    _Option("LOG_BACKUPS", "logging", _non_negative_int, "log_backups"),
)


class _Source:
    """Where raw values come from: environment, secret files, TOML."""

    def __init__(self, env: Mapping[str, str], toml: Mapping[str, Any], secrets_dir: str) -> None:
        self.env = env
        self.toml = toml
        self.secrets_dir = secrets_dir.rstrip("/") + "/"

    def raw(self, name: str, section: str, *, secret: bool = False) -> str | None:
        value = self.env.get(name)
        if value is None or value == "":
            file_name = self.env.get(f"{name}_FILE")
            if file_name:
                return self._read(f"{name}_FILE", file_name)
            value = self._from_toml(name, section)
        if value is None:
            return None
        if secret and value.startswith(self.secrets_dir):
            return self._read(name, value)
        return value

    def _from_toml(self, name: str, section: str) -> str | None:
        table = self.toml.get(section, {})
        if not isinstance(table, Mapping):
            raise SettingsError(f"[{section}]", "must be a table in the config file")
        value = table.get(name.lower())
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


def _load_toml(env: Mapping[str, str]) -> dict[str, Any]:
    explicit = env.get("SAIPROXY_CONFIG")
    path = Path(explicit or DEFAULT_CONFIG_PATH)
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
    table = toml.get("models", {})
    if not isinstance(table, Mapping):
        raise SettingsError("[models]", "must be a table of model tables")
    models: dict[str, ModelConfig] = {}
    for name, entry in table.items():
        if not isinstance(entry, Mapping):
            raise SettingsError(f"[models.{name}]", "must be a table")
        template = str(entry.get("template_id") or "").strip() or default_template
        if not template:
            raise SettingsError(
                "SAI_TEMPLATE_ID", f"is required: model {name!r} names no template_id"
            )
        override = str(entry.get("model_override") or "").strip() or None
        models[name] = ModelConfig(name, template, override)
    return models


def load_settings(
    env: Mapping[str, str] | None = None, *, secrets_dir: str = SECRETS_DIR
) -> Settings:
    """Build validated settings from the environment and the config file."""
    env = os.environ if env is None else env
    toml = _load_toml(env)
    source = _Source(env, toml, secrets_dir)
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        raw = source.raw(option.env, option.section, secret=option.secret)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[option.attr] = option.parse(raw)
        except ValueError as exc:
            problem = "invalid value" if option.secret else str(exc)
            raise SettingsError(option.env, problem) from None

    if "sai_url" not in values:
        raise SettingsError("SAI_URL", "is required (the base URL of the SAI service)")
    if "sai_key" not in values and "sai_cookie" not in values:
        raise SettingsError("SAI_KEY", "SAI_KEY or SAI_COOKIE is required")

    template = source.raw("SAI_TEMPLATE_ID", "upstream")
    template = template.strip() if template else None
    models = _load_models(toml, template)
    default_model = str(toml.get("default_model") or "sai-model")
    if not models:
        if not template:
            raise SettingsError("SAI_TEMPLATE_ID", "is required (no model names a template_id)")
        models[default_model] = ModelConfig(default_model, template)
    if default_model not in models:
        raise SettingsError("default_model", f"{default_model!r} is not in [models]")

    chain = values.get("auth_chain", DEFAULT_AUTH_CHAIN)
    unknown = [name for name in chain if name not in KNOWN_AUTH_HANDLERS]
    if unknown or not chain:
        known = ", ".join(KNOWN_AUTH_HANDLERS)
        raise SettingsError(
            "AUTH_CHAIN",
            f"unknown handler {unknown[0]!r}; known: {known}"
            if unknown
            else "must name at least one handler",
        )

    raw_keys = source.raw("PROXY_API_KEYS", "auth", secret=True)
    if raw_keys:
        values["proxy_api_keys"] = tuple(Secret(key) for key in _names(raw_keys))
        if "bearer" in chain:
            raise SettingsError(
                "PROXY_API_KEYS",
                "cannot be used with the bearer handler in AUTH_CHAIN (both read Authorization)",
            )
    if "placeholders" in values:
        values["placeholders"] = tuple(p.lower() for p in values["placeholders"])

    return Settings(models=models, default_model=default_model, **values)
