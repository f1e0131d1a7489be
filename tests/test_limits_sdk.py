"""The official SDKs retry on saiproxy's 429s as they should: after retry-after-ms, and not
at all when the budget is spent (x-should-retry: false)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import anthropic._base_client
import openai
import openai._base_client
import pytest

from .conftest import FakeSai, MakeProxy, Reply, anthropic_url, chat, openai_url
from .paced import PacedSai, paced_sai


class Attempts:
    """An httpx hook noting each completion attempt's status and time."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []
        self.on_refusal: Callable[[], None] = lambda: None

    async def __call__(self, response: Any) -> None:
        if response.request.method == "POST":
            self.seen.append((response.status_code, time.monotonic()))
            if response.status_code == 429:
                self.on_refusal()

    def client(self, sdk: Any) -> Any:
        """Return an HTTP client of the kind the SDK takes (httpx, or httpx2 in newer ones)."""
        base = sdk._base_client
        http = getattr(base, "httpx2", None) or base.httpx
        return http.AsyncClient(event_hooks={"response": [self]})

    @property
    def statuses(self) -> list[int]:
        return [status for status, _ in self.seen]


async def _hold_the_slot(proxy: Any, paced: PacedSai, attempts: Attempts) -> asyncio.Task[Any]:
    """Open a stream that holds the one concurrent slot until the SDK has had its 429."""
    refused = paced.gate("refused")
    attempts.on_refusal = refused.open
    paced.route("hold", "a", refused, "b", "c")
    response = await proxy.post("/v1/chat/completions", json=chat(("user", "hold"), stream=True))
    assert response.status == 200  # admitted: the slot is taken
    return asyncio.create_task(response.read())


@pytest.fixture
async def paced() -> AsyncIterator[PacedSai]:
    async with paced_sai() as sai:
        yield sai


@pytest.fixture
async def limited(make_proxy: MakeProxy, paced: PacedSai) -> Any:
    return await make_proxy(SAI_URL=paced.url, LIMITS_CLIENT_CONCURRENCY="1")


async def test_openai_sdk_waits_retry_after_ms_then_succeeds(limited: Any, paced: PacedSai) -> None:
    attempts = Attempts()
    holder = await _hold_the_slot(limited, paced, attempts)
    async with openai.AsyncOpenAI(
        base_url=openai_url(limited),
        api_key="unused",
        max_retries=2,
        http_client=attempts.client(openai),
    ) as client:
        result = await client.chat.completions.create(
            model="sai-model", messages=[{"role": "user", "content": "Hi"}]
        )
    await holder
    assert result.choices[0].message.content
    assert attempts.statuses == [429, 200]
    # The SDK waited the 1,000 ms it was told, not its own shorter first backoff (~0.5 s).
    assert attempts.seen[1][1] - attempts.seen[0][1] >= 0.95


async def test_anthropic_sdk_waits_retry_after_ms_then_succeeds(
    limited: Any, paced: PacedSai
) -> None:
    attempts = Attempts()
    holder = await _hold_the_slot(limited, paced, attempts)
    async with anthropic.AsyncAnthropic(
        base_url=anthropic_url(limited), api_key="unused", max_retries=2,
        http_client=attempts.client(anthropic),
    ) as client:  # fmt: skip
        message = await client.messages.create(
            model="sai-model", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
        )
    await holder
    assert message.content
    assert attempts.statuses == [429, 200]
    assert attempts.seen[1][1] - attempts.seen[0][1] >= 0.95


@pytest.fixture
async def spent(make_proxy: MakeProxy, sai: FakeSai) -> Any:
    sai.default = Reply(headers={"prompttokens": "90", "completiontokens": "10"})
    proxy = await make_proxy(LIMITS_CLIENT_BUDGET="150", LIMITS_OUTPUT_RESERVE="10")
    assert (await proxy.post("/v1/chat/completions", json=chat(("user", "Hi")))).status == 200
    await asyncio.sleep(0.05)
    return proxy


async def test_openai_sdk_does_not_retry_a_spent_budget(spent: Any) -> None:
    attempts = Attempts()
    async with openai.AsyncOpenAI(
        base_url=openai_url(spent),
        api_key="unused",
        max_retries=3,
        http_client=attempts.client(openai),
    ) as client:
        with pytest.raises(openai.RateLimitError) as raised:
            await client.chat.completions.create(
                model="sai-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=100
            )
    assert attempts.statuses == [429]
    assert raised.value.code == "insufficient_quota"


async def test_anthropic_sdk_does_not_retry_a_spent_budget(spent: Any) -> None:
    attempts = Attempts()
    async with anthropic.AsyncAnthropic(
        base_url=anthropic_url(spent), api_key="unused", max_retries=3,
        http_client=attempts.client(anthropic),
    ) as client:  # fmt: skip
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(
                model="sai-model", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]
            )
    assert attempts.statuses == [429]
