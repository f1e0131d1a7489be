"""The Limiter protocol the two stores implement, and what passes between them and the gate.

Both stores (``local.py`` in the process, ``shared.py`` in Valkey) keep the
same rules; ``tests/test_limits_properties.py`` drives them with the same
random sequences and requires the same verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from .rules import Rules, Verdict

__all__ = ["Ask", "Limiter", "Settlement", "UsageRow"]

ScopeKind = Literal["client", "global"]


@dataclass(frozen=True, slots=True)
class Ask:
    """One client request asking to be admitted: one admission, every scope checked at once."""

    id: str  # unique among every replica's admissions
    client: str  # key-<16 hex>, user-<16 hex> or anonymous
    verify: bool  # a user's credential: its own client once SAI has accepted it, else anonymous
    reserve: int  # input estimate + the answer's bound (or LIMITS_OUTPUT_RESERVE)
    scopes: tuple[tuple[ScopeKind, Rules], ...]  # the client's, the global one, or both
    usage: bool = True  # counted in the client's usage (False: a second admission of a request)


@dataclass(frozen=True, slots=True)
class Settlement:
    """How an admitted request ended: what SAI counted, and whether it accepted a user's
    credential."""

    input_tokens: int
    output_tokens: int
    accepted: bool = False  # SAI answered the user's own credential: it is theirs


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One client's use on one day (UTC)."""

    date: str
    client: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    limited: int = 0


def scope_name(kind: ScopeKind, client: str) -> str:
    """Return a scope's name in the stores: ``client:<id>`` or ``global``."""
    return f"client:{client}" if kind == "client" else "global"


class Limiter(Protocol):
    """A store of limits: in the process, or shared by every replica."""

    async def admit(self, ask: Ask) -> Verdict:
        """Check every limit of every scope at once; on success take the request's share."""

    async def settle(self, ask: Ask, verdict: Verdict, ended: Settlement) -> None:
        """The request ended: correct its tokens to the real count, end its lease, count usage."""

    async def usage(self, dates: list[str]) -> list[UsageRow]:
        """Return the use of every client on ``dates``."""
