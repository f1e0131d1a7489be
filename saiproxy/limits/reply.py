"""Waiting for the limits store's reply: a store that answers late to a busy loop is not down."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final, TypeVar

if TYPE_CHECKING:  # the Redis client is imported only with a store (Limits.__init__)
    from .store import Store

__all__ = ["PATIENCE", "TURNS", "reply"]

_T = TypeVar("_T")
# A store call unanswered at LIMITS_TIMEOUT is an outage only if the store has been silent that
# long (reply); one that keeps answering, slowly or to a loop too busy to read in time, is
# waited for, at most PATIENCE times LIMITS_TIMEOUT in all (5 s by default: in a cold burst
# of 500 agent-sized requests on 8 replicas sharing 2 cores, admissions took up to 1.2 s).
PATIENCE: Final = 20
# Turns of the loop a call lets pass at its deadline before it judges: the selector reads
# what came, the store's reader parses it, the call's task takes its reply.
TURNS: Final = 3


async def reply(store: Store, call: asyncio.Future[_T], window: float) -> _T:
    """Return the store call's result; raise TimeoutError if the store is down.

    A deadline measured in this loop measures the loop as much as the store: a replica
    parsing a burst of large requests reads the store's replies late (and an
    ``asyncio.timeout`` due in the same turn as the reply wins over it). So the call
    waits in windows of LIMITS_TIMEOUT (``window``); at the end of each the loop first
    turns (TURNS) to read what came, then the store is judged down only if no reply was
    read in the whole window while it owed one since LIMITS_TIMEOUT before the turns began
    (``Store.silent``), which a busy loop cannot fake: what the store sent by then has
    been read. (A debt that began later is not judged yet: in a busy loop a turn can
    last longer than LIMITS_TIMEOUT.) While the store answers, the call waits on, up to
    PATIENCE x LIMITS_TIMEOUT in all.
    """
    loop = asyncio.get_running_loop()
    since = loop.time()
    give_up = since + window * PATIENCE
    while True:
        await asyncio.wait((call,), timeout=min(window, give_up - since))
        turned = loop.time()
        for _ in range(TURNS):
            if call.done():
                break
            await asyncio.sleep(0)
        if call.done():
            return call.result()
        now = loop.time()
        if store.silent(since, turned - window):
            raise TimeoutError(f"the limits store answered nothing for {window} s")
        if now >= give_up:
            raise TimeoutError(f"a limits store call took over {window * PATIENCE} s")
        since = now
