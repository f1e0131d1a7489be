"""One client request's calls to SAI: the credential it is on, the attempts made, the budget."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

from .auth import Credential

__all__ = ["CallBudget", "SaiCall"]


class CallBudget:
    """The SAI calls one client request may still make beyond one per prompt (all its prompts').

    Retries, 429 fallbacks and structured-output repairs each take one; with
    none left, the failure at hand is the answer (REQUEST_EXTRA_CALLS).
    """

    __slots__ = ("left",)

    def __init__(self, extra: int) -> None:
        self.left = extra

    def take(self) -> bool:
        """Take one call from the budget; return False when none is left."""
        if self.left <= 0:
            return False
        self.left -= 1
        return True


@dataclass(slots=True)
class SaiCall:
    """One client request's journey through SAI: credentials tried, attempts made."""

    url: URL
    payload: bytes
    credential: Credential
    request_id: str
    template_id: str
    attempts: int = 0
    retries: int = 0
    tried: list[Credential] = field(default_factory=list)
    last_status: int | str | None = None  # of the last attempt: HTTP status, or what failed
    last_latency_ms: float | None = None
    budget: CallBudget | None = None  # shared by the client request's calls; None: unbounded
    # Asked before a call that began on a user's own credential goes on with a shared one
    # (SAI_COOKIE after a 429): False refuses it (the global limits, limits/gate.py).
    before_shared: Callable[[], Awaitable[bool]] | None = None
    span: Any = None  # the attempt's trace span while it is open (tracing on)

    def summary(self) -> dict[str, Any]:
        """Return the call's facts for the finish line: attempts and how the last one went."""
        return {
            "attempts": self.attempts,
            "template": self.template_id,
            "credential": self.credential.label,
            "upstream_status": self.last_status,
            "upstream_latency_ms": self.last_latency_ms,
        }
