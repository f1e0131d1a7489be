"""The saiproxy command as a newcomer runs it: --demo, real processes, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import CONFIG, ROOT
from .paced import Paced, PacedSai, paced_sai


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(method: str, url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, response.headers, raw
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


class Proxy:
    """A saiproxy process on a free port."""

    def __init__(self, tmp_path: Path, *args: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = tmp_path / f"proxy-{self.port}.out"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SAI_", "PROXY_"))}
        with self.output.open("wb") as out:
            self.process = self._start(out, args, clean, tmp_path, env)

    def _start(
        self,
        out: Any,
        args: tuple[str, ...],
        clean: dict[str, str],
        tmp_path: Path,
        env: dict[str, str],
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "saiproxy", *args],
            env={
                **clean,
                "SAIPROXY_CONFIG": CONFIG,
                "HOST": "127.0.0.1",
                "PORT": str(self.port),
                "LOG_DIR": str(tmp_path / "logs"),
                "SHUTDOWN_DELAY": "0.5",
                **env,
            },
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output.read_text()
            try:
                if http("GET", f"{self.url}/health", timeout=1)[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("saiproxy did not become healthy")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


@pytest.fixture
async def paced() -> AsyncIterator[PacedSai]:
    async with paced_sai() as sai:
        yield sai


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[list[Proxy]]:
    started: list[Proxy] = []
    yield started
    for proxy in started:
        proxy.stop()


def test_demo_serves_a_completion_with_no_credentials(tmp_path: Path, proxies: list[Proxy]) -> None:
    proxy = Proxy(tmp_path, "--demo")
    proxies.append(proxy)
    proxy.wait_ready()
    status, headers, raw = http(
        "POST",
        f"{proxy.url}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hello demo"}]},
    )
    assert status == 200
    data = json.loads(raw)
    assert "hello demo" in data["choices"][0]["message"]["content"]
    assert headers["X-Request-ID"]

    status, headers, raw = http(
        "POST",
        f"{proxy.url}/chat/completions",
        {"messages": [{"role": "user", "content": "stream it"}], "stream": True},
    )
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    assert raw.endswith(b"data: [DONE]\n\n")
    assert proxy.stop() == 0


def test_sigterm_turns_readiness_503_then_exits_0(tmp_path: Path, proxies: list[Proxy]) -> None:
    proxy = Proxy(tmp_path, "--demo", SHUTDOWN_DELAY="1.5")
    proxies.append(proxy)
    proxy.wait_ready()
    assert http("GET", f"{proxy.url}/health/readiness")[0] == 200
    proxy.process.send_signal(signal.SIGTERM)
    # Still serving during SHUTDOWN_DELAY, but no longer ready.
    assert _readiness_turns_503(proxy)
    assert http("GET", f"{proxy.url}/health")[0] == 200
    assert proxy.process.wait(timeout=20) == 0
    with pytest.raises(OSError):
        http("GET", f"{proxy.url}/health", timeout=1)


def test_two_processes_sharing_log_dir_write_separate_files(
    tmp_path: Path, proxies: list[Proxy]
) -> None:
    first, second = Proxy(tmp_path, "--demo"), Proxy(tmp_path, "--demo")
    proxies.extend([first, second])
    first.wait_ready()
    second.wait_ready()
    for proxy in (first, second):
        assert http("POST", f"{proxy.url}/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "x"}]})[0] == 200  # fmt: skip
    assert first.stop() == 0
    assert second.stop() == 0
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    host = socket.gethostname()
    assert files == sorted(f"saiproxy-{host}-{proxy.process.pid}.log" for proxy in (first, second))
    for proxy in (first, second):
        lines = (tmp_path / "logs" / f"saiproxy-{host}-{proxy.process.pid}.log").read_text()
        assert "saiproxy listening" in lines
        assert "response finished" in lines


def _readiness_turns_503(proxy: Proxy) -> bool:
    """Ask for readiness until it is 503 (True) or the proxy stops listening (False)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if http("GET", f"{proxy.url}/health/readiness", timeout=5)[0] == 503:
                return True
        except OSError:
            return False
        time.sleep(0.02)
    return False


async def _listener_closes(url: str) -> bool:
    """Open fresh connections until they are refused (True), for at most 20 s."""
    deadline = time.monotonic() + 20
    fresh = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=fresh) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/health"):
                    pass
            except aiohttp.ClientConnectionError:
                return True
            await asyncio.sleep(0.05)
    return False


async def _wait_exit(process: subprocess.Popen[bytes], within: float) -> int | None:
    deadline = time.monotonic() + within
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return process.poll()


async def test_sigterm_lets_an_open_stream_finish(
    paced: PacedSai, tmp_path: Path, proxies: list[Proxy]
) -> None:
    # SAI holds the rest of its answer until the test has seen the listener close.
    closed = paced.gate("listener closed")
    paced.default = Paced((*[f"w{i} " for i in range(5)], closed,
                           *[f"w{i} " for i in range(5, 20)]))  # fmt: skip
    proxy = Proxy(
        tmp_path,
        SAI_URL=paced.url,
        SAI_KEY="k-drain",
        SAI_TEMPLATE_ID="t",
        SHUTDOWN_DELAY="1",
        SHUTDOWN_TIMEOUT="20",
    )
    proxies.append(proxy)
    await asyncio.to_thread(proxy.wait_ready)
    url = f"{proxy.url}/v1/chat/completions"
    body = {"stream": True, "messages": [{"role": "user", "content": "long answer"}]}
    async with aiohttp.ClientSession() as session:
        response = await session.post(url, json=body)
        await response.content.readline()  # the stream is open
        proxy.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(_readiness_turns_503, proxy)
        assert await _listener_closes(proxy.url)  # past SHUTDOWN_DELAY
        closed.open()
        raw = await response.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"w19 " in raw
    assert b'"finish_reason":"stop"' in raw
    assert ("gave up", "listener closed") not in paced.events
    assert paced.count("ended") == 1
    assert await _wait_exit(proxy.process, 20) == 0


# A chat stream, and a legacy completion of two prompts (two SAI calls, one stream).
_CUT_REQUESTS = {
    "chat": ("/v1/chat/completions",
             {"stream": True, "messages": [{"role": "user", "content": "long answer"}]}),
    "completions": ("/v1/completions", {"stream": True, "prompt": ["long", "answer"]}),
}  # fmt: skip


@pytest.mark.parametrize("mode", ["message", "http"])
@pytest.mark.parametrize("kind", list(_CUT_REQUESTS))
async def test_shutdown_cuts_a_stream_that_outlives_its_budget(
    paced: PacedSai, tmp_path: Path, proxies: list[Proxy], mode: str, kind: str
) -> None:
    # SAI never finishes on its own (only after paced.LIMIT, 20 s, under the default
    # SHUTDOWN_TIMEOUT of 30 s): the budget of 0.5 + 2 s must cut it.
    never = paced.gate("never")
    paced.default = Paced((*[f"w{i} " for i in range(5)], never, "w99 "))
    proxy = Proxy(
        tmp_path, SAI_URL=paced.url, SAI_KEY="k-cut", SAI_TEMPLATE_ID="t", ERROR_MODE=mode,
        SHUTDOWN_DELAY="0.5", SHUTDOWN_TIMEOUT="2",
    )  # fmt: skip
    proxies.append(proxy)
    await asyncio.to_thread(proxy.wait_ready)
    path, body = _CUT_REQUESTS[kind]
    url = f"{proxy.url}{path}"
    async with aiohttp.ClientSession() as session:
        response = await session.post(url, json=body)
        await response.content.readline()  # the stream is open
        proxy.process.send_signal(signal.SIGTERM)
        raw = await response.read()
        status = await _wait_exit(proxy.process, 20)
    assert status == 0
    # The proxy hung up on SAI mid-answer: the budget ran out, not SAI's answer.
    await paced.settled()
    assert paced.count("cut") == len(paced.received) == (2 if kind == "completions" else 1)
    assert ("gave up", "never") not in paced.events
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"w99" not in raw and b'"finish_reason":"stop"' not in raw
    assert raw.count(b"data: [DONE]") == 1
    if mode == "message":
        # Every choice ends with the explanation, marked truncated.
        choices = 2 if kind == "completions" else 1
        assert raw.count(b"restarting") == choices
        assert raw.count(b'"finish_reason":"length"') == choices
    else:
        assert raw.count(b'"code":"server_shutting_down"') == 1
    assert "answer cut by shutdown" in proxy.output.read_text()


async def test_two_workers_share_the_port(tmp_path: Path, proxies: list[Proxy]) -> None:
    proxy = Proxy(tmp_path, "--demo", WORKERS="2")
    proxies.append(proxy)
    await asyncio.to_thread(proxy.wait_ready)
    pids: set[int] = set()
    deadline = time.monotonic() + 15
    # Each request opens a new connection; the kernel spreads them across workers.
    while len(pids) < 2 and time.monotonic() < deadline:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.get(f"{proxy.url}/health") as response,
        ):
            pids.add((await response.json())["pid"])
    assert len(pids) == 2
    assert proxy.process.pid not in pids
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
        ) as response,
    ):
        assert response.status == 200
    proxy.process.send_signal(signal.SIGTERM)
    assert await _wait_exit(proxy.process, 20) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    host = socket.gethostname()
    files = {p.name for p in (tmp_path / "logs").iterdir()}
    assert files == {f"saiproxy-{host}-{pid}.log" for pid in pids}


def test_a_taken_port_is_one_clear_line(tmp_path: Path, proxies: list[Proxy]) -> None:
    first = Proxy(tmp_path, "--demo")
    proxies.append(first)
    first.wait_ready()
    second = Proxy(tmp_path, "--demo", PORT=str(first.port))
    proxies.append(second)
    assert second.process.wait(timeout=20) == 1
    lines = second.output.read_text().strip().splitlines()
    assert lines[-1].startswith(f"saiproxy: cannot listen on 127.0.0.1:{first.port}: ")
    assert "already in use" in lines[-1].lower()
    assert "Traceback" not in second.output.read_text()
