"""The limits store's client (saiproxy/limits/store.py) against a real Valkey server: one
connection shared by every call, replies to their own callers in order, and its faults."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as StoreConnectionError
from redis.exceptions import NoScriptError, ResponseError

from bench.valkey import ValkeyServer, free_port
from saiproxy.limits.store import Store


async def client_id(store: Store) -> int:
    reply: int = await store.execute("CLIENT", "ID")
    return reply


async def test_calls_of_one_turn_share_one_connection_and_get_their_own_replies(
    valkey: ValkeyServer,
) -> None:
    store = Store(valkey.url, 1.0)
    try:
        replies = await asyncio.gather(
            *(store.execute("INCR", f"n{i % 3}") for i in range(30)), client_id(store)
        )
        # n0, n1, n2 each counted 1..10, in the order the calls were made.
        assert replies[:30] == [i // 3 + 1 for i in range(30)]
        assert await client_id(store) == replies[30]  # the same connection throughout
    finally:
        await store.aclose()


async def test_a_call_that_timed_out_leaves_every_later_reply_to_its_own_caller(
    valkey: ValkeyServer,
) -> None:
    store = Store(valkey.url, 1.0)
    try:
        first = await client_id(store)

        async def blocked() -> object:
            async with asyncio.timeout(0.2):
                return await store.execute("BLPOP", "queue", "5")

        waiting = asyncio.ensure_future(blocked())
        await asyncio.sleep(0.05)  # written: the server holds the connection's later commands
        later = [asyncio.ensure_future(store.execute("INCR", "n")) for _ in range(20)]
        with pytest.raises(TimeoutError):
            await waiting
        assert not any(call.done() for call in later)
        valkey.command("RPUSH", "queue", "x")  # BLPOP answers, to nobody; then the INCRs
        assert await asyncio.gather(*later) == list(range(1, 21))
        assert await store.execute("LLEN", "queue") == 0  # the BLPOP had been sent and ran
        assert await client_id(store) == first  # a timeout does not cost the connection
    finally:
        await store.aclose()


async def test_a_call_given_up_before_it_was_written_is_not_sent(valkey: ValkeyServer) -> None:
    store = Store(valkey.url, 1.0)
    try:
        await store.execute("PING")
        given_up = store.execute("INCR", "n")
        kept = store.execute("INCR", "m")
        given_up.cancel()  # in the same turn of the loop: nothing is written yet
        assert await kept == 1
        assert await store.execute("MGET", "n", "m") == [None, b"1"]
    finally:
        await store.aclose()


async def test_error_replies_go_to_their_own_caller_only(valkey: ValkeyServer) -> None:
    store = Store(valkey.url, 1.0)
    try:
        await store.execute("SET", "text", "abc")
        first = await client_id(store)
        calls = [
            store.execute("INCR", "n"),
            store.execute("INCR", "text"),
            store.execute("EVAL", "return redis.error_reply('ERR boom')", 0),
            store.execute("INCR", "n"),
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[0] == 1 and results[3] == 2
        assert isinstance(results[1], ResponseError) and "not an integer" in str(results[1])
        assert isinstance(results[2], ResponseError) and "boom" in str(results[2])
        # In one batch: the error is the reply in its place, not raised.
        batch = await store.execute_many([("INCR", "n"), ("INCR", "text"), ("INCR", "n")])
        assert batch[0] == 3 and batch[2] == 4 and isinstance(batch[1], ResponseError)
        assert await client_id(store) == first
    finally:
        await store.aclose()


async def test_noscript_after_a_script_flush(valkey: ValkeyServer) -> None:
    store = Store(valkey.url, 1.0)
    try:
        sha = await store.execute("SCRIPT", "LOAD", "return 7")
        assert await store.execute("EVALSHA", sha, 0) == 7
        valkey.command("SCRIPT", "FLUSH")
        one, after = await asyncio.gather(
            store.execute("EVALSHA", sha, 0), store.execute("PING"), return_exceptions=True
        )
        assert isinstance(one, NoScriptError) and after == b"PONG"
        batch = await store.execute_many([("EVALSHA", sha, 0), ("EVAL", "return 7", 0)])
        assert isinstance(batch[0], NoScriptError) and batch[1] == 7
        assert await store.execute("EVALSHA", sha, 0) == 7  # EVAL loaded it again
    finally:
        await store.aclose()


async def test_a_killed_server_fails_every_pending_call_at_once_then_reconnects(
    tmp_path: Path,
) -> None:
    server = ValkeyServer(tmp_path / "valkey")
    server.start()
    store = Store(server.url, 1.0)
    try:
        await store.execute("PING")
        blocked = asyncio.ensure_future(store.execute("BLPOP", "queue", "30"))
        await asyncio.sleep(0.05)
        pending = [asyncio.ensure_future(store.execute("INCR", "n")) for _ in range(10)]
        await asyncio.sleep(0.05)  # written, waiting behind the BLPOP
        server.stop()  # SIGKILL
        async with asyncio.timeout(5):  # a stall probe: the calls fail as the socket closes
            results = await asyncio.gather(blocked, *pending, return_exceptions=True)
        assert all(isinstance(result, StoreConnectionError) for result in results), results
        # While the server is down: each call fails at once, no hanging.
        async with asyncio.timeout(5):
            with pytest.raises(StoreConnectionError):
                await store.execute("PING")
        server.start()  # the same port, an empty server
        assert await store.execute("PING") == b"PONG"
        assert await store.execute("INCR", "n") == 1
    finally:
        await store.aclose()
        server.stop()


async def test_reset_gives_up_a_stalled_server_and_the_next_call_connects_again(
    tmp_path: Path,
) -> None:
    server = ValkeyServer(tmp_path / "valkey")
    server.start()
    assert server.process is not None
    store = Store(server.url, 1.0)
    try:
        first = await client_id(store)
        server.process.send_signal(signal.SIGSTOP)
        stalled = asyncio.ensure_future(store.execute("PING"))
        await asyncio.sleep(0.1)
        assert not stalled.done()
        await store.reset()
        async with asyncio.timeout(5):  # a stall probe
            with pytest.raises(StoreConnectionError):
                await stalled
        server.process.send_signal(signal.SIGCONT)
        assert await client_id(store) != first  # a new connection
    finally:
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)
        await store.aclose()
        server.stop()


async def test_the_password_of_the_url_is_in_no_error_text() -> None:
    secret = "s3cret-limits-password"
    store = Store(f"redis://:{secret}@127.0.0.1:{free_port()}/0", 1.0)
    try:
        with pytest.raises(StoreConnectionError) as raised:
            await store.execute("PING")
        chain: list[BaseException] = []
        error: BaseException | None = raised.value
        while error is not None and len(chain) < 10:
            chain.append(error)
            error = error.__cause__ or error.__context__
        assert all(secret not in f"{e!s} {e!r}" for e in chain), chain
    finally:
        await store.aclose()
