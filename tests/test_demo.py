"""The demo upstream (``saiproxy --demo``): each magic value does what docs/demo.md says."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from saiproxy.upstream.demo import MAGIC

from .conftest import MakeProxy, chat

URL = "/v1/chat/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


async def _post(proxy: Any, text: str, **extra: Any) -> tuple[int, Any, Any]:
    response = await proxy.post(URL, json=chat(("user", text), **extra))
    return response.status, response.headers, await response.json()


async def _events(proxy: Any, text: str) -> list[bytes]:
    response = await proxy.post(URL, json=chat(("user", text), stream=True))
    return [line async for line in response.content if line.strip()]


@pytest.fixture
def demo_proxy(make_demo_proxy: MakeProxy) -> MakeProxy:
    """A proxy configured as ``saiproxy --demo`` configures it, in http error mode."""

    async def factory(**env: str | None) -> Any:
        return await make_demo_proxy(**{"ERROR_MODE": "http", **env})

    return factory


async def test_a_plain_message_is_echoed(demo_proxy: MakeProxy) -> None:
    status, _, body = await _post(await demo_proxy(), "Hello!")
    assert status == 200
    assert "You said: 'Hello!'" in body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 1  # SAI's token headers


async def test_401_and_a_users_own_key(demo_proxy: MakeProxy) -> None:
    proxy = await demo_proxy()
    status, _, body = await _post(proxy, "demo:401 hi")
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    assert "SAI_KEY" in body["error"]["message"]
    response = await proxy.post(URL, json=chat(("user", "hi")), headers={"user-api-key": "sk-mine"})
    body = await response.json()
    assert response.status == 401 and "user key" in body["error"]["message"]


async def test_429_with_no_fallback_left(demo_proxy: MakeProxy) -> None:
    status, headers, body = await _post(await demo_proxy(), "demo:429 hi")
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
    assert headers["Retry-After"] == "7"


async def test_fallback_from_a_users_key_to_the_cookie(demo_proxy: MakeProxy) -> None:
    proxy = await demo_proxy()
    response = await proxy.post(
        URL, json=chat(("user", "demo:fallback hi")), headers={"user-api-key": "sk-mine"}
    )
    assert response.status == 200
    assert "You said" in (await response.json())["choices"][0]["message"]["content"]
    metrics = await (await proxy.get("/metrics")).text()
    assert "saiproxy_credential_fallbacks_total 1.0" in metrics


async def test_500_is_upstream_error(demo_proxy: MakeProxy) -> None:
    status, _, body = await _post(await demo_proxy(), "demo:500")
    assert (status, body["error"]["code"]) == (502, "upstream_error")
    assert "attempts" not in body["error"]["message"]


async def test_503_is_retried_then_upstream_error(demo_proxy: MakeProxy) -> None:
    status, _, body = await _post(await demo_proxy(MAX_RETRIES="1"), "demo:503")
    assert (status, body["error"]["code"]) == (502, "upstream_error")
    assert "after 2 attempts" in body["error"]["message"]


async def test_long_is_context_length_exceeded(demo_proxy: MakeProxy) -> None:
    status, _, body = await _post(await demo_proxy(), "demo:long")
    assert (status, body["error"]["code"]) == (400, "context_length_exceeded")


async def test_timeout(demo_proxy: MakeProxy) -> None:
    proxy = await demo_proxy(REQUEST_TIMEOUT="0.3", MAX_RETRIES="0")
    status, _, body = await _post(proxy, "demo:timeout")
    assert (status, body["error"]["code"]) == (504, "upstream_timeout")


async def test_slow_streams_pings(demo_proxy: MakeProxy) -> None:
    proxy = await demo_proxy(PING_INTERVAL="0.2")
    response = await proxy.post(URL, json=chat(("user", "demo:slow"), stream=True))
    first = await response.content.readline()
    assert first.startswith(b": ping")
    response.close()


async def test_break_ends_the_stream_with_an_error(demo_proxy: MakeProxy) -> None:
    events = await _events(await demo_proxy(), "demo:break")
    assert events[-1] == b"data: [DONE]\n"
    assert orjson.loads(events[-2].removeprefix(b"data: "))["error"]["code"] == "upstream_error"


async def test_tool_calls_the_first_offered_tool(demo_proxy: MakeProxy) -> None:
    status, _, body = await _post(await demo_proxy(), "demo:tool", tools=[WEATHER])
    assert status == 200
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather"
    assert orjson.loads(call["arguments"]) == {"city": "demo"}


def test_every_magic_value_is_tested_and_documented() -> None:
    tested = {
        "demo:401", "demo:429", "demo:fallback", "demo:500", "demo:503", "demo:long",
        "demo:timeout", "demo:slow", "demo:break", "demo:tool",
    }  # fmt: skip
    assert set(MAGIC) == tested
    from .conftest import ROOT

    documented = (ROOT / "docs" / "demo.md").read_text()
    for value in MAGIC:
        assert f"`{value}" in documented, value
