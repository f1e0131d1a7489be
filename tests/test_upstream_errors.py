"""SAI's failures (docs/sai.md): each outcome in both ERROR_MODEs, retries, timeouts."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from .conftest import FakeSai, MakeProxy, Reply, chat

URL = "/v1/chat/completions"

# outcome name -> (replies, message-mode finish_reason, http status, type, code, text fragment)
# Message mode only uses finish reasons every OpenAI client accepts (docs/sai.md).
OUTCOMES: dict[str, tuple[list[Reply], str, int, str, str, str]] = {
    "401": (
        [Reply(status=401)],
        "stop",
        401,
        "authentication_error",
        "invalid_api_key",
        "SAI_KEY",
    ),
    "429": (
        [Reply(status=429, body="Test template usage limit exceeded")],
        "stop",
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        "usage limit",
    ),
    "context": (
        [Reply(status=500, body='{"error": "Prompt is too long: 200001 tokens"}')],
        "length",
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "new chat",
    ),
    "context-openaicompatible": (
        [Reply(status=500, body="Error from OpenAICompatible provider: bad request")],
        "length",
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "summary",
    ),
    "500": (
        [Reply(status=500, body="internal")],
        "stop",
        502,
        "api_error",
        "upstream_error",
        "HTTP 500",
    ),
    "503-after-retries": (
        [Reply(status=503)] * 3,
        "stop",
        502,
        "api_error",
        "upstream_error",
        "HTTP 503",
    ),
    "timeout-after-retries": (
        [Reply(delay=2.0)] * 3,
        "stop",
        504,
        "api_error",
        "upstream_timeout",
        "did not answer",
    ),
}
ENV = {"MAX_RETRIES": "2", "REQUEST_TIMEOUT": "0.3"}


@pytest.mark.parametrize("name", list(OUTCOMES))
async def test_outcome_in_message_mode(make_proxy: MakeProxy, sai: FakeSai, name: str) -> None:
    replies, finish_reason, _, _, code, fragment = OUTCOMES[name]
    proxy = await make_proxy(**ENV)
    sai.script(*replies)
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == 200
    assert response.headers["X-Saiproxy-Error"] == code
    data = await response.json()
    assert data["object"] == "chat.completion"
    choice = data["choices"][0]
    assert choice["finish_reason"] == finish_reason
    assert choice["message"]["role"] == "assistant"
    assert fragment in choice["message"]["content"]
    assert data["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert len(sai.received) == len(replies)


@pytest.mark.parametrize("name", list(OUTCOMES))
async def test_outcome_in_http_mode(make_proxy: MakeProxy, sai: FakeSai, name: str) -> None:
    replies, _, status, kind, code, fragment = OUTCOMES[name]
    proxy = await make_proxy(ERROR_MODE="http", **ENV)
    sai.script(*replies)
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == status
    error = (await response.json())["error"]
    assert (error["type"], error["code"]) == (kind, code)
    assert fragment in error["message"]
    assert len(sai.received) == len(replies)
    assert response.headers["X-Request-ID"]


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_retryable_statuses_are_retried_then_succeed(
    make_proxy: MakeProxy, sai: FakeSai, status: int
) -> None:
    proxy = await make_proxy(MAX_RETRIES="3")
    sai.script(Reply(status=status), Reply(status=status), Reply(body="third time lucky"))
    response = await proxy.post(URL, json=chat(("user", "hi")))
    data = await response.json()
    assert data["choices"][0]["message"]["content"] == "third time lucky"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert len(sai.received) == 3
    assert len({r.headers["X-Request-ID"] for r in sai.received}) == 1


@pytest.mark.parametrize("retries", [0, 1, 4])
async def test_max_retries_bounds_the_attempts(
    make_proxy: MakeProxy, sai: FakeSai, retries: int
) -> None:
    proxy = await make_proxy(MAX_RETRIES=str(retries), ERROR_MODE="http")
    sai.default = Reply(status=503)
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == 502
    assert len(sai.received) == retries + 1


async def test_timeouts_are_retried(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(MAX_RETRIES="3", REQUEST_TIMEOUT="0.2")
    sai.script(Reply(delay=1.0), Reply(delay=1.0), Reply(body="finally"))
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert (await response.json())["choices"][0]["message"]["content"] == "finally"
    assert len(sai.received) == 3


async def test_slow_but_flowing_body_is_not_cut(make_proxy: MakeProxy, sai: FakeSai) -> None:
    # Each silence is far under REQUEST_TIMEOUT (a busy machine may stretch one
    # several times over), the whole answer takes longer.
    proxy = await make_proxy(REQUEST_TIMEOUT="1.2", MAX_RETRIES="0")
    sai.script(Reply(body=["a"] * 10, chunk_delay=0.15))
    response = await proxy.post(URL, json=chat(("user", "hi")))
    data = await response.json()
    assert data["choices"][0]["message"]["content"] == "a" * 10
    assert len(sai.received) == 1


async def _settled(sai: FakeSai) -> None:
    """Wait until the fake SAI has no response open (its calls ended or were cut)."""
    async with asyncio.timeout(10):
        while sai.open_responses:
            await asyncio.sleep(0.02)


async def test_body_that_stalls_past_request_timeout_is_a_timeout(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    # Non-streamed too, the silence inside SAI's body is bounded, not only the
    # wait for its headers: each attempt stalls after its first piece.
    proxy = await make_proxy(ERROR_MODE="http", REQUEST_TIMEOUT="0.3", MAX_RETRIES="1")
    sai.script(*[Reply(body=["half", " never"], chunk_delay=60.0)] * 2)
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == 504
    assert (await response.json())["error"]["code"] == "upstream_timeout"
    assert len(sai.received) == 2
    # Each attempt was given up in its silence (SAI saw the hang-up), not waited out.
    await _settled(sai)
    assert sai.disconnects == 2


async def test_error_body_that_stalls_is_not_waited_for(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(ERROR_MODE="http", REQUEST_TIMEOUT="0.3", MAX_RETRIES="0")
    sai.script(Reply(status=500, body=["oops", " never"], chunk_delay=60.0))
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "upstream_error"
    await _settled(sai)
    assert sai.disconnects == 1  # the stalled error body was dropped, not waited for


async def test_body_that_breaks_off_is_retried_when_nothing_was_sent(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=["half", " of it"], reset_after=1), Reply(body="whole answer"))
    response = await proxy.post(URL, json=chat(("user", "hi")))
    data = await response.json()
    assert data["choices"][0]["message"]["content"] == "whole answer"
    assert len(sai.received) == 2


async def test_401_and_context_are_never_retried(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(MAX_RETRIES="5")
    sai.script(Reply(status=401))
    await proxy.post(URL, json=chat(("user", "hi")))
    assert len(sai.received) == 1
    sai.script(Reply(status=500, body="prompt is too long"))
    await proxy.post(URL, json=chat(("user", "hi")))
    assert len(sai.received) == 2


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("mode", "status"), [("message", 200), ("http", 502)])
async def test_connection_refused_after_retries(
    make_proxy: MakeProxy, mode: str, status: int
) -> None:
    proxy = await make_proxy(
        SAI_URL=f"http://127.0.0.1:{_closed_port()}", MAX_RETRIES="2", ERROR_MODE=mode
    )
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == status
    body: dict[str, Any] = await response.json()
    text = (
        body["choices"][0]["message"]["content"] if mode == "message" else body["error"]["message"]
    )
    assert "connection failed" in text
    assert "3 attempts" in text


@pytest.mark.parametrize(("mode", "status"), [("message", 200), ("http", 400)])
async def test_early_context_check_skips_sai(
    make_proxy: MakeProxy, sai: FakeSai, mode: str, status: int
) -> None:
    proxy = await make_proxy(MAX_CONTEXT_TOKENS="100", ERROR_MODE=mode)
    # 404 characters -> about 101 tokens: over the limit.
    body = chat(("system", "s" * 4), ("user", "u" * 400))
    response = await proxy.post(URL, json=body)
    assert response.status == status
    data = await response.json()
    if mode == "message":
        assert data["choices"][0]["finish_reason"] == "length"
        assert "too long" in data["choices"][0]["message"]["content"]
    else:
        assert data["error"]["code"] == "context_length_exceeded"
    assert sai.received == []
    # Exactly at the limit (400 characters = 100 tokens) SAI is called.
    ok = await proxy.post(URL, json=chat(("user", "u" * 400)))
    assert ok.status == 200
    assert len(sai.received) == 1


async def test_early_check_counts_unwrapped_text(make_proxy: MakeProxy, sai: FakeSai) -> None:
    from saiproxy.core.conversation import PLUGIN_MARKER, PLUGIN_PREFIX

    proxy = await make_proxy(MAX_CONTEXT_TOKENS="50")
    wrapped = PLUGIN_PREFIX + "short question" + PLUGIN_MARKER + "x" * 5000
    response = await proxy.post(URL, json=chat(("user", wrapped)))
    data = await response.json()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert len(sai.received) == 1
