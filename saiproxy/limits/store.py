"""The shared limits store's client: one connection, auto-pipelined.

Every call of a turn of the event loop (the admissions and settlements of
every request that reached that point meanwhile) goes out in one write on one
connection, and one reader takes the replies in order and hands each to its
caller. A connection pool would take a connection, send, wait, and give it
back for each call, which costs more CPU per request than the store's own
work. redis-py does the protocol: its ``Connection`` connects (AUTH, SELECT,
TLS as the URL says), packs the commands and parses the replies (with hiredis
when installed).

What a caller sees:

- an error reply (``NOSCRIPT``, a script error) is raised to its own caller
  only; the others on the connection get their replies;
- a caller that gives up (its timeout, a cancellation) leaves its reply to be
  read and dropped when it comes, so every later reply still reaches its own
  caller; a call given up before it was written is not sent;
- a lost connection (the server killed, restarted, the network) fails every
  call waiting on it at once, with ``ConnectionError``; the next call opens a
  new connection. ``reset()`` does the same on purpose (the breaker's probe:
  a stalled server's connection is given up).

There is no timeout here: each caller bounds its call (``LIMITS_TIMEOUT``,
see reply.py), and connecting is bounded by the same value. What a caller
needs to tell a server that stopped answering from an event loop too busy to
read its answers in time is :meth:`Store.silent`: whether the server, owing a
reply, has sent none over a span of time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any, TypeAlias

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as StoreConnectionError
from redis.exceptions import ResponseError

__all__ = ["Command", "Store"]

Command: TypeAlias = Sequence[Any]  # the command's name, then its arguments


class Store:
    """A client of one Valkey or Redis server (see the module's docstring)."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        """``url``: redis://, rediss://, unix:// (valkey:// and valkeys:// are the first two)."""
        scheme, sep, rest = url.partition("://")
        scheme = {"valkey": "redis", "valkeys": "rediss"}.get(scheme.lower(), scheme)
        # The pool only reads the URL (host, port, database, password, TLS): its connection
        # class and arguments make each connection; it never holds one.
        pool = ConnectionPool.from_url(
            f"{scheme}{sep}{rest}",
            protocol=2,  # RESP2 whatever redis-py's default: a hash is a flat list, as parsed
            socket_timeout=None,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._connection_class = pool.connection_class
        self._connection_kwargs = pool.connection_kwargs
        self._link: _Link | None = None

    def execute(self, *command: Any) -> asyncio.Future[Any]:
        """Send one command; the future is its reply (an error reply is raised)."""
        return self._send([command], 0)

    def execute_many(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        """Send ``commands`` together; the future is their replies, in order, an error reply
        as its exception (``ResponseError``) in the list, not raised."""
        if not commands:
            future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            future.set_result([])
            return future
        return self._send(list(commands), len(commands))

    def _send(self, commands: list[Command], size: int) -> asyncio.Future[Any]:
        link = self._link
        if link is None or link.broken:
            link = self._link = _Link(self._connection_class(**self._connection_kwargs))
        future: asyncio.Future[Any] = link.loop.create_future()
        link.outbox.append((commands, future, size))
        if link.wake is not None and not link.wake.done():
            link.wake.set_result(None)
        return future

    def silent(self, since: float, owed: float) -> bool:
        """Return whether the server has sent no reply since ``since`` (loop time) though it
        owes one since ``owed`` or earlier (the write, or the connection, that began the debt,
        or the last reply). A busy event loop reads replies late, but once it has turned it
        has read all that came: called then, a silence is the server's, not the loop's."""
        link = self._link
        if link is None or link.broken is not None or link.owed_since is None:
            return False
        return link.answered <= since and link.owed_since <= owed

    async def reset(self) -> None:
        """Give up the connection: every call waiting fails; the next call connects again."""
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    async def aclose(self) -> None:
        await self.reset()


# An entry of the outbox: the commands, the caller's future, how many replies it waits for
# (0: one command whose reply is the future's result or exception).
_Entry: TypeAlias = tuple[list[Command], "asyncio.Future[Any]", int]


class _Link:
    """One connection's life: a writer task (connect, then write what the calls queue) and a
    reader task (replies, in order, to the futures waiting for them). Once broken, never
    used again."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.loop = asyncio.get_running_loop()
        self.outbox: list[_Entry] = []
        self.pending: deque[tuple[asyncio.Future[Any], int]] = deque()
        self.wake: asyncio.Future[None] | None = None
        self.broken: BaseException | None = None
        # Loop times, for Store.silent (one clock reading per reply read): the last reply
        # read, and since when the server owes one (None: it owes none).
        self.answered = float("-inf")
        self.owed_since: float | None = None
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] = self.loop.create_task(self._writing())

    async def _writing(self) -> None:
        connection = self.connection
        try:
            self.owed_since = self.loop.time()  # the handshake's replies
            await connection.connect()  # type: ignore[no-untyped-call]
            self.owed_since = None
            self.reader = self.loop.create_task(self._reading())
            while True:
                if not self.outbox:
                    self.wake = self.loop.create_future()
                    await self.wake
                    continue
                batch, self.outbox = self.outbox, []
                commands: list[Command] = []
                for entry_commands, future, size in batch:
                    if future.done():  # given up before it was sent: not sent
                        continue
                    commands += entry_commands
                    self.pending.append((future, size))
                if commands:
                    if self.owed_since is None:
                        self.owed_since = self.loop.time()
                    await connection.send_packed_command(
                        connection.pack_commands(commands), check_health=False
                    )
        except Exception as error:  # any failure ends this connection
            await self._break(error)

    async def _reading(self) -> None:
        connection, pending, clock = self.connection, self.pending, self.loop.time
        replies: list[Any] = []
        try:
            while True:
                try:
                    reply = await connection.read_response()
                except ResponseError as error:  # an error reply: its caller's only
                    reply = error
                # The server answers: it owes the rest from now.
                self.answered = self.owed_since = clock()
                if not pending:
                    raise StoreConnectionError("the limits store sent a reply nobody waits for")
                future, size = pending[0]
                if size:
                    replies.append(reply)
                    if len(replies) < size:
                        continue
                    reply, replies = replies, []
                pending.popleft()
                if not pending:
                    self.owed_since = None
                if future.done():  # its caller gave up (timeout, cancellation)
                    continue
                if not size and isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except Exception as error:  # any failure ends this connection
            await self._break(error)

    def _fail(self, error: BaseException) -> None:
        """Mark the link broken and fail every call queued or waiting on it."""
        if self.broken is not None:
            return
        self.broken = error
        waiting = [future for _, future, _ in self.outbox] + [f for f, _ in self.pending]
        self.outbox.clear()
        self.pending.clear()
        for future in waiting:
            if not future.done():
                lost = StoreConnectionError(
                    f"the limits store's connection was lost ({type(error).__name__})"
                )
                lost.__cause__ = error
                future.set_exception(lost)
        if self.wake is not None and not self.wake.done():
            self.wake.cancel()

    async def _break(self, error: BaseException) -> None:
        """The connection failed (called from the reader or the writer): end it."""
        self._fail(error)
        current = asyncio.current_task()
        for task in (self.reader, self.writer):
            if task is not None and task is not current:
                task.cancel()
        with contextlib.suppress(Exception):
            await self.connection.disconnect(nowait=True)

    async def close(self) -> None:
        self._fail(StoreConnectionError("the limits store's connection was closed"))
        tasks = [task for task in (self.writer, self.reader) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.connection.disconnect(nowait=True)
