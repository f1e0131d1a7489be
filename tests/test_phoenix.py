"""Traces in a real backend: Arize Phoenix receives saiproxy's spans over OTLP/HTTP.

Phoenix (``arize-phoenix``: about 860 MB installed, two minutes to install)
is too heavy for the suite's own venv, so CI installs it in ``.venv-phoenix``
and runs this file in a step of its own, with SAIPROXY_PHOENIX naming its
``phoenix`` command. Without that variable the file is skipped.

Each call carries a ``traceparent`` of its own trace, so its spans are read
back by trace ID through Phoenix's REST API (``GET /v1/projects/{project}/spans``).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from saiproxy.base.settings import load_settings
from saiproxy.tracing.hooks import TRACING
from saiproxy.web.app import create_app, log_setup_for

from .conftest import SYSTEM_COOKIE, SYSTEM_KEY, FakeSai, Reply, base_env, chat

PHOENIX = os.environ.get("SAIPROXY_PHOENIX", "")
pytestmark = pytest.mark.skipif(not PHOENIX, reason="SAIPROXY_PHOENIX names no phoenix command")
PROJECT = "saiproxy-ci"
Proxy = TestClient[web.Request, web.Application]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOL_ANSWER = (
    'Looking.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Quito"}}</tool_call>'
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Run Phoenix on loopback with SQLite in a temporary directory; yield its URL."""
    work = tmp_path_factory.mktemp("phoenix")
    port = _free_port()
    env = {
        **os.environ,
        "PHOENIX_WORKING_DIR": str(work),
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(_free_port()),
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    log = (work / "phoenix.log").open("wb")
    process = subprocess.Popen(
        [PHOENIX, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _get(f"{url}/v1/projects")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "Phoenix did not start: " + (work / "phoenix.log").read_text()[-3000:]
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
async def proxy(
    aiohttp_client: Any, sai: FakeSai, tmp_path: Path, phoenix: str
) -> AsyncIterator[Proxy]:
    env = {
        **base_env(sai, tmp_path),
        "SAI_COOKIE": SYSTEM_COOKIE,
        "OTEL_EXPORTER_OTLP_ENDPOINT": phoenix,
        "OTEL_SERVICE_NAME": "saiproxy",
        "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={PROJECT}",
        # Nothing goes out on its own during a test: each flushes (or shuts down).
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
    }
    settings = load_settings(env)
    app = create_app(settings, log_setup=log_setup_for(settings))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(access_log=None)
    client: Proxy = await aiohttp_client(server)
    yield client


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten Phoenix's nested attributes back to dotted names."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flat(inner, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


async def _spans(
    phoenix: str, trace_id: str, count: int, proxy: Proxy | None = None
) -> list[dict[str, Any]]:
    """Flush the proxy's spans; return the trace's once Phoenix has at least ``count``."""
    if proxy is not None:
        assert await asyncio.to_thread(proxy.app[TRACING].flush, 30)
    url = f"{phoenix}/v1/projects/{PROJECT}/spans?trace_id={trace_id}&limit=100"
    deadline = time.monotonic() + 30
    while True:
        try:
            spans = (await asyncio.to_thread(_get, url))["data"]
        except OSError:
            spans = []  # the project appears with its first span
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.3)


async def _call(proxy: Proxy, path: str, body: dict[str, Any]) -> tuple[str, str, int, bytes]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    response = await proxy.post(
        path, json=body, headers={"traceparent": f"00-{trace_id}-{parent}-01"}
    )
    return trace_id, parent, response.status, await response.read()


def _tree(spans: list[dict[str, Any]], parent: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return the server span (the client's span its parent) and its children.

    (Phoenix reports its own span kinds, LLM for a GenAI span, not OpenTelemetry's.)
    """
    [server] = [s for s in spans if s["parent_id"] == parent]
    own = server["context"]["span_id"]
    children = [s for s in spans if s["parent_id"] == own]
    assert len(children) == len(spans) - 1  # everything else hangs under it
    return server, children


MESSAGES = {"model": "sai-model", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
CALLS = [
    ("/v1/chat/completions", chat(("user", "hi"), temperature=0.2), "chat"),
    ("/v1/chat/completions", chat(("user", "hi"), stream=True), "chat"),
    ("/v1/responses", {"model": "sai-model", "input": "hi"}, "chat"),
    ("/v1/responses", {"model": "sai-model", "input": "hi", "stream": True}, "chat"),
    ("/v1/messages", MESSAGES, "chat"),
    ("/v1/messages", {**MESSAGES, "stream": True}, "chat"),
    ("/v1/completions", {"model": "sai-model", "prompt": "Say"}, "text_completion"),
    ("/v1/completions", {"model": "sai-model", "prompt": "Say", "stream": True}, "text_completion"),
]


@pytest.mark.parametrize(("path", "body", "operation"), CALLS)
async def test_each_protocol_streamed_and_not(
    proxy: Proxy, phoenix: str, path: str, body: dict[str, Any], operation: str
) -> None:
    trace_id, parent, status, _ = await _call(proxy, path, body)
    assert status == 200
    spans = await _spans(phoenix, trace_id, 2, proxy)
    server, children = _tree(spans, parent)
    attributes = _flat(server["attributes"])
    assert server["name"] == f"{operation} sai-model"
    assert attributes["gen_ai.operation.name"] == operation
    assert attributes["gen_ai.provider.name"] == "sai"
    assert attributes["gen_ai.request.model"] == "sai-model"
    assert attributes["gen_ai.response.model"] == "sai-model"
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert list(attributes["gen_ai.response.finish_reasons"])
    assert attributes["http.response.status_code"] == 200
    assert attributes["saiproxy.stream"] is bool(body.get("stream"))
    [attempt] = children
    assert attempt["name"] == "POST"
    assert _flat(attempt["attributes"])["saiproxy.credential.kind"] == "key"
    if body.get("stream"):
        events = [event["name"] for event in server["events"]]
        assert events == ["saiproxy.stream.first_token", "saiproxy.stream.end"]


async def test_tools_a_retry_and_a_fallback(proxy: Proxy, phoenix: str, sai: FakeSai) -> None:
    sai.script(Reply(status=503), Reply(status=429), Reply(body=TOOL_ANSWER))
    body = chat(("user", "Weather in Quito?"), tools=[WEATHER])
    trace_id, parent, status, raw = await _call(proxy, "/v1/chat/completions", body)
    assert status == 200
    assert json.loads(raw)["choices"][0]["finish_reason"] == "tool_calls"
    spans = await _spans(phoenix, trace_id, 4, proxy)
    server, children = _tree(spans, parent)
    attempts = sorted(children, key=lambda s: s["start_time"])
    facts = [
        (a["saiproxy.sai.retry"], a["saiproxy.sai.fallback"], a["saiproxy.credential.kind"],
         a["http.response.status_code"])
        for a in (_flat(s["attributes"]) for s in attempts)
    ]  # fmt: skip
    assert facts == [(0, False, "key", 503), (1, False, "key", 429), (1, True, "cookie", 200)]
    assert [s["status_code"] for s in attempts] == ["ERROR", "ERROR", "UNSET"]
    attributes = _flat(server["attributes"])
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["tool_calls"]
    assert attributes["saiproxy.tool_calls"] == 1
    dumped = json.dumps(spans)
    assert SYSTEM_KEY not in dumped and "sys-cookie" not in dumped


async def test_an_error(proxy: Proxy, phoenix: str, sai: FakeSai) -> None:
    sai.script(Reply(status=401))
    trace_id, parent, status, _ = await _call(proxy, "/v1/messages", MESSAGES)
    spans = await _spans(phoenix, trace_id, 2, proxy)
    server, [attempt] = _tree(spans, parent)
    attributes = _flat(server["attributes"])
    assert attributes["error.type"] == "invalid_api_key"
    assert server["status_code"] == "ERROR"
    assert _flat(attempt["attributes"])["error.type"] == "401"
    assert attributes["http.response.status_code"] == status


async def test_the_pipeline_flushes_on_shutdown(proxy: Proxy, phoenix: str) -> None:
    trace_id, _, status, _ = await _call(proxy, "/v1/chat/completions", chat(("user", "x")))
    assert status == 200
    await asyncio.sleep(1)
    assert await _spans(phoenix, trace_id, 0) == []  # still queued (OTEL_BSP_SCHEDULE_DELAY)
    await proxy.close()  # the drain's cleanup flushes what is queued
    assert len(await _spans(phoenix, trace_id, 2)) == 2
    assert proxy.app[TRACING].dropped() == 0
