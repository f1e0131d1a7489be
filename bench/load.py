"""An aiohttp load generator: per-request latency, first byte, first content, errors."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson

from bench import responses

Mode = Literal["json", "sse", "raw", "responses"]  # responses: a Responses API stream
STREAMS = ("sse", "responses")


@dataclass(slots=True)
class Result:
    """What one request did."""

    status: int
    latency: float
    ttfb: float | None = None  # first byte of the body
    first_content: float | None = None  # first content chunk (streams)
    error: str | None = None
    cut: bool = False  # a stream that did not end with finish "stop" and [DONE]
    stream: bool = False
    frames: int = 0  # content frames received (streams)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and not self.cut


@dataclass(frozen=True, slots=True)
class Marks:
    """How a protocol's stream shows a piece of answer text, and a clean end."""

    content: bytes  # in every frame that carries answer text (not the opening frames)
    ends: tuple[bytes, ...]  # every one of these appears in a stream that ended cleanly


MARKS: dict[str, Marks] = {
    "sse": Marks(b'"delta":{"content":"', (b'"finish_reason":"stop"', b"data: [DONE]")),
    "responses": Marks(responses.DELTA, (responses.COMPLETED,)),
}
_OVERLAP = 64  # bytes kept from the previous read: a mark may straddle two reads


async def one(session: aiohttp.ClientSession, url: str, body: bytes, mode: Mode) -> Result:
    """Send one request and classify the answer."""
    started = time.perf_counter()
    status = 0
    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as response:
            status = response.status
            ttfb = first_content = None
            if mode in STREAMS:
                # Read as the bytes come, the same loop for every protocol: the
                # client's cost must not depend on how many lines a frame has.
                marks = MARKS[mode]
                ended: set[bytes] = set()
                frames = 0
                tail = b""
                async for chunk in response.content.iter_any():
                    now = time.perf_counter() - started
                    if ttfb is None:
                        ttfb = now
                    seen = tail + chunk
                    found = seen.count(marks.content) - tail.count(marks.content)
                    if found:
                        frames += found
                        if first_content is None:
                            first_content = now
                    ended.update(end for end in marks.ends if end in seen)
                    tail = seen[-_OVERLAP:]
                cut = status == 200 and len(ended) < len(marks.ends)
                latency = time.perf_counter() - started
                return Result(
                    status, latency, ttfb, first_content, cut=cut, stream=True, frames=frames
                )
            async for _ in response.content.iter_any():
                if ttfb is None:
                    ttfb = time.perf_counter() - started
            return Result(status, time.perf_counter() - started, ttfb, ttfb)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        # A stream that broke after its headers was cut; anything else failed.
        cut = mode in STREAMS and status == 200
        return Result(
            0 if not cut else status,
            time.perf_counter() - started,
            error=None if cut else type(exc).__name__,
            cut=cut,
            stream=mode in STREAMS,
        )


async def run(
    url: str,
    body: bytes | Callable[[int], tuple[bytes, Mode]],
    *,
    mode: Mode = "json",
    concurrency: int,
    requests: int | None = None,
    duration: float | None = None,
    stop: asyncio.Event | None = None,
    limit: int = 0,
) -> tuple[list[Result], float]:
    """Run requests from ``concurrency`` workers until a count, a duration or ``stop``."""
    results: list[Result] = []
    counter = 0
    deadline = time.perf_counter() + duration if duration else None
    connector = aiohttp.TCPConnector(limit=limit or concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120, sock_connect=10)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal counter
        while True:
            if requests is not None and counter >= requests:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if stop is not None and stop.is_set():
                return
            index = counter
            counter += 1
            payload, kind = body(index) if callable(body) else (body, mode)
            results.append(await one(session, url, payload, kind))

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return results, time.perf_counter() - started


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"Look up the {name.split('_')[1]} of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    for name in ("get_weather", "get_time", "get_population")
]


def chat_body(
    stream: bool, text: str = "Say something about load testing.", *, tools: bool = False
) -> bytes:
    """Return an OpenAI chat body; with ``tools``, one offering three function tools."""
    body: dict[str, object] = {
        "model": "sai-model",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are a benchmark."},
            {"role": "user", "content": text},
        ],
    }
    if tools:
        body["tools"] = TOOLS
    return orjson.dumps(body)


def sai_body() -> bytes:
    """Return a SAI template payload, for calling the fake SAI directly."""
    return orjson.dumps({"inputs": {"system": "You are a benchmark.", "user": "Say something."}})


def percentile(values: list[float], q: float) -> float | None:
    """Return the q-th percentile (0-100) of values, or None when empty."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q) - 1))]


def summary(results: list[Result], elapsed: float) -> dict[str, Any]:
    """Return the figures of a run."""
    good = [r for r in results if r.ok]
    latencies = [r.latency for r in good]
    firsts = [r.first_content for r in good if r.first_content is not None]
    return {
        "requests": len(results),
        "errors": len(results) - len(good),
        "rps": len(good) / elapsed if elapsed else 0.0,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "first_ms": _ms(percentile(firsts, 50)),
        "elapsed_s": elapsed,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000
