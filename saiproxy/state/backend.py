"""Where stored Responses state lives: in this process, or in Valkey/Redis for every replica.

Both backends keep the same things the same way: values under keys, lists of
ids (a conversation's items), every key with the same time to live
(``RESPONSES_TTL``, renewed by each write), and each client's bytes, so that
a write past the client's quota is refused before anything is written.

In the process the bytes are counted exactly (an entry's bytes come back when
it expires or is deleted) and the whole is bounded (``STATE_MAX_BYTES``, the
values and what Python spends per entry: the oldest entries go first).

In Valkey a client's bytes are counted in buckets of a thirtieth of the TTL,
each kept a little longer than the TTL: the sum of the buckets still alive is
what the client wrote within the TTL, at most one bucket's worth more than
what is still stored (a rewrite counts again; a deletion gives its bytes back
to the bucket they were counted in). A replica checks the quota against the
bytes its last write or read reported when they are under a second old
(``USED_FRESH``): several replicas together may overshoot it by what they
store within that second.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final, Protocol

import orjson

__all__ = [
    "BUCKETS",
    "ENTRY_OVERHEAD",
    "LOCAL_OVERHEAD",
    "Backend",
    "LocalBackend",
]

BUCKETS: Final = 30  # a client's bytes are counted in this many buckets per TTL
ENTRY_OVERHEAD: Final = 64  # bytes counted per key besides its name and value
# What an entry costs the process besides what is counted against its owner: the key's
# and the value's object headers, the entry's tuple, its expiry, the dict's slot.
LOCAL_OVERHEAD: Final = 320


class Backend(Protocol):
    """The operations the state needs; keys are built by the caller (saiproxy/state/store.py)."""

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return each key's value, None for a key that is absent or expired."""

    def receipt(self) -> int:
        """Return what a write made now is counted under (:meth:`delete` gives bytes back to it)."""

    async def put(
        self, owner: str, entries: Sequence[tuple[str, bytes]], *, quota: int, receipt: int
    ) -> int | None:
        """Write ``entries`` for ``owner``; return their bytes, or None (nothing written) if
        that would take ``owner`` past ``quota``. ``quota`` 0: written whatever it holds."""

    async def used(self, owner: str) -> int:
        """Return the bytes ``owner`` holds."""

    async def delete(self, owner: str, keys: Sequence[str], receipt: int, size: int) -> int:
        """Delete ``keys`` (written with ``receipt``, ``size`` bytes); return how many existed."""

    async def chain(
        self, record_key: str, item_prefix: str, more: Sequence[str]
    ) -> tuple[bytes | None, list[str], list[bytes | None]]:
        """Return a response's record, then the ids and values of the items of its ``chain``
        (then of ``more``): at once, one round trip in Valkey."""

    async def append(self, owner: str, key: str, values: Sequence[str]) -> None:
        """Add ``values`` at the end of the list ``key`` (and renew its time to live)."""

    async def members(self, key: str) -> list[str]:
        """Return the list ``key`` (empty when absent)."""

    async def remove(self, key: str, value: str) -> None:
        """Take ``value`` out of the list ``key``."""

    async def close(self) -> None:
        """Let go of connections."""


def _size(key: str, value: bytes | list[str]) -> int:
    if isinstance(value, bytes):
        return len(key) + len(value) + ENTRY_OVERHEAD
    return len(key) + sum(len(v) + 16 for v in value) + ENTRY_OVERHEAD


class LocalBackend:
    """The state in this process: bounded in time (the TTL) and in bytes (``max_bytes``).

    Every key has the same time to live from its last write, so the entries'
    order of writing is their order of expiry: the oldest is always first, and
    expiry and the total bound both take from the front.
    """

    def __init__(self, ttl: float, max_bytes: int, clock: Any = time.monotonic) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._clock = clock
        # key -> (expiry, value, size, owner)
        self._entries: OrderedDict[str, tuple[float, bytes | list[str], int, str]] = OrderedDict()
        self._used: dict[str, int] = {}
        self.total = 0
        self.evicted = 0  # entries dropped for the total bound, not their age

    def _drop(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        _, _, size, owner = entry
        self.total -= size + LOCAL_OVERHEAD
        left = self._used.get(owner, 0) - size
        if left > 0:
            self._used[owner] = left
        else:
            self._used.pop(owner, None)
        return True

    def _sweep(self) -> None:
        now = self._clock()
        entries = self._entries
        while entries:
            key, (expiry, *_rest) = next(iter(entries.items()))
            if expiry > now and self.total <= self.max_bytes:
                break
            if expiry > now:
                self.evicted += 1
            self._drop(key)

    def _set(self, owner: str, key: str, value: bytes | list[str]) -> int:
        self._drop(key)
        size = _size(key, value)
        if isinstance(value, bytes):
            # orjson's result keeps a buffer of 4 KB or more whatever its length: what is
            # kept is an exact-size copy, so that the bytes counted are the bytes held.
            value = bytes(memoryview(value))
        self._entries[key] = (self._clock() + self.ttl, value, size, owner)
        self.total += size + LOCAL_OVERHEAD
        self._used[owner] = self._used.get(owner, 0) + size
        return size

    def _live(self, key: str) -> bytes | list[str] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(key)
            return None
        return entry[1]

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for key in keys:
            value = self._live(key)
            found.append(value if isinstance(value, bytes) else None)
        return found

    def receipt(self) -> int:
        return 0  # the bytes are counted per key here

    async def put(
        self, owner: str, entries: Sequence[tuple[str, bytes]], *, quota: int, receipt: int
    ) -> int | None:
        self._sweep()
        size = sum(_size(key, value) for key, value in entries)
        if quota and self._used.get(owner, 0) + size > quota:
            return None
        for key, value in entries:
            self._set(owner, key, value)
        self._sweep()  # the total bound
        return size

    async def used(self, owner: str) -> int:
        self._sweep()
        return self._used.get(owner, 0)

    async def delete(self, owner: str, keys: Sequence[str], receipt: int, size: int) -> int:
        return sum(self._drop(key) for key in keys)

    async def chain(
        self, record_key: str, item_prefix: str, more: Sequence[str]
    ) -> tuple[bytes | None, list[str], list[bytes | None]]:
        (record,) = await self.get([record_key])
        ids = [*(orjson.loads(record)["chain"] if record is not None else ()), *more]
        return record, ids, await self.get([item_prefix + i for i in ids])

    async def append(self, owner: str, key: str, values: Sequence[str]) -> None:
        current = self._live(key)
        listed = [*current, *values] if isinstance(current, list) else list(values)
        self._set(owner, key, listed)
        self._sweep()

    async def members(self, key: str) -> list[str]:
        value = self._live(key)
        return list(value) if isinstance(value, list) else []

    async def remove(self, key: str, value: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and isinstance(entry[1], list):
            self._set(entry[3], key, [v for v in entry[1] if v != value])

    async def close(self) -> None:
        self._entries.clear()
        self._used.clear()
        self.total = 0
