"""Streaming (docs/architecture.md): SSE frames, pass-through, keep-alive, disconnects, faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse

from .conftest import SYSTEM_COOKIE, FakeSai, MakeProxy, Reply, chat
from .paced import Paced, PacedSai, paced_sai

URL = "/v1/chat/completions"
PING = b": ping\n\n"


@pytest.fixture
async def paced() -> AsyncIterator[PacedSai]:
    async with paced_sai() as sai:
        yield sai


async def _read_until_pings(response: ClientResponse, count: int) -> bytes:
    """Read a stream's frames until ``count`` more pings came (or it ended); return them."""
    read, pings = b"", 0
    while pings < count:
        frame = await response.content.readuntil(b"\n\n")
        read += frame
        if frame == PING:
            pings += 1
        elif frame.startswith(b"data: [DONE]") or not frame:
            break
    return read


def _stream_body(*messages: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    return chat(*messages, stream=True, **extra)


def _frames(raw: bytes) -> list[bytes]:
    """Split an SSE body into frames, checking the exact separators."""
    assert raw.endswith(b"\n\n")
    assert b"\r" not in raw
    return raw[:-2].split(b"\n\n")


def _data(frames: list[bytes]) -> list[Any]:
    """Return the payloads of the data frames: parsed JSON, or the string [DONE]."""
    out: list[Any] = []
    for frame in frames:
        if frame.startswith(b":"):
            continue
        assert frame.startswith(b"data: "), frame
        payload = frame[len(b"data: ") :]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


async def _events(response: ClientResponse) -> list[Any]:
    return _data(_frames(await response.read()))


async def test_exact_sse_frames(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(
        Reply(
            body=["Hel", "lo", " world"],
            chunk_delay=0.05,
            headers={"prompttokens": "7", "completiontokens": "3", "model": "sai-x"},
        )
    )
    response = await proxy.post(
        URL,
        json=_stream_body(("user", "hi"), stream_options={"include_usage": True}),
        headers={"X-Request-ID": "stream-1"},
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["X-Request-ID"] == "stream-1"

    events = await _events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-stream-1-")
    assert len({c["created"] for c in chunks}) == 1
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"sai-x"}
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
          "finish_reason": None}],
        [{"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "lo"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": " world"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
        [],
    ]  # fmt: skip
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert all("usage" not in c for c in chunks[:-1])


async def test_no_usage_chunk_unless_asked(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    events = await _events(await proxy.post(URL, json=_stream_body(("user", "hi"))))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(e["choices"] for e in events[:-1])


async def test_multibyte_characters_split_across_chunks(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    text = "café 😀 ñ"
    raw = text.encode()
    # Split inside the two-byte é and inside the four-byte emoji.
    pieces: list[str | bytes] = [raw[:4], raw[4:8], raw[8:10], raw[10:]]
    sai.script(Reply(body=pieces, chunk_delay=0.05))
    events = await _events(await proxy.post(URL, json=_stream_body(("user", "hi"))))
    contents = [e["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert "".join(contents) == text
    assert all("\ufffd" not in c for c in contents)
    assert len(contents) >= 3  # pieces were relayed, not gathered


async def test_pieces_are_relayed_as_they_arrive(make_proxy: MakeProxy, paced: PacedSai) -> None:
    proxy = await make_proxy(SAI_URL=paced.url)
    # SAI sends each piece only once the client has the one before.
    gates = [paced.gate(f"t{i} relayed") for i in range(4)]
    paced.default = Paced(("t0 ", gates[0], "t1 ", gates[1], "t2 ", gates[2], "t3 ", gates[3],
                           "t4 "))  # fmt: skip
    response = await proxy.post(URL, json=_stream_body(("user", "hi")))
    arrivals = 0
    async for line in response.content:
        if line.startswith(b"data: {") and b'"content":"t' in line:
            assert f'"content":"t{arrivals} "'.encode() in line
            if arrivals < len(gates):
                gates[arrivals].open()
            arrivals += 1
    assert arrivals == 5
    # The first piece reached the client before SAI sent the second (and so the last).
    assert paced.index("opened", "t0 relayed") < paced.index("sent", "hi", "t1 ")
    assert not any(event[0] == "gave up" for event in paced.events)


async def test_non_streaming_collects_a_dripped_answer(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=["a", "b", "c", "d"], chunk_delay=0.1))
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert (await response.json())["choices"][0]["message"]["content"] == "abcd"


async def test_keepalive_pings_while_waiting(make_proxy: MakeProxy, paced: PacedSai) -> None:
    proxy = await make_proxy(SAI_URL=paced.url, PING_INTERVAL="0.2")
    pinged = paced.gate("three pings")  # SAI answers once the client has had three
    paced.default = Paced((pinged, "late answer"))
    response = await proxy.post(URL, json=_stream_body(("user", "hi")))
    head = await _read_until_pings(response, 3)
    pinged.open()
    frames = _frames(head + await response.read())
    pings = [f for f in frames if f == b": ping"]
    assert len(pings) >= 3
    first_data = next(i for i, f in enumerate(frames) if f.startswith(b"data:"))
    assert all(f == b": ping" for f in frames[:first_data])
    assert (
        "".join(
            e["choices"][0]["delta"].get("content", "") for e in _data(frames)[:-1] if e["choices"]
        )
        == "late answer"
    )


async def test_fallback_and_retries_happen_before_the_first_byte(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE)
    sai.script(Reply(status=503), Reply(status=429), Reply(body="fine"))
    events = await _events(await proxy.post(URL, json=_stream_body(("user", "hi"))))
    assert events[1]["choices"][0]["delta"]["content"] == "fine"
    assert [r.auth[0] for r in sai.received] == ["X-Api-Key", "X-Api-Key", "Cookie"]


async def test_error_before_first_byte_is_real_http_in_http_mode(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(ERROR_MODE="http")
    sai.script(Reply(status=401))
    response = await proxy.post(URL, json=_stream_body(("user", "hi")))
    assert response.status == 401
    assert response.content_type == "application/json"
    assert (await response.json())["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("reply", "finish_reason", "fragment"),
    [
        (Reply(status=401), "stop", "SAI_KEY"),
        (Reply(status=500, body="prompt is too long"), "length", "too long"),
        (Reply(status=429), "stop", "429"),
    ],
)
async def test_error_before_first_byte_in_message_mode(
    make_proxy: MakeProxy, sai: FakeSai, reply: Reply, finish_reason: str, fragment: str
) -> None:
    proxy = await make_proxy()
    sai.script(reply)
    response = await proxy.post(
        URL, json=_stream_body(("user", "hi"), stream_options={"include_usage": True})
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["X-Saiproxy-Error"] in (
        "invalid_api_key",
        "context_length_exceeded",
        "rate_limit_exceeded",
    )
    events = await _events(response)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert fragment in events[1]["choices"][0]["delta"]["content"]
    assert events[2]["choices"][0]["finish_reason"] == finish_reason
    assert events[3]["usage"]["total_tokens"] == 0
    assert events[4] == "[DONE]"


async def test_early_context_check_when_streaming(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(MAX_CONTEXT_TOKENS="10")
    events = await _events(await proxy.post(URL, json=_stream_body(("user", "x" * 100))))
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert sai.received == []


async def test_error_after_keepalive_is_in_band_in_http_mode(
    make_proxy: MakeProxy, paced: PacedSai
) -> None:
    proxy = await make_proxy(SAI_URL=paced.url, ERROR_MODE="http", PING_INTERVAL="0.1")
    pinged = paced.gate("a ping")  # SAI refuses once the client has had a keep-alive
    paced.default = Paced((pinged, "Test template usage limit exceeded"), status=429)
    response = await proxy.post(URL, json=_stream_body(("user", "hi")))
    assert response.status == 200
    head = await _read_until_pings(response, 1)
    pinged.open()
    frames = _frames(head + await response.read())
    assert frames[0] == b": ping"
    events = _data(frames)
    assert events[0]["error"]["code"] == "rate_limit_exceeded"
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize("mode", ["message", "http"])
async def test_upstream_reset_mid_stream_is_never_a_clean_stop(
    make_proxy: MakeProxy, sai: FakeSai, mode: str
) -> None:
    proxy = await make_proxy(ERROR_MODE=mode)
    sai.script(Reply(body=["first ", "second ", "never"], reset_after=2, chunk_delay=0.05))
    response = await proxy.post(URL, json=_stream_body(("user", "hi")))
    assert response.status == 200
    events = await _events(response)
    assert events[-1] == "[DONE]"
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1] if e.get("choices")]
    assert "stop" not in finishes
    contents = "".join(
        e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e.get("choices")
    )
    assert contents.startswith("first second ")
    assert "never" not in contents
    if mode == "message":
        assert finishes[-1] == "length"  # truncated, in a finish reason every client knows
        assert "broke off" in contents
    else:
        assert events[-2]["error"]["code"] == "upstream_error"
    # Nothing is retried once the client has seen content.
    assert len(sai.received) == 1


async def test_client_disconnect_cancels_upstream(make_proxy: MakeProxy, sai: FakeSai) -> None:
    count = 20
    # As many upstream connections as hang-ups: one left checked out of the
    # pool would make the requests after them wait for ever.
    proxy = await make_proxy(UPSTREAM_CONNECTIONS=str(count))
    sai.default = Reply(body=["tick "] * 200, chunk_delay=0.05)
    baseline_tasks = len(asyncio.all_tasks())

    async def one() -> None:
        response = await proxy.post(URL, json=_stream_body(("user", "hi")))
        async for line in response.content:
            if b'"content":"tick' in line:
                break
        response.close()  # hang up mid-stream

    await asyncio.gather(*(one() for _ in range(count)))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (sai.open_responses or sai.disconnects < count):
        await asyncio.sleep(0.05)
    assert len(sai.received) == count
    assert sai.open_responses == 0
    assert sai.disconnects == count
    while time.monotonic() < deadline and len(asyncio.all_tasks()) > baseline_tasks:
        await asyncio.sleep(0.05)
    assert len(asyncio.all_tasks()) <= baseline_tasks
    # No upstream connection is left checked out of the proxy's pool: a full
    # round of new calls gets through.
    sai.default = Reply(body="again")

    async def again() -> int:
        response = await proxy.post(URL, json=chat(("user", "again")))
        await response.read()
        return response.status

    async with asyncio.timeout(5):
        assert await asyncio.gather(*(again() for _ in range(count))) == [200] * count


async def test_client_disconnect_while_waiting_for_sai(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(PING_INTERVAL="0.1")
    sai.default = Reply(delay=60.0)  # cut by the hang-ups, never waited out

    async def one() -> None:
        response = await proxy.post(URL, json=_stream_body(("user", "hi")))
        await response.content.readline()  # the first ping
        response.close()

    await asyncio.gather(*(one() for _ in range(5)))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sai.disconnects < 5:
        await asyncio.sleep(0.05)
    assert sai.disconnects == 5
    assert sai.open_responses == 0


async def test_a_stream_that_stalls_past_request_timeout_ends_in_band(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    # The silence between two pieces is bounded by REQUEST_TIMEOUT (one timer per
    # answer, re-armed for what is left of the silence), not the whole answer. Each
    # silence of the flowing answer is far under it (a busy machine may stretch one
    # several times over); the stalled one never ends by itself.
    proxy = await make_proxy(REQUEST_TIMEOUT="1", MAX_RETRIES="0")
    sai.script(Reply(body=["a", "b", "c", "d", "e", "f", "late"], chunk_delay=0.2),
               Reply(body=["x", "y"], chunk_delay=60.0))  # fmt: skip
    flowing = await _events(await proxy.post(URL, json=_stream_body(("user", "hi"))))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in flowing[:-1])
    assert text == "abcdeflate"
    assert flowing[-2]["choices"][0]["finish_reason"] == "stop"

    stalled = await _events(await proxy.post(URL, json=_stream_body(("user", "hi"))))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in stalled[:-1])
    assert text.startswith("x\n\n") and "did not answer within 1 s" in text
    assert stalled[-2]["choices"][0]["finish_reason"] == "length"
    assert stalled[-1] == "[DONE]"


async def test_a_silent_stream_is_kept_alive_between_pieces(
    make_proxy: MakeProxy, paced: PacedSai
) -> None:
    # One keep-alive task serves every open stream: SAI's silence after the
    # first piece still brings pings, and only while it lasts. SAI sends its
    # second piece once the client has had two pings after the first.
    proxy = await make_proxy(SAI_URL=paced.url, PING_INTERVAL="0.1")
    pinged = paced.gate("two pings")
    paced.default = Paced(("first", pinged, "second"))
    response = await proxy.post(URL, json=_stream_body(("user", "hi")))
    head = b""
    while b'"content":"first"' not in head:
        head += await response.content.readuntil(b"\n\n")
    head += await _read_until_pings(response, 2)
    pinged.open()
    frames = _frames(head + await response.read())
    first = next(i for i, f in enumerate(frames) if b'"content":"first"' in f)
    second = next(i for i, f in enumerate(frames) if b'"content":"second"' in f)
    pings = [f for f in frames[first:second] if f == b": ping"]
    assert 2 <= len(pings) <= 7
    assert b": ping" not in frames[second:]
