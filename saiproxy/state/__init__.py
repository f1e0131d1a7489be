"""Stored Responses, their items and conversations: in the process, or in Valkey/Redis.

``state_ctx`` makes the process's :class:`~.store.State` from the settings
(``STATE_URL``, else ``LIMITS_URL``, else in the process); ``owner_of`` says
whose a request's objects are. See docs/protocols.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from ..base.errors import NoCredential
from ..base.keys import SETTINGS
from ..base.settings import Settings
from ..limits.identity import OWNERS, Identify
from ..upstream.auth import AUTH_CHAIN
from .backend import Backend, LocalBackend
from .store import STATE_STORE, State

__all__ = ["backend_for", "owner_of", "state_ctx"]


def backend_for(settings: Settings) -> Backend:
    """Return the state's backend: STATE_URL's store, else LIMITS_URL's, else the process."""
    url = settings.state_url or settings.limits_url
    if url is None:
        return LocalBackend(settings.responses_ttl, settings.state_max_bytes)
    # Imported only with a store: see shared.py's docstring.
    from ..limits.shared import connect
    from .shared import SharedBackend

    store = connect(url.reveal(), settings.state_timeout)
    return SharedBackend(
        store, settings.state_prefix, settings.responses_ttl, settings.state_timeout
    )


async def state_ctx(app: web.Application) -> AsyncIterator[None]:
    """The process's state store, its connection closed on shutdown."""
    settings = app[SETTINGS]
    backend = backend_for(settings)
    app[STATE_STORE] = State(backend, settings.state_prefix, settings.state_client_bytes)
    app[OWNERS] = Identify(settings.proxy_api_keys, settings.sai_session_cookie)
    try:
        yield
    finally:
        await backend.close()


def owner_of(request: web.Request, body: Any = None) -> str:
    """Return who owns what ``request`` stores or reads: the limits' client identity.

    Its proxy key, else the user's own SAI credential the auth chain selects,
    else ``anonymous``; the one place that says so.
    """
    try:
        credential = request.app[AUTH_CHAIN].select(request, body if isinstance(body, dict) else {})
    except NoCredential:
        credential = None
    return request.app[OWNERS](request, credential).id
