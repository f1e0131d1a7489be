"""Requests aiohttp cannot parse, answered in the OpenAI error shape: saiproxy's one use of
aiohttp's private API.

A bad request line, bad or oversized headers or broken framing never reach
the application (its middlewares included): aiohttp answers them itself, in
plain text, after logging an ERROR with a traceback. They are the client's
mistake: here they get one INFO line and the error shape every client expects.

aiohttp offers no option for the class of its connection handler, so this
takes three private pieces: ``AppRunner._make_server`` (overridden),
``web.Server``'s ``_loop`` and ``_kwargs`` (to build the handler as aiohttp
does) and ``RequestHandler.handle_error`` (overridden; documented nowhere).
:func:`fits` checks them; when a new aiohttp release changes them, saiproxy
logs a warning and keeps aiohttp's own plain-text answers, rather than fail to
start, and ``tests/test_hardening.py`` fails loudly (CI runs it on the newest
aiohttp release too).
"""

from __future__ import annotations

import inspect

from aiohttp import web

from ..base.errors import MalformedRequest
from ..base.log import server_logger as log
from ..core.bodies import error_response
from ..logs import bound
from .middlewares import REQUEST_ID_HEADER, new_request_id

__all__ = ["ProxyRunner", "fits"]


# What the overrides below rely on: handle_error's parameters, in order.
_HANDLE_ERROR_PARAMETERS = ("self", "request", "status", "exc", "message")


class _RequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse as OpenAI errors."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        text = str(getattr(exc, "message", None) or message or "").strip()
        reason = bound(text.splitlines()[0], 200) if text else "bad request"
        request_id = new_request_id()
        log.info(
            "malformed request refused",
            extra={
                "request_id": request_id,
                "status": status,
                "error": type(exc).__name__ if exc is not None else None,
                "reason": reason,
                "remote": request.remote,
            },
        )
        response = error_response(MalformedRequest(f"Malformed HTTP request: {reason}", status))
        response.headers[REQUEST_ID_HEADER] = request_id
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's low-level server, making :class:`_RequestHandler` connections."""

    def __call__(self) -> web.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


def fits(server: web.Server) -> bool:
    """Return whether this aiohttp still has the private pieces the handler swap relies on."""
    handle_error = inspect.signature(web.RequestHandler.handle_error)
    return (
        type(server) is web.Server
        and tuple(handle_error.parameters) == _HANDLE_ERROR_PARAMETERS
        and hasattr(server, "_loop")
        and isinstance(getattr(server, "_kwargs", None), dict)
    )


class ProxyRunner(web.AppRunner):
    """The AppRunner production uses: aiohttp's own error answers in the OpenAI shape."""

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if not fits(server):
            log.warning(
                "this aiohttp release changed what saiproxy relies on to answer malformed "
                "requests; they get aiohttp's plain-text answers (see saiproxy/web/malformed.py)"
            )
            return server
        # The server aiohttp built is the same object with one method changed.
        server.__class__ = _Server
        return server
