"""Several saiproxy processes sharing one real Valkey, in front of bench.limits_sai: what the
limits' multi-replica tests, benchmark and rehearsal start. Everything listens on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import redis

from bench.fake_sai import free_port
from bench.valkey import ValkeyServer

ROOT = Path(__file__).resolve().parent.parent


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
        self.env = {
            **os.environ,
            "SAI_URL": f"http://127.0.0.1:{self.sai_port}",
            "SAI_KEY": "cluster-key",
            "SAI_TEMPLATE_ID": "cluster",
            "HOST": "127.0.0.1",
            "LOG_DIR": str(workdir / "logs"),
            "LOG_LEVEL": "warning",
            "SAIPROXY_CONFIG": str(ROOT / "config" / "saiproxy.toml"),
            "LIMITS_URL": self.valkey.url,
            "LIMITS_REPLICAS": str(replicas),
            "SHUTDOWN_DELAY": "0.2",
            **env,
        }
        self.sai: subprocess.Popen[bytes] | None = None
        self.replicas: list[subprocess.Popen[bytes] | None] = [None] * replicas

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
