"""Settings: environment, Docker secrets and the TOML file, validated in one place.

Precedence for every setting: environment variable, then ``NAME_FILE`` (for
secrets), then the TOML file, then the built-in default. A value that names a
file under the secrets directory (``/run/secrets/``) is read from that file.

Each setting is declared once, in :mod:`.fields`; its parser is in :mod:`.parse`.
This module loads and checks them all, and is where the rest of saiproxy
imports them from.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Final

from .fields import (
    DEFAULTS,
    OPTIONS,
    ErrorMode,
    LogFormat,
    ModelConfig,
    Option,
    Settings,
    redact_url,
)
from .otel import TracingConfigError, tracing_config
from .parse import DEFAULT_AUTH_CHAIN, MAX_LIMIT, AuthHandlerName, Secret

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


class SettingsError(Exception):
    """A setting is missing or invalid; ``variable`` names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


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
    return DEFAULTS[name] if value is None else value


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
    default_model = str(toml.get(DEFAULT_MODEL_KEY) or DEFAULTS["default_model"])
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
