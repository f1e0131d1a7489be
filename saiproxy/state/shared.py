"""Stored Responses state in Valkey/Redis, for every replica (see backend.py's docstring).

Imported only when a store is configured: the Redis client costs about 9 MB
and 80 ms at start (and, with OpenTelemetry installed, imports it), for
nothing when the state lives in the process.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from typing import Any, Final

from redis.exceptions import NoScriptError, RedisError

from ..base.errors import StateUnavailable
from ..limits.store import Store
from .backend import BUCKETS, ENTRY_OVERHEAD

__all__ = ["SharedBackend"]


# ARGV: the client's bucket key prefix, the bucket, buckets per TTL, bucket ms, TTL ms,
# quota (0: none), then key, value pairs. Returns {written 1|0, bytes, the client's bytes}.
_PUT: Final = """
local ub, b, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local width, ttl, quota = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local size = 0
for i = 7, #ARGV, 2 do size = size + #ARGV[i] + #ARGV[i + 1] + __OVERHEAD__ end
local used = 0
for i = b - n, b do used = used + tonumber(redis.call('GET', ub .. i) or '0') end
if quota > 0 and used + size > quota then return {0, size, used} end
for i = 7, #ARGV, 2 do redis.call('SET', ARGV[i], ARGV[i + 1], 'PX', ttl) end
local k = ub .. b
redis.call('INCRBY', k, size)
redis.call('PEXPIRE', k, (n + 2) * width)
return {1, size, used + size}
""".replace("__OVERHEAD__", str(ENTRY_OVERHEAD))
# ARGV: the bucket's key, the bytes to give back, then the keys. Returns how many existed.
_DELETE: Final = """
local gone = redis.call('DEL', unpack(ARGV, 3))
if gone > 0 and redis.call('EXISTS', ARGV[1]) == 1 then
  redis.call('DECRBY', ARGV[1], tonumber(ARGV[2]))
end
return gone
"""
# ARGV: a response's record key, its items' key prefix, then more item ids. Returns the
# record (nil when absent), the ids of its chain then the others, and their values.
_CHAIN: Final = """
local record = redis.call('GET', ARGV[1])
local ids = {}
if record then ids = cjson.decode(record)['chain'] end
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
local values = {}
for start = 1, #ids, 1000 do
  local keys = {}
  for i = start, math.min(start + 999, #ids) do keys[#keys + 1] = ARGV[2] .. ids[i] end
  local part = redis.call('MGET', unpack(keys))
  for _, value in ipairs(part) do values[#values + 1] = value end
end
return {record, ids, values}
"""
_SHAS: Final = {
    script: hashlib.sha1(script.encode()).hexdigest() for script in (_PUT, _DELETE, _CHAIN)
}
# Seconds a replica checks a client's quota against the bytes its last write or read
# reported, rather than reading them again before each request (a round trip saved).
USED_FRESH: Final = 1.0


class SharedBackend:
    """The state in Valkey or Redis: every replica reads what any other wrote, at once.

    Each write is sent as soon as it is made (the auto-pipelined client puts
    the writes of one turn of the event loop in one packet) and awaited: a
    Response is answered only once it is stored.
    """

    def __init__(self, store: Store, prefix: str, ttl: float, timeout: float) -> None:
        self.store = store
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl * 1000))
        self.width_ms = max(1, self.ttl_ms // BUCKETS)
        self.timeout = timeout
        self._used: dict[str, tuple[float, int]] = {}  # owner -> (when, bytes), USED_FRESH

    async def _call(self, *command: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.store.execute(*command)
        except (TimeoutError, RedisError, OSError) as exc:
            raise StateUnavailable(
                f"the state store did not answer ({type(exc).__name__}); try again"
            ) from None

    async def _run(self, script: str, args: Sequence[Any]) -> Any:
        try:
            return await self._call("EVALSHA", _SHAS[script], 0, *args)
        except StateUnavailable as exc:
            if not isinstance(exc.__context__, NoScriptError):
                raise
        return await self._call("EVAL", script, 0, *args)

    def _buckets(self, owner: str) -> str:
        return f"{self.prefix}u:{len(owner)}:{owner}:"

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        found: list[bytes | None] = await self._call("MGET", *keys)
        return found

    def receipt(self) -> int:
        return int(time.time() * 1000) // self.width_ms  # the bucket of now

    async def put(
        self, owner: str, entries: Sequence[tuple[str, bytes]], *, quota: int, receipt: int
    ) -> int | None:
        args: list[Any] = [self._buckets(owner), receipt, BUCKETS, self.width_ms, self.ttl_ms]
        args.append(quota)
        for key, value in entries:
            args += [key, value]
        reply = await self._run(_PUT, args)
        self._note(owner, int(reply[2]))
        if int(reply[0]) != 1:
            return None
        return int(reply[1])

    def _note(self, owner: str, used: int) -> None:
        if len(self._used) > 100_000:  # clients seen within USED_FRESH: bounded anyway
            self._used.clear()
        self._used[owner] = (time.monotonic(), used)

    async def used(self, owner: str) -> int:
        known = self._used.get(owner)
        if known is not None and time.monotonic() - known[0] < USED_FRESH:
            return known[1]
        used = await self._read_used(owner)
        self._note(owner, used)
        return used

    async def _read_used(self, owner: str) -> int:
        bucket, base = self.receipt(), self._buckets(owner)
        keys = [f"{base}{b}" for b in range(bucket - BUCKETS, bucket + 1)]
        counts = await self._call("MGET", *keys)
        return sum(int(count) for count in counts if count is not None)

    async def delete(self, owner: str, keys: Sequence[str], receipt: int, size: int) -> int:
        if not keys:
            return 0
        self._used.pop(owner, None)  # read again: this replica gives the bytes back at once
        return int(await self._run(_DELETE, [f"{self._buckets(owner)}{receipt}", size, *keys]))

    async def chain(
        self, record_key: str, item_prefix: str, more: Sequence[str]
    ) -> tuple[bytes | None, list[str], list[bytes | None]]:
        record, ids, values = await self._run(_CHAIN, [record_key, item_prefix, *more])
        return record, [i.decode() for i in ids], values

    async def append(self, owner: str, key: str, values: Sequence[str]) -> None:
        if not values:
            return
        size = sum(len(v) + 16 for v in values)
        bucket = f"{self._buckets(owner)}{self.receipt()}"
        try:
            async with asyncio.timeout(self.timeout):
                replies = await self.store.execute_many(
                    [("RPUSH", key, *values), ("PEXPIRE", key, self.ttl_ms),
                     ("INCRBY", bucket, size), ("PEXPIRE", bucket, (BUCKETS + 2) * self.width_ms)]
                )  # fmt: skip
        except (TimeoutError, RedisError, OSError) as exc:
            raise StateUnavailable(
                f"the state store did not answer ({type(exc).__name__}); try again"
            ) from None
        for reply in replies:
            if isinstance(reply, Exception):
                raise StateUnavailable("the state store refused a write; try again")

    async def members(self, key: str) -> list[str]:
        listed = await self._call("LRANGE", key, 0, -1)
        return [value.decode() for value in listed]

    async def remove(self, key: str, value: str) -> None:
        await self._call("LREM", key, 0, value)

    async def close(self) -> None:
        await self.store.aclose()
