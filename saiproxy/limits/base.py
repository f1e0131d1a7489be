"""The Limiter protocol the two stores implement, and what passes between them and the gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .identity import Client
from .rules import Rules, Verdict


@dataclass(frozen=True, slots=True)
class Ask:
    """One client request asking to be admitted: one admission, every scope checked at once."""

    id: str  # unique among every replica's admissions
    client: Client
    reserve: int  # input estimate + the answer's bound (or LIMITS_OUTPUT_RESERVE)
    scopes: tuple[tuple[str, Rules], ...]  # (scope name, its rules): the client, maybe global


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One client's use on one day (UTC)."""

    date: str
    client: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    limited: int = 0


class Limiter(Protocol):
    """A store of limits: in the process, or shared by every replica."""

    async def admit(self, ask: Ask) -> Verdict:
        """Check every limit of every scope at once; on success take the request's share."""

    async def settle(
        self, ask: Ask, verdict: Verdict, input_tokens: int, output_tokens: int
    ) -> None:
        """The request ended: correct its tokens to the real count, end its lease, count usage."""

    async def release_all(self) -> None:
        """End every lease this replica holds (drain)."""

    async def usage(self, dates: list[str]) -> list[UsageRow]:
        """Return the use of every client on ``dates``."""
