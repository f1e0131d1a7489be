"""The credential chain: which SAI credential a request uses (see docs/auth.md).

Each handler looks in one place and either returns a :class:`Credential` or
passes. The chain tries them in ``AUTH_CHAIN`` order. After SAI answers, the
chain decides what happens next: a 401 stops everything; a 429 moves to the
shared ``SAI_COOKIE`` once, if it is configured, named in ``AUTH_CHAIN`` and
not yet used.

Credentials are logged by kind, source and length only; the value lives in a
:class:`~saiproxy.settings.Secret` and is revealed only to build SAI's header.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from aiohttp import hdrs, web

from ..base.errors import InvalidRequest, NoCredential
from ..base.log import auth_logger as log
from ..base.settings import AuthHandlerName, Secret, Settings

__all__ = [
    "AUTH_CHAIN",
    "COOKIE_MARKER",
    "UNCLEAN_HEADER_TEXT",
    "USER_KEY_HEADERS",
    "AuthChain",
    "AuthHandler",
    "BearerHandler",
    "Credential",
    "HeaderHandler",
    "Kind",
    "MetadataHandler",
    "SystemHandler",
]


COOKIE_MARKER: Final = "Cookies"
USER_KEY_HEADERS: Final = ("user_api_key", "user-api-key")
# What is not clean header text: control characters (CR/LF would split a
# header) and surrogates (aiohttp's escapes for bytes that were not UTF-8).
# A user credential with any is the client's error; SAI's header values are
# cleaned of them (sai.clean_header_value).
UNCLEAN_HEADER_TEXT: Final = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")

Kind = Literal["key", "cookie"]

# The name users and operators know each credential by, and what to do when
# SAI rejects it, by (supplied by the user, kind).
_LABELS: Final[dict[tuple[bool, Kind], tuple[str, str]]] = {
    (True, "key"): (
        "user key",
        "Check the SAI API key configured in your client (user_api_key); "
        "remove it to use the shared key.",
    ),
    (True, "cookie"): (
        "user cookie",
        "Your SAI session cookie has expired: sign in to SAI again and "
        "configure the fresh cookie in your client.",
    ),
    (False, "key"): (
        "SAI_KEY",
        "The proxy's shared SAI_KEY was rejected: ask the saiproxy operators "
        "to renew it, or configure your own SAI key (user_api_key).",
    ),
    (False, "cookie"): (
        "SAI_COOKIE",
        "The proxy's shared SAI_COOKIE has expired: ask the saiproxy "
        "operators to refresh it, or configure your own SAI key (user_api_key).",
    ),
}


@dataclass(frozen=True, slots=True)
class Credential:
    """A SAI credential and where it came from; its value never prints."""

    kind: Kind
    source: str
    secret: Secret
    user: bool

    @property
    def label(self) -> str:
        """Return the name users and operators know it by."""
        return _LABELS[self.user, self.kind][0]

    @property
    def fix_when_rejected(self) -> str:
        """Return what to do when SAI rejects this credential (401)."""
        return _LABELS[self.user, self.kind][1]

    def headers(self) -> dict[str, str]:
        """Return SAI's auth header: exactly one of X-Api-Key or Cookie."""
        if self.kind == "key":
            return {"X-Api-Key": self.secret.reveal()}
        return {hdrs.COOKIE: self.secret.reveal()}

    def describe(self) -> dict[str, Any]:
        """Return the loggable facts of the credential decision: kind, source, length."""
        return {
            "credential": self.label,
            "kind": self.kind,
            "source": self.source,
            "length": len(self.secret),
        }


class AuthHandler(Protocol):
    """Finds a credential in one place, or passes with None."""

    def find(self, request: web.Request, body: Mapping[str, Any]) -> Credential | None:
        """Return the credential this handler finds for the request."""


class _UserValue:
    """Shared rules for values a user supplies: trim, reject empties and placeholders."""

    def __init__(self, placeholders: Sequence[str]) -> None:
        self._placeholders = frozenset(p.lower() for p in placeholders)

    def _accept(self, raw: Any, source: str) -> Credential | None:
        if raw is None:
            return None
        if not isinstance(raw, str):
            log.info("user credential ignored: not a string", extra={"source": source})
            return None
        value = raw.strip()
        if UNCLEAN_HEADER_TEXT.search(value):
            log.info("user credential refused: control characters", extra={"source": source})
            raise InvalidRequest(
                f"The SAI credential in {source} contains control characters or bytes "
                "that are not UTF-8; send the key or cookie as plain text"
            )
        if not value:
            log.info("user credential ignored: empty", extra={"source": source})
            return None
        if value.lower() in self._placeholders:
            log.info(
                "user credential ignored: placeholder value",
                extra={"source": source, "length": len(value)},
            )
            return None
        kind: Kind = "cookie" if COOKIE_MARKER in value else "key"
        return Credential(kind, source, Secret(value), user=True)


class MetadataHandler(_UserValue):
    """``litellm_params.metadata.user_api_key``, then ``metadata.user_api_key`` in the body."""

    def find(self, request: web.Request, body: Mapping[str, Any]) -> Credential | None:
        params = body.get("litellm_params")
        if isinstance(params, dict):
            metadata = params.get("metadata")
            if isinstance(metadata, dict):
                found = self._accept(
                    metadata.get("user_api_key"), "body litellm_params.metadata.user_api_key"
                )
                if found:
                    return found
        metadata = body.get("metadata")
        if isinstance(metadata, dict):
            return self._accept(metadata.get("user_api_key"), "body metadata.user_api_key")
        return None


class HeaderHandler(_UserValue):
    """The ``user_api_key`` or ``user-api-key`` request header."""

    def find(self, request: web.Request, body: Mapping[str, Any]) -> Credential | None:
        for header in USER_KEY_HEADERS:
            found = self._accept(request.headers.get(header), f"header {header}")
            if found:
                return found
        return None


class BearerHandler(_UserValue):
    """``Authorization: Bearer <key>`` as the user's own SAI key (opt-in)."""

    def find(self, request: web.Request, body: Mapping[str, Any]) -> Credential | None:
        scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self._accept(token, "header Authorization")


class SystemHandler:
    """A shared credential from the settings: SAI_KEY or SAI_COOKIE."""

    def __init__(self, kind: Kind, secret: Secret | None) -> None:
        self._credential = (
            Credential(kind, _LABELS[False, kind][0], secret, user=False)
            if secret is not None
            else None
        )

    @property
    def credential(self) -> Credential | None:
        """Return the configured credential, if any."""
        return self._credential

    def find(self, request: web.Request, body: Mapping[str, Any]) -> Credential | None:
        return self._credential


class AuthChain:
    """The ordered handlers, plus the fallback rule for rate limits."""

    def __init__(self, handlers: Sequence[AuthHandler], cookie: Credential | None) -> None:
        self._handlers = tuple(handlers)
        self._cookie = cookie

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthChain:
        """Build the chain named by AUTH_CHAIN."""
        cookie = SystemHandler("cookie", settings.sai_cookie)
        handlers: dict[AuthHandlerName, AuthHandler] = {
            AuthHandlerName.METADATA: MetadataHandler(settings.placeholders),
            AuthHandlerName.HEADER: HeaderHandler(settings.placeholders),
            AuthHandlerName.BEARER: BearerHandler(settings.placeholders),
            AuthHandlerName.SYSTEM_KEY: SystemHandler("key", settings.sai_key),
            AuthHandlerName.SYSTEM_COOKIE: cookie,
        }
        # The 429 fallback is the chain's last resort, so only a chain that names
        # the shared cookie may fall back to it.
        fallback = (
            cookie.credential if AuthHandlerName.SYSTEM_COOKIE in settings.auth_chain else None
        )
        return cls([handlers[name] for name in settings.auth_chain], fallback)

    def select(self, request: web.Request, body: Mapping[str, Any]) -> Credential:
        """Return the first credential a handler finds; raise NoCredential if none does."""
        for handler in self._handlers:
            found = handler.find(request, body)
            if found is not None:
                return found
        raise NoCredential(
            "No SAI credential: send your SAI key as user_api_key (header or metadata), "
            "or ask the operators to configure SAI_KEY or SAI_COOKIE."
        )

    def after_rate_limit(self, tried: Sequence[Credential]) -> Credential | None:
        """Return the credential to try after a 429: SAI_COOKIE once, if configured and chained."""
        cookie = self._cookie
        if cookie is None or cookie in tried:
            return None
        return cookie


AUTH_CHAIN: Final = web.AppKey("auth_chain", AuthChain)
