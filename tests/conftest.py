"""A real fake SAI (an aiohttp app on a loopback port) and a proxy pointed at it."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from saiproxy.app import create_app, log_setup_for
from saiproxy.server import runner_options
from saiproxy.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "config" / "saiproxy.toml")
SYSTEM_KEY = "sys-key-7f3a9c1e5b"
SYSTEM_COOKIE = "session=sys-cookie-4d8e2a6f0c; Cookies=1"
TEMPLATE = "tpl-42"


@dataclass
class Reply:
    """What the fake SAI answers to one call."""

    status: int = 200
    body: str | bytes | list[str | bytes] = "Hello from SAI"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before the status line
    chunk_delay: float = 0.0  # between body pieces
    reset_after: int | None = None  # abort the connection after this many pieces


@dataclass
class Received:
    """What the fake SAI received in one call."""

    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    json: Any

    @property
    def auth(self) -> tuple[str, str | None]:
        """Return the credential header it carried: ('X-Api-Key'|'Cookie', value)."""
        if "X-Api-Key" in self.headers:
            return "X-Api-Key", self.headers["X-Api-Key"]
        return "Cookie", self.headers.get("Cookie")


class FakeSai:
    """A scriptable SAI: queue replies, then inspect what arrived."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.routes: dict[str, deque[Reply]] = {}
        self.default = Reply()
        self.received: list[Received] = []
        self.open_responses = 0
        self.disconnects = 0
        self.url = ""
        self.app = web.Application()
        self.app.router.add_post("/api/templates/{template}/execute", self._execute)

    def script(self, *replies: Reply) -> None:
        """Answer the next calls with these replies, in order (then the default)."""
        self.replies.extend(replies)

    def route(self, user: str, *replies: Reply) -> None:
        """Answer calls whose user text is ``user`` with these replies, in order."""
        self.routes.setdefault(user, deque()).extend(replies)

    def _next_reply(self, body: Any) -> Reply:
        user = body.get("inputs", {}).get("user") if isinstance(body, dict) else None
        routed = self.routes.get(user) if isinstance(user, str) else None
        if routed:
            return routed.popleft()
        return self.replies.popleft() if self.replies else self.default

    async def _execute(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.received.append(
            Received(request.path, dict(request.query), CIMultiDict(request.headers), body)
        )
        reply = self._next_reply(body)
        self.open_responses += 1
        try:
            if reply.delay:
                await asyncio.sleep(reply.delay)
            pieces = reply.body if isinstance(reply.body, list) else [reply.body]
            response = web.StreamResponse(status=reply.status, headers=reply.headers)
            response.content_type = "text/plain"
            response.enable_chunked_encoding()
            await response.prepare(request)
            for index, piece in enumerate(pieces):
                if reply.reset_after is not None and index == reply.reset_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await response.write(piece.encode() if isinstance(piece, str) else piece)
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
            await response.write_eof()
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        finally:
            self.open_responses -= 1


@pytest.fixture
async def sai() -> AsyncIterator[FakeSai]:
    fake = FakeSai()
    server = TestServer(fake.app, host="127.0.0.1")
    await server.start_server(access_log=None)
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake
    await server.close()


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
async def proxy(make_proxy: MakeProxy) -> TestClient[web.Request, web.Application]:
    return await make_proxy()


def settings_of(client: TestClient[web.Request, web.Application]) -> Settings:
    from saiproxy.keys import SETTINGS

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
