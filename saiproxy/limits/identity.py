"""Who a request counts against: its proxy key, else the user's SAI key, else nobody in
particular. Only a truncated SHA-256 of a key is ever kept, logged or stored."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from aiohttp import hdrs, web

from ..auth import Credential
from ..settings import Secret

ANONYMOUS: Final = "anonymous"
Kind = Literal["proxy_key", "user_key", "anonymous"]


def digest(value: str) -> str:
    """Return the first 16 hex characters of the value's SHA-256: an ID, not the key."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Client:
    """A client as the limits know it."""

    id: str  # key-<16 hex>, user-<16 hex> or anonymous
    kind: Kind
    shared: bool  # uses the shared SAI credentials, so the global limits apply too


class Identify:
    """Find a request's client from its proxy key or its SAI credential."""

    def __init__(self, proxy_keys: Sequence[Secret]) -> None:
        self._keys = [(key.reveal().encode(), f"key-{digest(key.reveal())}") for key in proxy_keys]
        self.proxy_ids = frozenset(client_id for _, client_id in self._keys)

    def __call__(self, request: web.Request, credential: Credential | None) -> Client:
        shared = credential is None or not credential.user
        if self._keys:
            presented = [request.headers.get("x-api-key", "")]
            scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
            if scheme.lower() == "bearer":
                presented.append(token)
            for candidate in presented:
                raw = candidate.strip().encode("utf-8", "surrogateescape")
                for key, client_id in self._keys:
                    if hmac.compare_digest(raw, key):
                        return Client(client_id, "proxy_key", shared)
        if credential is not None and credential.user:
            return Client(f"user-{digest(credential.secret.reveal())}", "user_key", shared)
        return Client(ANONYMOUS, "anonymous", shared)
