"""The limits of one replica: the store, the circuit breaker in front of it, the leases it holds.

With LIMITS_URL every admission goes to the shared store. A call that fails,
or that the store leaves unanswered for LIMITS_TIMEOUT (see reply.py:
a store that answers, only later than this busy loop wished, is not down),
opens the breaker: the request (and every one after it) is admitted by this
replica's share of the limits (limit / LIMITS_REPLICAS) in the process, and a
probe asks the store every LIMITS_PROBE_INTERVAL until it answers, pushes the
leases of the requests admitted meanwhile, and the shared mode comes back. No
request ever fails because the store did.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import secrets
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Final, TypeVar

from aiohttp import web

from ..base.log import limits_logger as log
from ..base.metrics import Metrics
from ..base.settings import Settings
from ..upstream.auth import Credential
from .base import Ask, Limiter, ScopeKind, Settlement, UsageCursor, UsagePage, UsageRow
from .grant import NOTHING, Grant, lease_pairs, leased, possible_leases
from .identity import Client, Identify
from .local import LocalLimiter
from .metrics import LimitMetrics, Mode
from .reply import reply
from .rules import Config, Rules, Verdict

__all__ = ["LIMITS", "USAGE_PAGE_TIMEOUT", "Limits", "enabled"]


if TYPE_CHECKING:
    from .shared import SharedLimiter

# One page of usage may take this long (its work is bounded: see SharedLimiter.usage_page);
# an admin's read, so not LIMITS_TIMEOUT, and its failure does not open the breaker.
USAGE_PAGE_TIMEOUT: Final = 5.0

_T = TypeVar("_T")


def enabled(settings: Settings) -> bool:
    """Return whether the limits run: a store is named, or any limit is set."""
    config = Config.from_settings(settings)
    return settings.limits_url is not None or config.client.any or config.shared.any


class Limits:
    """The replica's limits (see the module's docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.config = config = Config.from_settings(settings)
        self.settings = settings
        self.identify = Identify(settings.proxy_api_keys, settings.sai_session_cookie)
        self.metrics = LimitMetrics(metrics)
        self.timeout = settings.limits_timeout
        self._ids = itertools.count()
        self._replica = secrets.token_hex(4)
        self.shared: SharedLimiter | None = None
        self.local = LocalLimiter(config.period)
        self.local_config = config
        if settings.limits_url is not None:
            # Imported only with a store: the Redis client costs about 9 MB
            # and 80 ms at start, for nothing when the limits run in the process.
            from .shared import SharedLimiter, connect

            self.shared = SharedLimiter(
                connect(settings.limits_url.reveal(), settings.limits_timeout),
                settings.limits_prefix,
                config.period,
                settings.limits_lease,
            )
            # While the store is unreachable: this replica's share of every limit.
            self.local_config = config.share(settings.limits_replicas)
        self.mode: Mode = "shared" if self.shared is not None else "local"
        self.metrics.set_mode(self.mode)
        # The leases this replica holds in the store: id -> scopes with a concurrency limit.
        self.leases: dict[str, tuple[str, ...]] = {}
        self._renewing: set[str] | None = None
        self._released_while_renewing: list[tuple[str, str]] = []
        self._tasks: set[asyncio.Task[object]] = set()
        self._settling: list[tuple[Ask, Verdict, Settlement]] = []
        # Leases to end once the store answers again (scope, id): of requests that ended while
        # it was down, or that a failed store call may have left behind. Ended by the probe.
        self._orphans: list[tuple[str, str]] = []
        self._probe: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self.last_switch = time.monotonic()

    # --- admission

    def ask(
        self, client: Client, reserve: int, config: Config, kinds: tuple[ScopeKind, ...]
    ) -> Ask:
        scopes: list[tuple[ScopeKind, Rules]] = []
        if "client" in kinds and config.client.any:
            scopes.append(("client", config.client))
        if "global" in kinds and client.shared and config.shared.any:
            scopes.append(("global", config.shared))
        # A credential this replica knows SAI accepted (or the store did) needs no check:
        # its own client even if the store lost its data meanwhile.
        verify = client.verify and not self.local.accepted(client.id)
        return Ask(
            f"{self._replica}.{next(self._ids):x}", client.id, verify, reserve, tuple(scopes),
            usage="client" in kinds,
        )  # fmt: skip

    async def admit(
        self,
        client: Client,
        reserve: int,
        kinds: tuple[ScopeKind, ...] = ("client", "global"),
    ) -> Grant:
        """Admit the request or refuse it; never fails because the store did.

        Whatever happens during it (the client hangs up, the handler is
        cancelled at any await, the store is slow), an admission that the
        store granted ends in exactly one settlement: the store's call runs in
        a task of its own, which a cancellation of the request does not cut; a
        grant nobody waits for any more is settled at once, as a request that
        never reached SAI (``_abandoned``), and one that lands after the
        request was admitted locally belongs to that request (``_late``).
        """
        if self.shared is not None and self.mode == "shared":
            ask = self.ask(client, reserve, self.config, kinds)
            call = asyncio.ensure_future(self.shared.admit(ask))
            self._tasks.add(call)  # a drain waits for it
            call.add_done_callback(self._tasks.discard)
            try:
                verdict = await reply(self.shared.store, call, self.timeout)
            except asyncio.CancelledError:
                call.add_done_callback(functools.partial(self._abandoned, ask))
                raise
            except Exception as error:
                self._failed(error)
                return self._admit_locally(client, reserve, kinds, (ask, call))
            return self._admitted(ask, verdict)
        # In the process nothing waits: a cancellation cannot land inside the admission.
        return self._admit_locally(client, reserve, kinds)

    def admit_at_once(
        self, client: Client, reserve: int, kinds: tuple[ScopeKind, ...] = ("client", "global")
    ) -> Grant | None:
        """:meth:`admit` when it need not wait (the limits held in the process); None when the
        store decides. Spares the in-process admission a coroutine."""
        if self.shared is not None and self.mode == "shared":
            return None
        return self._admit_locally(client, reserve, kinds)

    def _admitted(self, ask: Ask, verdict: Verdict) -> Grant:
        """The store's verdict on ``ask``: its grant, its lease noted for renewals."""
        assert self.shared is not None
        grant = Grant(ask, verdict, self.shared)
        if ask.verify and verdict.client == ask.client:
            self.local.accept(ask.client)  # known here too if the store goes down
        if verdict.granted and (scopes := leased(ask, verdict.client)):
            self.leases[ask.id] = scopes
        self._count(grant)
        return grant

    def _abandoned(self, ask: Ask, call: asyncio.Future[Verdict]) -> None:
        """The request of an admission in progress went away: settle what it was granted."""
        if call.cancelled() or call.exception() is not None:
            self._end_leases(possible_leases(ask))  # unknown whether it took them
            return
        self.settle(self._admitted(ask, call.result()), NOTHING)

    def _admit_locally(
        self,
        client: Client,
        reserve: int,
        kinds: tuple[ScopeKind, ...],
        given_up: tuple[Ask, asyncio.Future[Verdict]] | None = None,
    ) -> Grant:
        """Admit by this replica's share. With a store, the lease is also kept in
        ``self.leases``: the probe pushes it to the store when it answers again, so the
        requests admitted meanwhile count there, and it ends at the request's settlement.
        ``given_up``: the store's admission of this request that failed or was given up on;
        the request keeps its id (one lease in the store, whoever took it)."""
        ask = self.ask(client, reserve, self.local_config, kinds)
        if given_up is not None:
            ask = dataclasses.replace(ask, id=given_up[0].id)
        grant = Grant(ask, self.local.admit_now(ask), self.local)
        self._count(grant)
        verdict = grant.verdict
        if self.shared is not None and verdict.granted and (scopes := leased(ask, verdict.client)):
            self.leases[ask.id] = scopes
        if given_up is not None:
            store_ask, call = given_up
            if call.done():
                self._late(store_ask, grant, call)
            else:
                call.add_done_callback(functools.partial(self._late, store_ask, grant))
        return grant

    def _late(self, ask: Ask, grant: Grant, call: asyncio.Future[Verdict]) -> None:
        """The store's admission of a request admitted locally ended, after it was given up
        on: what it took in the store belongs to the request, and ends with it (at once if
        the request has ended, or was refused here). Never deleted while the request runs."""
        assert self.shared is not None
        running = grant.verdict.granted and not grant.settled
        if call.cancelled() or call.exception() is not None:
            # Unknown whether the lease was taken: a running request's own lease has its id
            # (pushed by the probe, ended at settlement); otherwise end it once the store answers.
            if not running:
                self._end_leases(possible_leases(ask))
            return
        verdict = call.result()
        if not verdict.granted:
            return
        late = Grant(ask, verdict, self.shared)
        if running:
            grant.late = late
        else:
            self._settle_shared(late, grant.ended)

    def settle(self, grant: Grant, ended: Settlement) -> None:
        """The request ended (however): correct its tokens and end its lease, in the background
        so that neither a cancellation nor a slow store delays the end of the answer."""
        if grant.settled or not grant.verdict.granted:
            return
        grant.settled = True
        grant.ended = ended
        client = grant.verdict.client
        if client in self.identify.proxy_ids and grant.ask.usage:
            self.metrics.client_tokens.labels(client, "input").inc(ended.input_tokens)
            self.metrics.client_tokens.labels(client, "output").inc(ended.output_tokens)
        if ended.accepted and grant.ask.client.startswith("user-"):
            self.local.accept(grant.ask.client)
        leased = self.leases.pop(grant.ask.id, None)
        if leased is not None and self._renewing is not None and grant.ask.id in self._renewing:
            self._released_while_renewing += [(scope, grant.ask.id) for scope in leased]
        if grant.limiter is self.local:
            self.local.settle_now(grant.ask, grant.verdict, ended)
            if grant.late is not None:  # the store's grant, landed late: its settlement ends it
                self._settle_shared(grant.late, ended)
            elif leased is not None:  # admitted in fallback: its lease may be in the store
                self._end_leases([(scope, grant.ask.id) for scope in leased])
            return
        self._settle_shared(grant, ended)

    def _settle_shared(self, grant: Grant, ended: Settlement) -> None:
        # Sent in the background, together with the other requests ending meanwhile: one
        # pipelined round trip for all of them.
        self._settling.append((grant.ask, grant.verdict, ended))
        if len(self._settling) == 1:
            self._background(self._settle_batch())

    def _end_leases(self, pairs: list[tuple[str, str]]) -> None:
        """End leases in the store: now if it answers, else by the probe once it does (after
        it has pushed the running ones)."""
        if self.mode == "shared":
            self._background(self._release(pairs))
        else:
            self._orphans += pairs

    async def _release(self, pairs: list[tuple[str, str]]) -> None:
        assert self.shared is not None
        try:
            await self._call(self.shared.release(pairs))
        except Exception as error:
            self._orphans += pairs
            self._failed(error)

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_batch(self) -> None:
        assert self.shared is not None
        await asyncio.sleep(0)  # the requests ending in this turn of the loop join
        batch, self._settling = self._settling, []
        try:
            await self._call(self.shared.settle_many(batch))
        except Exception as error:
            # Their leases are ended once the store answers again (a settlement is
            # not sent twice: it counts usage); their token corrections are lost.
            self._orphans += [
                pair for ask, verdict, _ in batch for pair in lease_pairs(ask, verdict.client)
            ]
            self._failed(error)

    def _count(self, grant: Grant) -> None:
        client = grant.verdict.client
        per_key = client in self.identify.proxy_ids and grant.ask.usage
        if grant.verdict.granted:
            if per_key:
                self.metrics.client_requests.labels(client).inc()
            return
        self.metrics.limited.labels(grant.verdict.reason or "other").inc()
        if per_key:
            self.metrics.client_limited.labels(client).inc()

    # --- the store, the breaker

    async def _call(self, work: Awaitable[_T]) -> _T:
        """Run one store call; TimeoutError when the store fell silent (see reply.py)."""
        assert self.shared is not None
        call = asyncio.ensure_future(work)
        try:
            return await reply(self.shared.store, call, self.timeout)
        finally:
            call.cancel()  # given up: its reply is read and dropped when it comes

    def _failed(self, error: BaseException) -> None:
        self.metrics.store_failures.inc()
        if self.mode != "shared":
            return
        self.mode = "fallback"
        self.last_switch = time.monotonic()
        self.metrics.set_mode(self.mode)
        log.warning(
            "limits store unreachable: this replica enforces its share of the limits",
            extra={
                "mode": self.mode,
                "error": type(error).__name__,
                "replicas": self.settings.limits_replicas,
            },
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probing())

    async def _probing(self) -> None:
        assert self.shared is not None
        while True:
            await asyncio.sleep(self.settings.limits_probe_interval)
            try:
                # Connections to a server that went away are dead: start afresh, so that
                # once the probe succeeds no request meets a stale one.
                await self.shared.store.reset()
                await self._call(self.shared.store.execute("PING"))
                # The leases of the requests still running, those admitted in fallback
                # included, then those that ended meanwhile (or may have been taken by a
                # call that failed): until none is left, with no await before the switch.
                await self._call(self.shared.renew(self._lease_pairs()))
                while self._orphans:
                    orphans, self._orphans = self._orphans, []
                    try:
                        await self._call(self.shared.release(orphans))
                    except BaseException:
                        self._orphans = orphans + self._orphans
                        raise
            except Exception:
                self.metrics.store_failures.inc()
                continue
            self.mode = "shared"
            self.last_switch = time.monotonic()
            self.metrics.set_mode(self.mode)
            log.warning("limits store reachable again: limits shared", extra={"mode": self.mode})
            return

    def _lease_pairs(self) -> list[tuple[str, str]]:
        return [(scope, lease) for lease, scopes in self.leases.items() for scope in scopes]

    async def _renewing_loop(self) -> None:
        assert self.shared is not None
        while True:
            await asyncio.sleep(self.settings.limits_renew_interval)
            if self.mode != "shared" or not self.leases:
                continue
            self._renewing = set(self.leases)
            try:
                await self._call(self.shared.renew(self._lease_pairs()))
                # A lease ended while its renewal was on the way: end it again.
                released, self._released_while_renewing = self._released_while_renewing, []
                if released:
                    await self._call(self.shared.release(released))
            except Exception as error:
                self._failed(error)
            finally:
                self._renewing = None
                self._released_while_renewing = []

    # --- life

    async def start(self) -> None:
        if self.shared is not None:
            # Connected before the first request: otherwise a cold replica's first burst
            # would connect in a loop busy parsing it, and the replies of a connection's
            # handshake do not show the store alive (Store.silent). Down now: the first
            # call says so.
            with contextlib.suppress(Exception):
                await self._call(self.shared.store.execute("PING"))
            self._renewer = asyncio.get_running_loop().create_task(self._renewing_loop())

    async def close(self) -> None:
        """Drain: end every lease this replica holds, at once, then close the store's client."""
        for task in (self._renewer, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(1.0, self.timeout * 4))
        if self.shared is not None:
            pairs = self._lease_pairs()
            self.leases.clear()
            if pairs:
                try:
                    await self._call(self.shared.release(pairs))
                    log.info("limits: leases released on drain", extra={"leases": len(pairs)})
                except Exception as error:
                    log.warning(
                        "limits: leases not released on drain, they expire by themselves",
                        extra={"leases": len(pairs), "error": type(error).__name__},
                    )
            await self.shared.store.aclose()

    async def usage_page(
        self,
        dates: Sequence[str],
        *,
        limit: int,
        cursor: UsageCursor | None = None,
        client: str | None = None,
    ) -> UsagePage:
        """One page of usage (see Limiter.usage_page): from the store when there is one."""
        limiter: Limiter = self.shared if self.shared is not None else self.local
        async with asyncio.timeout(USAGE_PAGE_TIMEOUT):
            return await limiter.usage_page(dates, limit=limit, cursor=cursor, client=client)

    async def usage(self, dates: Sequence[str]) -> list[UsageRow]:
        """Every client's use on ``dates``: every page."""
        rows: list[UsageRow] = []
        cursor: UsageCursor | None = None
        while True:
            page = await self.usage_page(dates, limit=1000, cursor=cursor)
            rows += page.rows
            if page.next is None:
                return rows
            cursor = page.next

    def client(self, request: object, credential: Credential | None) -> Client:
        return self.identify(request, credential)  # type: ignore[arg-type]


LIMITS: Final = web.AppKey("limits", Limits)  # absent when no limit is configured
