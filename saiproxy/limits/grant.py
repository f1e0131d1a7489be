"""An admitted request (:class:`Grant`) and the leases an admission takes in the store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .base import Ask, Limiter, Settlement, scope_name
from .identity import ANONYMOUS
from .rules import Verdict

__all__ = ["NOTHING", "Grant", "lease_pairs", "leased", "possible_leases"]

NOTHING: Final = Settlement(0, 0)  # the settlement of a request that never reached SAI


@dataclass(slots=True)
class Grant:
    """An admitted request: what it reserved, where, until it settles."""

    ask: Ask
    verdict: Verdict
    limiter: Limiter
    settled: bool = False
    ended: Settlement = NOTHING  # what it settled with
    # The store's grant of an admission given up on that landed while this (local) grant ran:
    # settled with it (Limits._late).
    late: Grant | None = None


def leased(ask: Ask, client: str) -> tuple[str, ...]:
    """Return the scopes where an admission of ``ask`` as ``client`` takes a lease: one per
    concurrency limit."""
    return tuple(scope_name(kind, client) for kind, rules in ask.scopes if rules.concurrency)


def lease_pairs(ask: Ask, client: str) -> list[tuple[str, str]]:
    """Return the leases (scope, id) an admission of ``ask`` as ``client`` takes."""
    return [(scope, ask.id) for scope in leased(ask, client)]


def possible_leases(ask: Ask) -> list[tuple[str, str]]:
    """Return the leases a store admission of ``ask`` may have taken, its verdict unknown:
    as its client, and as anonymous for a credential SAI has not accepted yet."""
    pairs = lease_pairs(ask, ask.client)
    return pairs + lease_pairs(ask, ANONYMOUS) if ask.verify else pairs
