"""Several saiproxy processes sharing one real Valkey, in front of bench.limits_sai: what the
limits' multi-replica tests, benchmark and rehearsal start. Everything listens on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis

from bench.fake_sai import free_port
from bench.processes import proxy_env
from bench.valkey import ValkeyServer

ROOT = Path(__file__).resolve().parent.parent
MODE_HEADER = "X-Saiproxy-Limits"
FALLBACK_LOG = "limits store unreachable"


def wait_http(url: str, within: float = 30) -> None:
    """Wait until ``url`` answers 200."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {within} s")


class Cluster:
    """A Valkey server, the fake SAI and ``replicas`` saiproxy processes."""

    def __init__(self, workdir: Path, replicas: int, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.valkey = ValkeyServer(workdir / "valkey")
        self.sai_port = free_port()
        self.ports = [free_port() for _ in range(replicas)]
        self.env = proxy_env(self.sai_port, workdir, {
            "SAI_KEY": "cluster-key",
            "SAI_TEMPLATE_ID": "cluster",
            "LOG_LEVEL": "warning",
            "LIMITS_URL": self.valkey.url,
            "LIMITS_REPLICAS": str(replicas),
            "SHUTDOWN_DELAY": "0.2",
            **env,
        })  # fmt: skip
        self.sai: subprocess.Popen[bytes] | None = None
        self.replicas: list[subprocess.Popen[bytes] | None] = [None] * replicas

    def logged(self, text: str) -> int:
        """Return how many replicas wrote ``text`` in their output (complete once stopped)."""
        return sum(
            text in path.read_text(errors="replace") for path in self.workdir.glob("replica-*.out")
        )

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def start(self) -> None:
        self.valkey.start()
        with (self.workdir / "sai.out").open("ab") as out:
            self.sai = subprocess.Popen(
                [sys.executable, "-m", "bench.limits_sai", "--port", str(self.sai_port)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        for index in range(len(self.ports)):
            self.start_replica(index, wait=False)
        wait_http(f"http://127.0.0.1:{self.sai_port}/stats")
        for index in range(len(self.ports)):
            wait_http(self.url(index) + "/health/readiness")

    def start_replica(self, index: int, *, wait: bool = True) -> None:
        with (self.workdir / f"replica-{index}.out").open("ab") as out:
            self.replicas[index] = subprocess.Popen(
                [sys.executable, "-m", "saiproxy"],
                env={**self.env, "PORT": str(self.ports[index])},
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if wait:
            wait_http(self.url(index) + "/health/readiness")

    def signal(self, index: int, sig: signal.Signals) -> subprocess.Popen[bytes]:
        process = self.replicas[index]
        assert process is not None
        process.send_signal(sig)
        return process

    def stop(self) -> None:
        for process in [*self.replicas, self.sai]:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in [*self.replicas, self.sai]:
            if process is not None:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.valkey.stop()

    def store(self) -> redis.Redis:
        return redis.Redis.from_url(self.valkey.url, socket_timeout=5)

    def leases(self, scope: str, *, live: bool = True) -> int:
        """Return the leases the store holds for ``scope``: unexpired ones, or all."""
        with self.store() as store:
            key = f"saiproxy:c:{scope}"
            if not live:
                return int(store.zcard(key))
            seconds, micros = store.time()
            return int(store.zcount(key, f"({seconds * 1000 + micros // 1000}", "+inf"))

    def all_leases(self) -> int:
        """Return every lease the store holds, for any scope, expired ones included."""
        with self.store() as store:
            return sum(int(store.zcard(key)) for key in store.scan_iter("saiproxy:c:*"))

    async def cancel_streams(self, count: int, workers: int, key_of: Callable[[int], str]) -> int:
        """Open ``count`` streams round-robin over the replicas, each with the user key
        ``key_of(index)`` (accepted by SAI before: its own client); read the first piece of
        each, then hang up. Return how many opened."""
        self.valkey.accept_user_keys({key_of(index) for index in range(count)})
        targets = itertools.cycle(range(len(self.ports)))
        counter = itertools.count()
        opened = 0
        body = {"stream": True, "messages": [{"role": "user", "content": "stream:5 leak"}]}

        async def worker(session: aiohttp.ClientSession) -> None:
            nonlocal opened
            while (index := next(counter)) < count:
                url = self.url(next(targets)) + "/v1/chat/completions"
                headers = {"user-api-key": key_of(index)}
                async with session.post(url, json=body, headers=headers) as response:
                    if response.status != 200:
                        raise RuntimeError(f"stream refused: {response.status}")
                    await response.content.readany()  # part of the answer, then hang up
                    opened += 1
                    response.close()

        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(worker(session) for _ in range(workers)))
        return opened

    async def leases_left(self, within: float = 5.0) -> int:
        """Return the leases left once the settlements still on their way have landed."""
        deadline = time.monotonic() + within
        while (left := self.all_leases()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return left

    def stats(self) -> dict[str, dict[str, int]]:
        url = f"http://127.0.0.1:{self.sai_port}/stats"
        with urllib.request.urlopen(url, timeout=5) as answer:
            data: dict[str, dict[str, int]] = json.load(answer)
            return data

    def tail(self, lines: int = 15) -> str:
        out = []
        for path in sorted(self.workdir.glob("*.out")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)


def agent_conversation(turns: int, turn_chars: int, last: str) -> list[dict[str, str]]:
    """Return an agent-sized conversation: ``turns`` turns of about ``turn_chars`` characters
    each, alternating user and assistant, ending with the user's ``last``."""
    filler = ("read the file, run the tests, fix what fails and say what changed " * 40)[
        :turn_chars
    ]
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: {filler}"}
        for i in range(turns - 1)
    ]
    return [*messages, {"role": "user", "content": last}]


@dataclass(frozen=True, slots=True)
class Burst:
    """What a cold burst of streams did (see :func:`cold_burst`)."""

    streams: int
    limit: int
    admitted: int
    refused: int
    failed: int
    peak: int  # the most streams open at once at the fake SAI
    fallback_answers: int  # answers whose X-Saiproxy-Limits said fallback
    fallback_replicas: int  # replicas that gave them
    seconds: float  # from the first stream sent to the last answer's status
    fallback_logged: int = -1  # replicas that logged the store unreachable (once stopped)

    @property
    def over(self) -> int:
        """Streams admitted beyond the limit: every admitted stream is held open until the
        last one has its answer, so all of them ran at once."""
        return max(0, self.admitted - self.limit)

    def line(self) -> str:
        return (
            f"{self.streams} streams: {self.admitted} admitted, {self.over} over the limit of "
            f"{self.limit}, {self.refused} refused, {self.failed} failed; peak {self.peak} at "
            f"SAI; fallback: {self.fallback_answers} answers from {self.fallback_replicas} "
            f"replicas, logged by {self.fallback_logged}; {self.seconds:.1f} s"
        )


async def cold_burst(
    cluster: Cluster,
    streams: int,
    user_key: str,
    limit: int,
    *,
    turns: int = 80,
    turn_chars: int = 1000,
) -> Burst:
    """Open ``streams`` streams at once, round-robin over the cluster's replicas, all with
    ``user_key`` (a client with a concurrency limit of ``limit``), each carrying an agent-sized
    conversation (``turns`` turns, about ``turns * turn_chars`` bytes: parsing it keeps each
    replica's loop busy). Every admitted stream stays open until every stream has its answer,
    then all are closed.

    One request with the key goes first and ends before the burst: the key is then a client
    SAI has accepted, as it would be in an agent's session.
    """
    headers = {"user-api-key": user_key, "Content-Type": "application/json"}
    first = {"messages": [{"role": "user", "content": "hello warm"}]}
    body = json.dumps(
        {"stream": True, "messages": agent_conversation(turns, turn_chars, "stream:60 burst")}
    ).encode()
    answered = asyncio.Event()
    statuses: list[tuple[int, str, int]] = []  # status, mode, replica

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        replica = index % len(cluster.ports)
        url = cluster.url(replica) + "/v1/chat/completions"
        try:
            async with session.post(url, data=body, headers=headers) as response:
                mode = response.headers.get(MODE_HEADER, "")
                statuses.append((response.status, mode, replica))
                if len(statuses) == streams:
                    answered.set()
                if response.status == 200:
                    await response.content.readany()
                    await answered.wait()  # held open: every admitted stream runs at once
                else:
                    await response.read()
        except aiohttp.ClientError as error:
            statuses.append((0, type(error).__name__, replica))
            if len(statuses) == streams:
                answered.set()

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async with session.post(
            cluster.url(0) + "/v1/chat/completions", json=first, headers=headers
        ) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"the first request was answered {response.status}")
        await asyncio.to_thread(_reset_stats, cluster)
        started = time.monotonic()
        tasks = [asyncio.create_task(one(session, index)) for index in range(streams)]
        await answered.wait()
        seconds = time.monotonic() - started
        stats = await asyncio.to_thread(cluster.stats)
        await asyncio.gather(*tasks)
    codes = [status for status, _, _ in statuses]
    fallback = [replica for _, mode, replica in statuses if mode == "fallback"]
    return Burst(
        streams=streams,
        limit=limit,
        admitted=codes.count(200),
        refused=codes.count(429),
        failed=len(codes) - codes.count(200) - codes.count(429),
        peak=stats["peak"].get("burst", 0),
        fallback_answers=len(fallback),
        fallback_replicas=len(set(fallback)),
        seconds=seconds,
    )


def _reset_stats(cluster: Cluster) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{cluster.sai_port}/stats/reset", data=b"", method="POST"
    )
    with urllib.request.urlopen(request, timeout=5):
        pass
