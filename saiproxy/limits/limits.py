"""The limits of one replica: the store, the circuit breaker in front of it, the leases it holds.

With LIMITS_URL every admission goes to the shared store, each call under
LIMITS_TIMEOUT. A call that fails opens the breaker: the request (and every
one after it) is admitted by this replica's share of the limits (limit /
LIMITS_REPLICAS) in the process, and a probe asks the store every
LIMITS_PROBE_INTERVAL until it answers, when the shared mode comes back. No
request ever fails because the store did.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, TypeVar

from prometheus_client import Counter, Gauge

from ..auth import Credential
from ..metrics import Metrics
from ..settings import Settings
from .base import Ask, Limiter, ScopeKind, Settlement, UsageCursor, UsagePage, UsageRow, scope_name
from .identity import ANONYMOUS, Client, Identify
from .local import LocalLimiter
from .rules import Config, Rules, Verdict

log = logging.getLogger("saiproxy.limits")

if TYPE_CHECKING:
    from .shared import SharedLimiter

# One page of usage may take this long (its work is bounded: see SharedLimiter.usage_page);
# an admin's read, so not LIMITS_TIMEOUT, and its failure does not open the breaker.
USAGE_PAGE_TIMEOUT: Final = 5.0

Mode = Literal["local", "shared", "fallback"]
MODES: Final[tuple[Mode, ...]] = ("local", "shared", "fallback")
_T = TypeVar("_T")


def enabled(settings: Settings) -> bool:
    """Return whether the limits run: a store is named, or any limit is set."""
    config = Config.from_settings(settings)
    return settings.limits_url is not None or config.client.any or config.shared.any


class LimitMetrics:
    """The limits' metrics: per client only for the configured proxy keys (a bounded set)."""

    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.metrics = metrics
        self.mode = Gauge(
            "saiproxy_limits_mode",
            "1 for the mode the limits run in: local (no store), shared, fallback (store down).",
            ["mode"],
            registry=registry,
        )
        self.limited = Counter(
            "saiproxy_limited_requests",
            "Requests refused by a limit, by the limit that refused them.",
            ["reason"],
            registry=registry,
        )
        self.store_failures = Counter(
            "saiproxy_limits_store_failures",
            "Calls to the limits store that failed or timed out.",
            registry=registry,
        )
        self.client_requests = Counter(
            "saiproxy_client_requests",
            "Admitted requests per proxy key (its hashed ID).",
            ["client"],
            registry=registry,
        )
        self.client_tokens = Counter(
            "saiproxy_client_tokens",
            "Tokens per proxy key (its hashed ID), input and output.",
            ["client", "direction"],
            registry=registry,
        )
        self.client_limited = Counter(
            "saiproxy_client_limited_requests",
            "Refused requests per proxy key (its hashed ID).",
            ["client"],
            registry=registry,
        )

    def set_mode(self, mode: Mode) -> None:
        for name in MODES:
            self.mode.labels(name).set(1 if name == mode else 0)


@dataclass(slots=True)
class Grant:
    """An admitted request: what it reserved, where, until it settles."""

    ask: Ask
    verdict: Verdict
    limiter: Limiter
    settled: bool = False


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
        # Leases a failed store call may have left behind (scope, id): ended by the probe.
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
        cancelled at any await), an admission that the store granted ends in
        exactly one settlement: the store's call runs in a task of its own, and
        a grant nobody waits for any more is settled at once, as a request
        that never reached SAI.
        """
        if self.shared is not None and self.mode == "shared":
            admitting = self._admit_shared(client, reserve, kinds)
            task = asyncio.get_running_loop().create_task(admitting)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            try:
                grant = await asyncio.shield(task)
            except asyncio.CancelledError:
                task.add_done_callback(self._abandoned)
                raise
            if grant is not None:
                return grant
        # In the process nothing waits: a cancellation cannot land inside the admission.
        ask = self.ask(client, reserve, self.local_config, kinds)
        grant = Grant(ask, self.local.admit_now(ask), self.local)
        self._count(grant)
        return grant

    async def _admit_shared(
        self, client: Client, reserve: int, kinds: tuple[ScopeKind, ...]
    ) -> Grant | None:
        """Admit in the store; None when the store failed (the breaker is open then)."""
        assert self.shared is not None
        ask = self.ask(client, reserve, self.config, kinds)
        try:
            verdict = await self._call(self.shared.admit(ask))
        except Exception as error:
            # A call that timed out may still have taken its lease: end it later (the store
            # took it as the client's, or as anonymous's for a credential not yet accepted).
            self._orphans += _lease_pairs(ask, ask.client)
            if ask.verify:
                self._orphans += _lease_pairs(ask, ANONYMOUS)
            self._failed(error)
            return None
        grant = Grant(ask, verdict, self.shared)
        if ask.verify and verdict.client == ask.client:
            self.local.accept(ask.client)  # known here too if the store goes down
        if verdict.granted:
            leased = tuple(pair[0] for pair in _lease_pairs(ask, verdict.client))
            if leased:
                self.leases[ask.id] = leased
        self._count(grant)
        return grant

    def _abandoned(self, task: asyncio.Task[Grant | None]) -> None:
        """The request of an admission in progress went away: settle what it was granted."""
        if task.cancelled() or task.exception() is not None:
            return
        grant = task.result()
        if grant is not None:
            self.settle(grant, Settlement(0, 0))

    def settle(self, grant: Grant, ended: Settlement) -> None:
        """The request ended (however): correct its tokens and end its lease, in the background
        so that neither a cancellation nor a slow store delays the end of the answer."""
        if grant.settled or not grant.verdict.granted:
            return
        grant.settled = True
        client = grant.verdict.client
        if client in self.identify.proxy_ids and grant.ask.usage:
            self.metrics.client_tokens.labels(client, "input").inc(ended.input_tokens)
            self.metrics.client_tokens.labels(client, "output").inc(ended.output_tokens)
        leased = self.leases.pop(grant.ask.id, None)
        if leased is not None and self._renewing is not None and grant.ask.id in self._renewing:
            self._released_while_renewing += [(scope, grant.ask.id) for scope in leased]
        if ended.accepted and grant.ask.client.startswith("user-"):
            self.local.accept(grant.ask.client)
        if grant.limiter is self.local:
            self.local.settle_now(grant.ask, grant.verdict, ended)
            return
        # Sent in the background, together with the other requests ending meanwhile: one
        # pipelined round trip for all of them.
        self._settling.append((grant.ask, grant.verdict, ended))
        if len(self._settling) == 1:
            task = asyncio.get_running_loop().create_task(self._settle_batch())
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
                pair for ask, verdict, _ in batch for pair in _lease_pairs(ask, verdict.client)
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
        async with asyncio.timeout(self.timeout):
            return await work

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
                await self._call(self.shared.renew(self._lease_pairs()))
                if self._orphans:
                    await self._call(self.shared.release(self._orphans))
                    self._orphans = []
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
        self.local.release_all()
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


def _lease_pairs(ask: Ask, client: str) -> list[tuple[str, str]]:
    """Return the leases (scope, id) an admission of ``ask`` as ``client`` takes: one per
    concurrency limit."""
    return [(scope_name(kind, client), ask.id) for kind, rules in ask.scopes if rules.concurrency]
