"""Limits held in Valkey or Redis, shared by every replica.

One Lua script per admission (``scripts/admit.lua``) checks every limit of
every scope at once, with the server's clock (``TIME``), and takes the
request's share only when all pass: no two replicas can both take the last
slot. Windows are sliding logs (sorted sets scored by time); concurrency is a
sorted set of leases scored by their expiry, renewed in one pipelined batch
per replica (``scripts/renew.lua``); ``scripts/settle.lua`` settles a request.
The scripts take their arguments as one JSON object with named fields. See
docs/limits.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Final

import orjson
from redis.exceptions import NoScriptError

from .base import (
    USAGE_PAGE_MAX,
    Ask,
    Settlement,
    UsageCursor,
    UsagePage,
    UsageRow,
    remaining_dates,
    rows_page,
    scope_name,
)
from .identity import ANONYMOUS
from .rules import (
    CONCURRENCY_RETRY_MS,
    EXCESS_KEEP_MS,
    USAGE_KEEP_MS,
    VERIFIED_KEEP_MS,
    WINDOW_MS,
    Period,
    Reason,
    Used,
    Verdict,
    remaining,
)
from .store import Store

__all__ = ["SharedLimiter", "connect"]

# The constants of rules.py, as the scripts read them (K.window, …).
_CONSTANTS: Final = {
    "window": WINDOW_MS,
    "excess_ms": EXCESS_KEEP_MS,
    "concurrency_wait": CONCURRENCY_RETRY_MS,
    "usage_ms": USAGE_KEEP_MS,
    "verified_ms": VERIFIED_KEEP_MS,
    "anonymous": ANONYMOUS,
}


def _script(name: str) -> str:
    """Return the script ``scripts/<name>.lua``, preceded by the constants and calendar.lua."""
    folder = resources.files(__package__) / "scripts"
    constants = ", ".join(
        f"{key} = {value!r}" if isinstance(value, int) else f"{key} = '{value}'"
        for key, value in _CONSTANTS.items()
    )
    return (
        f"local K = {{{constants}}}\n"
        + (folder / "calendar.lua").read_text()
        + (folder / f"{name}.lua").read_text()
    )


ADMIT: Final = _script("admit")
SETTLE: Final = _script("settle")
RENEW: Final = _script("renew")
RENEW_CHUNK: Final = 1000

# A client's counters in a day's usage hash (fields <client>:<counter>), in the order that
# names its first one: the batch of a day's HSCAN that holds it returns the client's row.
USAGE_COUNTERS: Final = ("requests", "limited", "input", "output")
USAGE_SCANS: Final = 16  # HSCAN batches (and HMGETs) at most per page of usage


_SHAS: Final = {
    script: hashlib.sha1(script.encode()).hexdigest() for script in (ADMIT, SETTLE, RENEW)
}


def connect(url: str, timeout: float) -> Store:
    """Return a client for ``url`` (valkey:// is redis://) that fails fast: no retries, and
    connecting bounded by ``timeout`` (each call is bounded by its caller)."""
    return Store(url, timeout)


class SharedLimiter:
    """The Limiter whose state lives in Valkey or Redis."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        period: Period,
        lease: float,
        clock: Callable[[], int] | None = None,
    ) -> None:
        """``clock``: the time in ms the scripts take; None (production): the server's."""
        self.store = store
        self.prefix = prefix
        self.period = period
        self.lease_ms = int(lease * 1000)
        self._prefix = prefix.encode()
        self._clock = clock

    async def _run(self, script: str, args: Sequence[Any]) -> Any:
        """EVALSHA, and EVAL when the server does not know the script (a restart, a flush)."""
        try:
            return await self.store.execute("EVALSHA", _SHAS[script], 0, *args)
        except NoScriptError:
            return await self.store.execute("EVAL", script, 0, *args)

    def _now(self) -> int:
        return self._clock() if self._clock is not None else 0

    async def admit(self, ask: Ask) -> Verdict:
        fields = {
            "id": ask.id, "client": ask.client, "verify": ask.verify, "usage": ask.usage,
            "reserve": ask.reserve, "period": self.period, "lease": self.lease_ms,
            "now": self._now(),
            "scopes": [
                {"kind": kind, "rpm": rules.rpm, "tpm": rules.tpm,
                 "concurrency": rules.concurrency, "budget": rules.budget}
                for kind, rules in ask.scopes
            ],
        }  # fmt: skip
        reply = orjson.loads(await self._run(ADMIT, [self._prefix, orjson.dumps(fields)]))
        granted: bool = reply["granted"]
        scopes = reply["scopes"] or []  # Lua's cjson writes an empty list as {}
        used = [
            Used(s["rpm"], s["requests_used"], s["requests_reset"], s["tpm"], s["tokens_used"],
                 s["tokens_reset"])
            for s in scopes
        ]  # fmt: skip
        costs = [(int(s["cost"]), int(s["budget_cost"])) for s in scopes]
        reason: Reason | None = reply["reason"] or None
        return Verdict(
            granted,
            reason,
            0 if granted else max(1, int(reply["wait"])),
            remaining(used, costs if granted else None),
            reply["period"],
            reply["date"],
            reply["client"],
            tuple(costs) if granted else (),
            None if reply["budget_left"] < 0 else int(reply["budget_left"]),
        )

    async def settle_many(self, ended: Sequence[tuple[Ask, Verdict, Settlement]]) -> None:
        """Settle requests that ended: correct each one's tokens to the real count, end its
        lease, count its usage. One write."""
        pending = [[self._prefix, self._settlement(*one)] for one in ended]
        for attempt in (1, 2):
            replies = await self.store.execute_many(
                [("EVALSHA", _SHAS[SETTLE], 0, *args) for args in pending]
            )
            # Only those the server did not know the script for are sent again (after a
            # restart); any other failure is the store's, for the breaker.
            failed = [args for args, reply in zip(pending, replies, strict=True)
                      if isinstance(reply, NoScriptError)]  # fmt: skip
            other = next((r for r in replies if isinstance(r, Exception)
                          and not isinstance(r, NoScriptError)), None)  # fmt: skip
            if other is not None:
                raise other
            if not failed:
                return
            if attempt == 1:
                await self.store.execute("SCRIPT", "LOAD", SETTLE)
            pending = failed
        raise NoScriptError("SETTLE could not be loaded")

    def _settlement(self, ask: Ask, verdict: Verdict, ended: Settlement) -> bytes:
        return orjson.dumps(
            {
                "id": ask.id, "client": verdict.client, "reserve": ask.reserve,
                "input": ended.input_tokens, "output": ended.output_tokens,
                "period": verdict.period_id, "date": verdict.date, "usage": ask.usage,
                "accepted": ask.client
                if ended.accepted and ask.client.startswith("user-") else False,
                "now": self._now(),
                "scopes": [
                    {"name": scope_name(kind, verdict.client), "cost": cost,
                     "budget_cost": budget_cost, "tpm": bool(rules.tpm),
                     "budget": bool(rules.budget), "concurrency": bool(rules.concurrency)}
                    for (kind, rules), (cost, budget_cost)
                    in zip(ask.scopes, verdict.costs, strict=True)
                ],
            }
        )  # fmt: skip

    async def renew(self, leases: Sequence[tuple[str, str]]) -> None:
        """Push the expiry of this replica's leases (scope, id) forward: one pipelined batch,
        a script per 1,000 leases (each reads the server's clock)."""
        if not leases:
            return
        commands = [
            ("EVALSHA", _SHAS[RENEW], 0, self._prefix, orjson.dumps(
                {"lease": self.lease_ms, "now": self._now(),
                 "leases": leases[start : start + RENEW_CHUNK]}))
            for start in range(0, len(leases), RENEW_CHUNK)
        ]  # fmt: skip
        try:
            _raise_first(await self.store.execute_many(commands))
        except NoScriptError:
            await self.store.execute("SCRIPT", "LOAD", RENEW)
            await self.renew(leases)

    async def release(self, leases: Sequence[tuple[str, str]]) -> None:
        """End leases (scope, id) in one round trip."""
        if not leases:
            return
        _raise_first(
            await self.store.execute_many(
                [("ZREM", f"{self.prefix}c:{scope}", lease) for scope, lease in leases]
            )
        )

    async def usage_page(
        self,
        dates: Sequence[str],
        *,
        limit: int,
        cursor: UsageCursor | None = None,
        client: str | None = None,
    ) -> UsagePage:
        """A day's usage is one hash (``<client>:<counter>`` fields), read with HSCAN (COUNT
        the room left on the page) and one HMGET of the counters of the clients each batch
        names, at most USAGE_SCANS batches a page: bounded work at any number of clients.
        One client's fields lie anywhere in the hash, so a row is returned with the batch
        holding its first counter (USAGE_COUNTERS' order). A page that fills up inside a
        batch ends with that batch's cursor, its last client and the batch's fingerprint:
        the next page reads the batch again and starts after that client, or, if the batch
        changed meanwhile (the hash grew), returns it whole again (a row may repeat, none
        present all along is missed)."""
        if client is not None:
            return await self._own_usage(dates, limit, cursor, client)
        rows: list[UsageRow] = []
        scans = 0
        position = cursor
        for date in remaining_dates(dates, cursor):
            key = f"{self.prefix}usage:{date}"
            if position is None or position.date != date:
                position = UsageCursor(date)
            while True:
                room = limit - len(rows)
                if room == 0 or scans == USAGE_SCANS:
                    return UsagePage(rows, position)
                scans += 1
                # A batch the last page stopped inside is read again as it was read then
                # (bounded all the same: a cursor is the caller's text).
                count = min(position.count, USAGE_PAGE_MAX) or room
                scan, fields = await self.store.execute("HSCAN", key, position.scan, "COUNT", count)
                batch = await self._usage_batch(key, fields)
                fingerprint = hashlib.blake2b(
                    "\n".join(name for name, _ in batch).encode(), digest_size=6
                ).hexdigest()
                if position.batch == fingerprint:  # the batch the last page stopped inside
                    batch = [(name, row) for name, row in batch if name > position.after]
                rows += [UsageRow(date, name, *row) for name, row in batch[:room]]
                if len(batch) > room:
                    return UsagePage(
                        rows, UsageCursor(date, rows[-1].client, position.scan, count, fingerprint)
                    )
                if int(scan) == 0:
                    break
                position = UsageCursor(date, scan=int(scan))
            position = None
        return UsagePage(rows, None)

    async def _usage_batch(
        self, key: str, fields: Sequence[Any]
    ) -> list[tuple[str, tuple[int, int, int, int]]]:
        """Return the rows (client, requests, input, output, limited) whose first counter is
        among ``fields`` (an HSCAN batch: field, value, ...), in client order."""
        seen: dict[str, set[str]] = {}
        for field in fields[::2]:
            name, _, counter = _text(field).rpartition(":")
            if counter in USAGE_COUNTERS:
                seen.setdefault(name, set()).add(counter)
        if not seen:
            return []
        clients = sorted(seen)
        values = await self.store.execute(
            "HMGET", key, *[f"{name}:{counter}" for name in clients for counter in USAGE_COUNTERS]
        )
        batch = []
        for index, name in enumerate(clients):
            counters = values[index * 4 : index * 4 + 4]
            first = next(c for c, v in zip(USAGE_COUNTERS, counters, strict=True) if v is not None)
            if first in seen[name]:
                requests, limited, input_tokens, output_tokens = (int(v or 0) for v in counters)
                batch.append((name, (requests, input_tokens, output_tokens, limited)))
        return batch

    async def _own_usage(
        self, dates: Sequence[str], limit: int, cursor: UsageCursor | None, client: str
    ) -> UsagePage:
        """One client's rows: one HMGET of its counters per day, in one round trip."""
        wanted = remaining_dates(dates, cursor)
        fields = [f"{client}:{counter}" for counter in USAGE_COUNTERS]
        days = _raise_first(
            await self.store.execute_many(
                [("HMGET", f"{self.prefix}usage:{date}", *fields) for date in wanted]
            )
        )
        rows = []
        for date, counters in zip(wanted, days, strict=True):
            if any(value is not None for value in counters):
                requests, limited, input_tokens, output_tokens = (int(v or 0) for v in counters)
                rows.append(UsageRow(date, client, requests, input_tokens, output_tokens, limited))
        return rows_page(rows, limit)


def _raise_first(replies: list[Any]) -> list[Any]:
    """Raise the first error reply among ``replies``; else return them."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
