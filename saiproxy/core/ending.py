"""How one answer ended, as one value: what its finish line and the request's metric report."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from aiohttp import web

from ..base.errors import UpstreamError
from .conversation import Answer

__all__ = ["CLIENT_GONE", "ERROR_HEADER", "Done", "Ending", "Policy"]

# Names the outcome of an answer that explains a failure (``message`` error
# mode), when its headers were still unsent.
ERROR_HEADER: Final = "X-Saiproxy-Error"
# What an upstream failure becomes (Exchange.policy): a real HTTP status, an
# in-band error in the protocol's shape, or the explanation as the answer.
Policy = Literal["raise", "in_band", "explain"]


@dataclass(frozen=True, slots=True)
class Ending:
    """The status, outcome and finish reason of one answer (one choice of a response).

    Every way an answer can end returns one; the exchange logs it once, in
    its finish line. ``status`` is the HTTP status the client got (200 once a
    stream started, whatever followed); ``outcome`` is ``ok`` or what went
    wrong; ``finish_reason`` is None when no answer was given.
    """

    status: int = 200
    outcome: str = "ok"
    finish_reason: str | None = None
    tool_calls: int = 0

    @classmethod
    def answered(cls, answer: Answer) -> Ending:
        """Return the ending of a finished answer (an explained failure included)."""
        return cls(200, answer.outcome, answer.finish, len(answer.calls))

    @classmethod
    def in_band(cls, error: UpstreamError) -> Ending:
        """Return the ending of a stream that reported ``error`` in-band and stopped."""
        return cls(200, error.code or "error", "error")

    @classmethod
    def failed(cls, exc: BaseException) -> Ending:
        """Return the ending of an answer that ``exc`` stopped: its status, or 499 for a hang-up."""
        if isinstance(exc, asyncio.CancelledError):
            return CLIENT_GONE
        return cls(getattr(exc, "status", 500), getattr(exc, "code", None) or type(exc).__name__)

    @property
    def stops_stream(self) -> bool:
        """Whether this ending closed the response's stream (an in-band error is its last event)."""
        return self.finish_reason == "error"


CLIENT_GONE: Final = Ending(499, "client_disconnected")


@dataclass(frozen=True, slots=True)
class Done:
    """How a response went, as one value: the response, each answer's ending, what failed.

    ``failure``, when set, is what the request raises once its answers are
    recorded (a real HTTP status, the client gone); ``response`` is then not sent.
    """

    response: web.StreamResponse | None
    endings: Sequence[Ending]
    failure: BaseException | None = None
