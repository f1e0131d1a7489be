"""The parsers of settings: each takes a setting's raw text and returns its typed value or
raises ValueError (whose text the settings error shows); and the types they return."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Final

from yarl import URL

__all__ = [
    "DEFAULT_AUTH_CHAIN",
    "MAX_LIMIT",
    "AuthHandlerName",
    "Secret",
    "auth_chain",
    "boolean",
    "choice",
    "limit_value",
    "lower_names",
    "names",
    "non_negative_float",
    "non_negative_int",
    "port",
    "positive_float",
    "positive_int",
    "secrets",
    "store_url",
    "text",
    "url",
]


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


def boolean(raw: str) -> bool:
    """Parse true/false (also 1/0, yes/no, on/off)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def positive_int(raw: str) -> int:
    """Parse a whole number of at least 1."""
    value = int(raw)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def non_negative_int(raw: str) -> int:
    """Parse a whole number of at least 0."""
    value = int(raw)
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


# The largest limit a setting may name: the limits store's scripts count in Lua numbers
# (doubles), exact only below 2^53.
MAX_LIMIT: Final = 10**13


def limit_value(raw: str) -> int:
    """Parse a limit: a whole number from 0 (none) to MAX_LIMIT."""
    value = non_negative_int(raw)
    if value > MAX_LIMIT:
        raise ValueError(f"must be at most {MAX_LIMIT}, got {value}")
    return value


def positive_float(raw: str) -> float:
    """Parse a number greater than 0."""
    value = float(raw)
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {raw}")
    return value


def non_negative_float(raw: str) -> float:
    """Parse a number of at least 0."""
    value = float(raw)
    if not value >= 0:
        raise ValueError(f"must not be negative, got {raw}")
    return value


def port(raw: str) -> int:
    """Parse a TCP port number."""
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port number 0-65535, got {value}")
    return value


def choice(*allowed: str) -> Callable[[str], str]:
    """Return the parser of one of ``allowed`` (any case)."""

    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def names(raw: str) -> tuple[str, ...]:
    """Parse a comma-separated list of names."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def lower_names(raw: str) -> tuple[str, ...]:
    """Parse a comma-separated list of names, in lower case."""
    return tuple(name.lower() for name in names(raw))


def secrets(raw: str) -> tuple[Secret, ...]:
    """Parse a comma-separated list of secrets."""
    return tuple(Secret(value) for value in names(raw))


def auth_chain(raw: str) -> tuple[AuthHandlerName, ...]:
    """Parse AUTH_CHAIN: known handler names, at least one."""
    handlers = names(raw)
    if not handlers:
        raise ValueError("must name at least one handler")
    known = ", ".join(AuthHandlerName)
    for name in handlers:
        if name not in AuthHandlerName.__members__.values():
            raise ValueError(f"unknown handler {name!r}; known: {known}")
    return tuple(AuthHandlerName(name) for name in handlers)


def url(raw: str) -> URL:
    """Parse an http:// or https:// URL with a host (no trailing slash)."""
    parsed = URL(raw.strip().rstrip("/"))
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return parsed


def text(raw: str) -> str:
    """Parse text: the raw value without surrounding blanks."""
    return raw.strip()


def store_url(raw: str) -> Secret:
    """Parse a Valkey or Redis URL (it may hold a password, so it is kept as a secret)."""
    value = raw.strip()
    scheme = value.partition("://")[0].lower()
    if scheme not in ("redis", "rediss", "valkey", "valkeys", "unix"):
        raise ValueError("must be a redis://, rediss://, valkey://, valkeys:// or unix:// URL")
    return Secret(value)
