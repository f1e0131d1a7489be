"""Limits held in Valkey or Redis, shared by every replica.

One Lua script per admission checks every limit of every scope at once, with
the server's clock (``TIME``), and takes the request's share only when all
pass: no two replicas can both take the last slot. Windows are sliding logs
(sorted sets scored by time); concurrency is a sorted set of leases scored by
their expiry, renewed in one pipelined batch per replica. See docs/limits.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

from redis.exceptions import NoScriptError

from .base import (
    USAGE_PAGE_MAX,
    Ask,
    UsageCursor,
    UsagePage,
    UsageRow,
    remaining_dates,
    rows_page,
)
from .rules import (
    CONCURRENCY_RETRY_MS,
    EXCESS_KEEP_MS,
    WINDOW_MS,
    Figures,
    Period,
    Verdict,
    tighter,
)
from .store import Store

_CONSTANTS: Final = {
    "__WINDOW__": WINDOW_MS,
    "__EXCESS_MS__": EXCESS_KEEP_MS,
    "__CONCURRENCY_WAIT__": CONCURRENCY_RETRY_MS,
    "__USAGE_MS__": 40 * 86_400_000,  # usage is kept 40 days
}


def _lua(script: str) -> str:
    """Return ``script`` with the constants it names filled in."""
    for name, value in _CONSTANTS.items():
        script = script.replace(name, str(value))
    return script


# Key names are built in the scripts from the prefix (the day and the budget's period come
# from the server's clock): a standalone server or one primary, not a cluster.
_CALENDAR: Final = """
local function fl(x) return math.floor(x) end
local function civil(z)
  z = z + 719468
  local era = fl(z / 146097)
  local doe = z - era * 146097
  local yoe = fl((doe - fl(doe / 1460) + fl(doe / 36524) - fl(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + fl(yoe / 4) - fl(yoe / 100))
  local mp = fl((5 * doy + 2) / 153)
  local d = doy - fl((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = fl(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = fl((153 * mp + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + fl(yoe / 4) - fl(yoe / 100) + doy - 719468
end
local function tokens_of(member) return tonumber(string.match(member, ':(%d+)$')) end
"""
# Few arguments are cheaper to send than many (the client encodes each one): the prefix,
# then every other argument as one space-separated string.
_ARGUMENTS: Final = """
local A = {ARGV[1]}
for word in string.gmatch(ARGV[2], '[^ ]+') do A[#A + 1] = word end
"""

# A (the arguments: ARGV[1] the prefix, then ARGV[2]'s words): prefix, id, lease ms, reserve,
# period (day|month), usage client (- for none), scope count, then per scope: name, rpm, tpm,
# concurrency, budget.
# Returns: granted (1|0), reason, wait ms, date, period, then per scope
# rpm, requests used, requests reset ms, tpm, tokens used, tokens reset ms (before this one),
# token cost (the reservation and the scope's learned excess, at most the tpm).
ADMIT: Final = _lua(
    _CALENDAR
    + _ARGUMENTS
    + """
local P, id = A[1], A[2]
local lease_ms, reserve = tonumber(A[3]), tonumber(A[4])
local who, n = A[6], tonumber(A[7])
local W = __WINDOW__
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + fl(tonumber(t[2]) / 1000)
local day = fl(now / 86400000)
local y, m, d = civil(day)
local date = string.format('%04d-%02d-%02d', y, m, d)
local period, period_end = date, (day + 1) * 86400000
if A[5] == 'month' then
  period = string.format('%04d-%02d', y, m)
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  period_end = days_from_civil(y, m, 1) * 86400000
end
local uk = P .. 'usage:' .. date
local out, costs = {}, {}
local deny, wait = '', 0
for i = 0, n - 1 do
  local b = 8 + i * 5
  local name = A[b]
  local rpm, tpm = tonumber(A[b + 1]), tonumber(A[b + 2])
  local conc, budget = tonumber(A[b + 3]), tonumber(A[b + 4])
  local cost = 0
  if tpm > 0 then
    cost = math.min(reserve + tonumber(redis.call('GET', P .. 'x:' .. name) or '0'), tpm)
  end
  costs[i] = cost
  local rk, tk = P .. 'r:' .. name, P .. 't:' .. name
  local sk, ck = P .. 'ts:' .. name, P .. 'c:' .. name
  local r_used, r_reset, t_used, t_reset = 0, 0, 0, 0
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', rk, '-inf', now - W)
    r_used = redis.call('ZCARD', rk)
    if r_used > 0 then
      r_reset = tonumber(redis.call('ZRANGE', rk, 0, 0, 'WITHSCORES')[2]) + W - now
    end
    if deny == '' and r_used >= rpm then
      local nth = redis.call('ZRANGE', rk, r_used - rpm, r_used - rpm, 'WITHSCORES')
      deny, wait = 'requests', tonumber(nth[2]) + W - now
    end
  end
  if tpm > 0 then
    local old = redis.call('ZRANGEBYSCORE', tk, '-inf', now - W)
    if #old > 0 then
      local gone = 0
      for _, member in ipairs(old) do gone = gone + tokens_of(member) end
      redis.call('DECRBY', sk, gone)
      redis.call('ZREMRANGEBYSCORE', tk, '-inf', now - W)
    end
    t_used = tonumber(redis.call('GET', sk) or '0')
    local first = redis.call('ZRANGE', tk, 0, 0, 'WITHSCORES')
    if first[2] then t_reset = tonumber(first[2]) + W - now end
    if deny == '' and t_used + cost > tpm then
      local entries = redis.call('ZRANGE', tk, 0, -1, 'WITHSCORES')
      local left = t_used
      deny, wait = 'tokens', W
      for j = 1, #entries, 2 do
        left = left - tokens_of(entries[j])
        if left + cost <= tpm then
          wait = tonumber(entries[j + 1]) + W - now
          break
        end
      end
    end
  end
  if conc > 0 and deny == '' then
    redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
    if redis.call('ZCARD', ck) >= conc then deny, wait = 'concurrency', __CONCURRENCY_WAIT__ end
  end
  if budget > 0 and deny == '' then
    local used = tonumber(redis.call('GET', P .. 'b:' .. name .. ':' .. period) or '0')
    if used + reserve > budget then deny, wait = 'budget', period_end - now end
  end
  for _, v in ipairs({rpm, r_used, r_reset, tpm, t_used, t_reset, cost}) do
    out[#out + 1] = v
  end
end
local head
if deny ~= '' then
  if who ~= '-' then
    redis.call('HINCRBY', uk, who .. ':limited', 1)
    redis.call('PEXPIRE', uk, __USAGE_MS__)
  end
  head = {0, deny, wait, date, period}
else
  for i = 0, n - 1 do
    local b = 8 + i * 5
    local name = A[b]
    local rpm, tpm = tonumber(A[b + 1]), tonumber(A[b + 2])
    local conc, budget, cost = tonumber(A[b + 3]), tonumber(A[b + 4]), costs[i]
    if rpm > 0 then
      local rk = P .. 'r:' .. name
      redis.call('ZADD', rk, now, id)
      redis.call('PEXPIRE', rk, W + 1000)
    end
    if tpm > 0 then
      local tk, sk = P .. 't:' .. name, P .. 'ts:' .. name
      redis.call('ZADD', tk, now, id .. ':' .. cost)
      redis.call('INCRBY', sk, cost)
      redis.call('PEXPIRE', tk, W + 1000)
      redis.call('PEXPIRE', sk, W + 1000)
    end
    if conc > 0 then
      local ck = P .. 'c:' .. name
      redis.call('ZADD', ck, now + lease_ms, id)
      redis.call('PEXPIRE', ck, lease_ms + W)
    end
    if budget > 0 then
      local bk = P .. 'b:' .. name .. ':' .. period
      redis.call('INCRBY', bk, reserve)
      redis.call('PEXPIREAT', bk, period_end + 86400000)
    end
  end
  if who ~= '-' then
    redis.call('HINCRBY', uk, who .. ':requests', 1)
    redis.call('PEXPIRE', uk, __USAGE_MS__)
  end
  head = {1, '', 0, date, period}
end
for _, v in ipairs(out) do head[#head + 1] = v end
return head
"""
)

# A: prefix, id, reserve, actual tokens, input, output, period, date, usage client (- for
# none), scope count, then per scope: name, token cost, has tpm, has budget, has concurrency.
# A scope with a tpm learns its answers' excess over their reservations (x:<scope>): up at
# once to a larger one, down a quarter of the way to a smaller one (rules.learn_excess).
SETTLE: Final = _lua(
    _CALENDAR
    + _ARGUMENTS
    + """
local P, id = A[1], A[2]
local reserve, actual = tonumber(A[3]), tonumber(A[4])
local period, date, who, n = A[7], A[8], A[9], tonumber(A[10])
for i = 0, n - 1 do
  local b = 11 + i * 5
  local name = A[b]
  if A[b + 2] == '1' then
    local tk, sk = P .. 't:' .. name, P .. 'ts:' .. name
    local held = id .. ':' .. A[b + 1]
    local score = redis.call('ZSCORE', tk, held)
    if score then
      redis.call('ZREM', tk, held)
      redis.call('ZADD', tk, score, id .. ':' .. actual)
      redis.call('INCRBY', sk, actual - tonumber(A[b + 1]))
    end
    local xk = P .. 'x:' .. name
    local sample = math.max(0, actual - reserve)
    local learned = tonumber(redis.call('GET', xk))
    if learned and sample < learned then sample = learned + fl((sample - learned) / 4) end
    redis.call('SET', xk, sample, 'PX', __EXCESS_MS__)
  end
  if A[b + 3] == '1' then
    local bk = P .. 'b:' .. name .. ':' .. period
    if redis.call('EXISTS', bk) == 1 then redis.call('INCRBY', bk, actual - reserve) end
  end
  if A[b + 4] == '1' then redis.call('ZREM', P .. 'c:' .. name, id) end
end
if who ~= '-' then
  local uk = P .. 'usage:' .. date
  redis.call('HINCRBY', uk, who .. ':input', tonumber(A[5]))
  redis.call('HINCRBY', uk, who .. ':output', tonumber(A[6]))
  redis.call('PEXPIRE', uk, __USAGE_MS__)
end
return 1
"""
)


# ARGV: prefix, lease ms, then (scope, id) pairs. A plain ZADD: a server that lost its data
# (a restart without persistence) gets the leases of the requests still running back.
RENEW: Final = _lua("""
local P, lease_ms = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + lease_ms
for i = 3, #ARGV, 2 do
  local ck = P .. 'c:' .. ARGV[i]
  redis.call('ZADD', ck, expiry, ARGV[i + 1])
  redis.call('PEXPIRE', ck, lease_ms + __WINDOW__)
end
return 1
""")
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

    def __init__(self, store: Store, prefix: str, period: Period, lease: float) -> None:
        self.store = store
        self.prefix = prefix
        self.period = period
        self.lease_ms = int(lease * 1000)
        self._prefix = prefix.encode()

    async def _run(self, script: str, args: Sequence[Any]) -> Any:
        """EVALSHA, and EVAL when the server does not know the script (a restart, a flush)."""
        try:
            return await self.store.execute("EVALSHA", _SHAS[script], 0, *args)
        except NoScriptError:
            return await self.store.execute("EVAL", script, 0, *args)

    def _words(self, values: Sequence[object]) -> list[bytes]:
        return [self._prefix, " ".join(map(str, values)).encode()]

    async def admit(self, ask: Ask) -> Verdict:
        words: list[object] = [
            ask.id, self.lease_ms, ask.reserve, self.period, ask.client.id or "-", len(ask.scopes),
        ]  # fmt: skip
        for name, rules in ask.scopes:
            words += [name, rules.rpm, rules.tpm, rules.concurrency, rules.budget]
        reply = await self._run(ADMIT, self._words(words))
        granted = int(reply[0]) == 1
        reason = _text(reply[1]) or None
        figures: Figures | None = None
        costs: list[int] = []
        for index in range(len(ask.scopes)):
            start = 5 + index * 7
            rpm, r_used, r_reset, tpm, t_used, t_reset, cost = (
                int(v) for v in reply[start : start + 7]
            )
            costs.append(cost)
            taken, cost = (1, cost) if granted else (0, 0)
            figures = tighter(
                figures,
                Figures(
                    rpm,
                    max(0, rpm - r_used - taken),
                    r_reset or (WINDOW_MS if taken else 0),
                    tpm,
                    max(0, tpm - t_used - cost),
                    t_reset or (WINDOW_MS if taken else 0),
                ),
            )
        return Verdict(
            granted,
            reason,  # type: ignore[arg-type]
            max(1, int(reply[2])) if not granted else 0,
            figures,
            _text(reply[4]),
            _text(reply[3]),
            tuple(costs) if granted else (),
        )

    async def settle(
        self, ask: Ask, verdict: Verdict, input_tokens: int, output_tokens: int
    ) -> None:
        await self.settle_many([(ask, verdict, input_tokens, output_tokens)])

    async def settle_many(self, ended: Sequence[tuple[Ask, Verdict, int, int]]) -> None:
        """Settle requests that ended (ask, verdict, input, output tokens): one write."""
        pending = [self._words(self._settle_words(*one)) for one in ended]
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

    @staticmethod
    def _settle_words(
        ask: Ask, verdict: Verdict, input_tokens: int, output_tokens: int
    ) -> list[object]:
        words: list[object] = [
            ask.id, ask.reserve, input_tokens + output_tokens, input_tokens, output_tokens,
            verdict.period_id, verdict.date, ask.client.id or "-", len(ask.scopes),
        ]  # fmt: skip
        for (name, rules), cost in zip(ask.scopes, verdict.costs, strict=True):
            words += [
                name, cost, int(bool(rules.tpm)), int(bool(rules.budget)),
                int(bool(rules.concurrency)),
            ]  # fmt: skip
        return words

    async def renew(self, leases: Sequence[tuple[str, str]]) -> None:
        """Push the expiry of this replica's leases (scope, id) forward: one pipelined batch,
        a script per 1,000 leases (each reads the server's clock)."""
        if not leases:
            return
        commands: list[list[Any]] = []
        for start in range(0, len(leases), RENEW_CHUNK):
            args: list[Any] = ["EVALSHA", _SHAS[RENEW], 0, self.prefix, self.lease_ms]
            for scope, lease in leases[start : start + RENEW_CHUNK]:
                args += [scope, lease]
            commands.append(args)
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

    async def release_all(self) -> None:  # the facade knows the leases; see Limits.drain
        return None

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
