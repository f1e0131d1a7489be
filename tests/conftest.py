"""A real fake SAI (saiproxy.upstream.fake_sai, on a loopback port) and a proxy pointed at it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bench.valkey import ValkeyServer
from saiproxy.base.settings import Settings, load_settings
from saiproxy.upstream.demo import DEMO_COOKIE, DEMO_KEY, DEMO_TEMPLATE, demo_sai

# Re-exported: the tests import them from here.
from saiproxy.upstream.fake_sai import FakeSai as FakeSai
from saiproxy.upstream.fake_sai import Received as Received
from saiproxy.upstream.fake_sai import Reply as Reply
from saiproxy.web.app import create_app, log_setup_for
from saiproxy.web.server import runner_options

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "config" / "saiproxy.toml")
SYSTEM_KEY = "sys-key-7f3a9c1e5b"
SYSTEM_COOKIE = "session=sys-cookie-4d8e2a6f0c; Cookies=1"
TEMPLATE = "tpl-42"


@contextlib.asynccontextmanager
async def on_loopback(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port for the block; yield its base URL."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(access_log=None)
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def sai() -> AsyncIterator[FakeSai]:
    fake = FakeSai()
    async with on_loopback(fake.app) as fake.url:
        yield fake


def base_env(sai: FakeSai, tmp_path: Path) -> dict[str, str]:
    """Return the environment of a proxy pointed at the fake SAI."""
    return {
        "SAI_URL": sai.url,
        "SAI_KEY": SYSTEM_KEY,
        "SAI_TEMPLATE_ID": TEMPLATE,
        "SAIPROXY_CONFIG": CONFIG,
        "LOG_DIR": str(tmp_path / "logs"),
        "RETRY_BACKOFF": "0.01",
    }


MakeProxy = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_proxy(
    aiohttp_client: Any, sai: FakeSai, tmp_path: Path
) -> Callable[..., Awaitable[TestClient[web.Request, web.Application]]]:
    """Start a proxy; keyword arguments override (or, with None, remove) variables."""

    async def factory(**overrides: str | None) -> TestClient[web.Request, web.Application]:
        env = base_env(sai, tmp_path)
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        settings = load_settings(env)
        app = create_app(settings, log_setup=log_setup_for(settings))
        options = runner_options(settings)
        # TestServer always turns handler cancellation on, exactly as production does.
        assert options.pop("handler_cancellation") is True
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(**options)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(server)
        return client

    return factory


@pytest.fixture
async def demo_url() -> AsyncIterator[str]:
    """Serve the demo upstream (``saiproxy --demo``'s) on a loopback port."""
    async with on_loopback(demo_sai().app) as url:
        yield url


@pytest.fixture
def make_demo_proxy(make_proxy: MakeProxy, demo_url: str) -> MakeProxy:
    """Start a proxy configured as ``saiproxy --demo`` configures it; keywords override."""

    async def factory(**env: str | None) -> TestClient[web.Request, web.Application]:
        demo = {
            "SAI_URL": demo_url,
            "SAI_KEY": DEMO_KEY,
            "SAI_COOKIE": DEMO_COOKIE,
            "SAI_TEMPLATE_ID": DEMO_TEMPLATE,
        }
        return await make_proxy(**{**demo, **env})

    return factory


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> TestClient[web.Request, web.Application]:
    return await make_proxy()


def settings_of(client: TestClient[web.Request, web.Application]) -> Settings:
    from saiproxy.base.keys import SETTINGS

    return client.app[SETTINGS]  # type: ignore[index]


def log_lines(tmp_path: Path) -> list[str]:
    """Return every line the proxies of this test wrote to their log files."""
    lines: list[str] = []
    for path in sorted((tmp_path / "logs").glob("saiproxy-*.log*")):
        lines.extend(path.read_text(encoding="utf-8").splitlines())
    return lines


def chat(*messages: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    """Return a chat completion body from (role, content) pairs."""
    return {"messages": [{"role": r, "content": c} for r, c in messages], **extra}


def openai_url(proxy: Any) -> str:
    """Return the test proxy's base URL as the OpenAI SDKs take it (``.../v1``)."""
    return str(proxy.make_url("/v1"))


def anthropic_url(proxy: Any) -> str:
    """Return the test proxy's base URL as the Anthropic SDKs take it (no ``/v1``)."""
    return str(proxy.make_url("")).rstrip("/")


NODE_DIR = ROOT / "tests" / "node"


async def run_node(script: str, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run a Node client script from tests/node; return the JSON it prints last."""
    import asyncio
    import json
    import os

    process = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / script), *args,
        cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_NO_WARNINGS": "1", **(env or {})},
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    return json.loads(stdout.decode().strip().splitlines()[-1])


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    """A real Valkey server for the whole session (tests flush it through ``valkey``)."""
    server = ValkeyServer(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def valkey(valkey_server: ValkeyServer) -> ValkeyServer:
    """The session's Valkey server, running and empty."""
    if valkey_server.process is None or valkey_server.process.poll() is not None:
        valkey_server.start()
    valkey_server.command("FLUSHALL")
    return valkey_server


@pytest.fixture(params=["process", "valkey"])
def store(request: pytest.FixtureRequest) -> dict[str, str]:
    """Run a test against both stores: in the process, and a real Valkey server."""
    if request.param == "process":
        return {}
    server: ValkeyServer = request.getfixturevalue("valkey")
    return {"LIMITS_URL": server.url}
