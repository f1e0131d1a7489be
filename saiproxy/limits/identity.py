"""Who a request counts against: what SAI authenticates, never what a client can vary freely.

In order: the proxy key the caller presented (PROXY_API_KEYS); else the
user's own SAI credential: a key as it is, a cookie by its session cookie's
value only (SAI_SESSION_COOKIE; the other cookies of the header change
nothing); else nobody in particular, ``anonymous``. A user's credential
counts as its own client only once SAI has accepted it (the stores decide,
see ``Ask.verify``): until then its requests are anonymous's, so sending a
new made-up key or cookie with every request buys no new limits. Only a
truncated SHA-256 of a key is ever kept, logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from aiohttp import hdrs, web

from ..base.settings import Secret
from ..upstream.auth import Credential

__all__ = [
    "ANONYMOUS",
    "API_KEY_HEADER",
    "OWNERS",
    "Client",
    "Identify",
    "KeyRing",
    "digest",
    "presented_keys",
    "session_value",
]

ANONYMOUS: Final = "anonymous"
Kind = Literal["proxy_key", "user_key", "user_cookie", "anonymous"]
API_KEY_HEADER: Final = "x-api-key"


def presented_keys(request: web.Request) -> list[bytes]:
    """Return the keys the request presents: ``x-api-key``, and ``Authorization: Bearer``."""
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    # aiohttp keeps undecodable header bytes as surrogates: encode them back
    # rather than fail, so a stray byte is a refusal (401), not a 500.
    presented = [request.headers.get(API_KEY_HEADER, "").strip().encode("utf-8", "surrogateescape")]
    if scheme.lower() == "bearer":
        presented.append(token.strip().encode("utf-8", "surrogateescape"))
    return presented


class KeyRing:
    """Keys found by their SHA-256: one lookup per presented key, however many keys there are.

    Comparing a presented key with every configured one, with a thousand proxy keys
    every request paid two thousand comparisons (about 90 us). Found by its
    hash, a key's bytes still tell nothing through the timing (the lookup sees
    only the hash); the one candidate found is confirmed with a constant-time
    comparison.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[bytes] | Mapping[bytes, str]) -> None:
        """Keep ``keys``; a mapping names each key (``find`` returns the name)."""
        named = keys if isinstance(keys, Mapping) else dict.fromkeys(keys, "")
        self._keys = {hashlib.sha256(key).digest(): (key, name) for key, name in named.items()}

    def __bool__(self) -> bool:
        return bool(self._keys)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for _, name in self._keys.values())

    def _found(self, candidate: bytes) -> str | None:
        # The lookup tells nothing of a key's bytes; the comparison confirms it.
        entry = self._keys.get(hashlib.sha256(candidate).digest())
        if entry is not None and hmac.compare_digest(candidate, entry[0]):
            return entry[1]
        return None

    def matches(self, presented: Collection[bytes]) -> bool:
        """Return whether a presented key is one of the ring's; every presented key is looked up."""
        matched = False
        for candidate in presented:
            matched |= self._found(candidate) is not None
        return matched

    def find(self, presented: Iterable[bytes]) -> str | None:
        """Return the name of the first presented key that is one of the ring's, or None."""
        for candidate in presented:
            if (name := self._found(candidate)) is not None:
                return name
        return None


def digest(value: str) -> str:
    """Return the first 16 hex characters of the value's SHA-256: an ID, not the key."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def session_value(cookie: str, name: str) -> str | None:
    """Return the value of the session cookie ``name`` in a Cookie header, None without one.

    ASP.NET Core splits a large cookie into chunks (``name=chunks-2;
    nameC1=…; nameC2=…``): their values, in order, are the session's.
    """
    pairs: dict[str, str] = {}
    for part in cookie.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key not in pairs:  # the first of a name counts, as servers read it
            pairs[key] = value.strip()
    found = pairs.get(name)
    if found is None:
        return None
    value = found
    count = value.removeprefix("chunks-")
    if value.startswith("chunks-") and count.isdigit() and 0 < int(count) <= 64:
        chunks = [pairs.get(f"{name}C{index}") for index in range(1, int(count) + 1)]
        if any(chunk is None for chunk in chunks):
            return None
        return "".join(chunk for chunk in chunks if chunk is not None)
    return value


@dataclass(frozen=True, slots=True)
class Client:
    """A client as the limits know it."""

    id: str  # key-<16 hex>, user-<16 hex> or anonymous
    kind: Kind
    shared: bool  # uses the shared SAI credentials, so the global limits apply too

    @property
    def verify(self) -> bool:
        """True for a user's credential: its own client only once SAI has accepted it."""
        return self.kind in ("user_key", "user_cookie")


# Most requests are nobody in particular's: the two values made once (a Client is frozen).
_NOBODY: Final = {shared: Client(ANONYMOUS, "anonymous", shared) for shared in (True, False)}


class Identify:
    """Find a request's client from its proxy key or its SAI credential."""

    def __init__(self, proxy_keys: Sequence[Secret], session_cookie: str = ".AspNetCore.Cookies"):
        self._keys = KeyRing({key.reveal().encode(): f"key-{digest(key.reveal())}"
                              for key in proxy_keys})  # fmt: skip
        self.proxy_ids = self._keys.names
        self._session_cookie = session_cookie

    def proxy_client(self, request: web.Request) -> str | None:
        """Return the client ID of the proxy key the request presents, if it presents one."""
        return self._keys.find(presented_keys(request)) if self._keys else None

    def __call__(self, request: web.Request, credential: Credential | None) -> Client:
        shared = credential is None or not credential.user
        if (client_id := self.proxy_client(request)) is not None:
            return Client(client_id, "proxy_key", shared)
        if credential is not None and credential.user:
            secret = credential.secret.reveal()
            if credential.kind == "key":
                return Client(f"user-{digest(secret)}", "user_key", shared)
            session = session_value(secret, self._session_cookie)
            if session:
                return Client(f"user-{digest(session)}", "user_cookie", shared)
        return _NOBODY[shared]


# Who owns stored Responses and conversations (saiproxy/state/).
OWNERS: Final = web.AppKey("owners", Identify)
