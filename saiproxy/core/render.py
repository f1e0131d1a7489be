"""What the core asks of a protocol adapter: its answer, stream and error shapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol

from aiohttp import web

from ..base.errors import ProxyError, UpstreamError
from .conversation import Answer, ToolCall

__all__ = [
    "ERROR_SHAPES",
    "Choices",
    "ErrorShape",
    "Renderer",
]


class Renderer(Protocol):
    """Renders one request's answer in a protocol's wire format; may keep state per request.

    A stream is ``head``, then ``text`` and ``calls`` as the answer comes, then
    ``finish`` (which ends it: finish reason, usage, terminator); or, after it
    started, ``failure`` in ``http`` error mode. ``ping`` keeps it alive while
    SAI has not answered.
    """

    # Start the stream at once, before SAI answers (the protocol's clients
    # expect their first event immediately); otherwise when SAI answers or the
    # first keep-alive is due, so a failure before that is still a real status.
    eager: bool

    def body(self, answer: Answer) -> dict[str, Any]:
        """Return the non-streamed response object."""

    def head(self, model: str) -> bytes:
        """Return the stream's opening frames."""

    def ping(self) -> bytes:
        """Return a keep-alive frame."""

    def text(self, piece: str) -> bytes:
        """Return the frames carrying one piece of prose."""

    def calls(self, calls: Sequence[ToolCall]) -> bytes:
        """Return the frames carrying the tool calls, once the answer has ended."""

    def finish(self, answer: Answer) -> bytes:
        """Return the closing frames: finish reason, usage, terminator.

        ``answer.text`` is empty here: the prose went out piece by piece.
        """

    def failure(self, error: UpstreamError) -> bytes:
        """Return the frames reporting a failure after the stream started, and ending it."""


class Choices(Protocol):
    """Renders the answers of several conversations as one response: a choice each, in order.

    Streamed, each choice's :class:`Renderer` writes its own frames (they
    interleave as the answers come); its ``finish`` ends that choice only,
    and ``finish`` here ends the stream once every choice has. A choice's
    ``failure`` ends the whole stream: the other choices stop there.
    """

    def choice(self, index: int) -> Renderer:
        """Return the renderer of the choice at ``index``."""

    def body(self, answers: Sequence[Answer]) -> dict[str, Any]:
        """Return the non-streamed response object, one choice per answer."""

    def finish(self, answers: Sequence[Answer]) -> bytes:
        """Return the frames that end the stream after the last choice: usage, terminator."""


class ErrorShape(Protocol):
    """Renders a failure as a protocol's HTTP error response."""

    def response(self, error: ProxyError) -> web.Response:
        """Return the error response: the status, headers and the protocol's error body."""


# Error shapes by path prefix, and the default: ((prefix, shape), ...), default.
ERROR_SHAPES: Final[web.AppKey[tuple[tuple[tuple[str, ErrorShape], ...], ErrorShape]]] = web.AppKey(
    "error_shapes"
)
