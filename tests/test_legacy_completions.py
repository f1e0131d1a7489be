"""Legacy Completions (docs/protocols.md): ``POST /v1/completions``, SDK and raw clients."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from saiproxy.base.keys import STATE
from saiproxy.protocols.completions import FILL_INSTRUCTION, FILL_MARKER

from .conftest import FakeSai, MakeProxy, Reply, log_lines, openai_url, run_node
from .paced import ABORT, PacedSai, paced_sai

URL = "/v1/completions"


@pytest.fixture
async def paced() -> AsyncIterator[PacedSai]:
    async with paced_sai() as sai:
        yield sai


def _sdk(proxy: object, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused", **options)


def _frames(raw: str) -> list[Any]:
    """Return a stream's data frames, parsed, with ``[DONE]`` kept as the string."""
    frames: list[Any] = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            frames.append(data if data == "[DONE]" else json.loads(data))
    return frames


async def _stream(proxy: Any, body: dict[str, Any]) -> tuple[Any, list[Any]]:
    response = await proxy.post(URL, json={**body, "stream": True})
    return response, _frames(await response.text())


# --- non-streamed, through the SDK


async def test_sdk_string_prompt(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=" blue.", headers={"prompttokens": "5", "completiontokens": "2"}))
    async with _sdk(proxy) as client:
        result = await client.completions.create(
            model="sai-model", prompt="The sky is", max_tokens=8, temperature=0
        )
    assert result.object == "text_completion"
    assert result.id.startswith("cmpl-")
    assert result.model == "sai-model"
    assert len(result.choices) == 1
    choice = result.choices[0]
    assert (choice.text, choice.index, choice.logprobs, choice.finish_reason) == (
        " blue.",
        0,
        None,
        "stop",
    )
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 2)
    assert result.usage.total_tokens == 7
    assert sai.received[0].json["inputs"] == {"system": "", "user": "The sky is"}


async def test_unknown_model_maps_to_default(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    async with _sdk(proxy) as client:
        result = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert result.choices[0].text == "Hello from SAI"
    assert sai.received[0].path == "/api/templates/tpl-42/execute"


async def test_sdk_list_of_prompts_runs_concurrently(
    make_proxy: MakeProxy, paced: PacedSai
) -> None:
    proxy = await make_proxy(SAI_URL=paced.url)
    # SAI answers neither slow prompt until both have reached it: asked one
    # after the other, the first would wait in vain (and the gate give up).
    both = paced.gate("both asked", after=[("arrived", "first"), ("arrived", "second")])
    paced.route("first", both, "one", headers={"prompttokens": "3"})
    paced.route("second", both, "two", headers={"prompttokens": "4"})
    paced.route("third", "three", headers={"prompttokens": "5"})
    async with _sdk(proxy) as client:
        result = await client.completions.create(
            model="sai-model", prompt=["first", "second", "third"]
        )
    assert [(c.index, c.text) for c in result.choices] == [(0, "one"), (1, "two"), (2, "three")]
    assert all(c.finish_reason == "stop" for c in result.choices)
    assert result.usage is not None
    assert result.usage.prompt_tokens == 12  # summed across prompts
    assert result.usage.completion_tokens == 1 + 1 + 2  # ceil(chars / 4) each
    assert ("gave up", "both asked") not in paced.events, "the prompts were asked one by one"
    assert paced.index("arrived", "second") < paced.index("sent", "first", "one")
    assert paced.index("arrived", "first") < paced.index("sent", "second", "two")
    assert len(paced.received) == 3
    assert len({r.headers["X-Request-ID"] for r in paced.received}) == 1


async def test_sdk_echo(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.route("Once upon", Reply(body=" a time"), Reply(body=" a time"))
    sai.route("In the", Reply(body=" beginning"))
    async with _sdk(proxy) as client:
        one = await client.completions.create(model="sai-model", prompt="Once upon", echo=True)
        several = await client.completions.create(
            model="sai-model", prompt=["Once upon", "In the"], echo=True
        )
    assert one.choices[0].text == "Once upon a time"
    assert [c.text for c in several.choices] == ["Once upon a time", "In the beginning"]


async def test_sdk_suffix_is_fill_in_the_middle(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body="    return a + b"))
    async with _sdk(proxy) as client:
        result = await client.completions.create(
            model="sai-model",
            prompt="def add(a, b):\n",
            suffix="\n\nprint(add(1, 2))\n",
            echo=True,
        )
    # The middle only, after the echoed prompt; the suffix is never echoed.
    assert result.choices[0].text == "def add(a, b):\n    return a + b"
    inputs = sai.received[0].json["inputs"]
    assert inputs["system"] == FILL_INSTRUCTION
    assert inputs["user"] == f"def add(a, b):\n{FILL_MARKER}\n\nprint(add(1, 2))\n"


async def test_sdk_stop_is_enforced(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=["1. apples\n2. pe", "ars\n3. plums"]))
    async with _sdk(proxy) as client:
        result = await client.completions.create(model="sai-model", prompt="A list:", stop=["\n3."])
    assert result.choices[0].text == "1. apples\n2. pears"
    assert result.choices[0].finish_reason == "stop"


# --- streamed


async def test_sdk_stream_with_usage(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=["Bon", "jour", " 👋"], chunk_delay=0.05))
    async with _sdk(proxy) as client:
        stream = await client.completions.create(
            model="sai-model",
            prompt="Say hi",
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage, ids = [], None, None, set()
        async for chunk in stream:
            ids.add(chunk.id)
            assert chunk.object == "text_completion"
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
    assert "".join(pieces) == "Bonjour 👋"
    assert finish == "stop"
    assert usage is not None and usage.total_tokens > 0
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")


async def test_stream_frames(proxy: Any, sai: FakeSai) -> None:
    sai.script(
        Reply(
            body=["a", "b"],
            chunk_delay=0.05,
            headers={"prompttokens": "3", "completiontokens": "2"},
        )
    )
    response, frames = await _stream(
        proxy, {"prompt": "x", "echo": True, "stream_options": {"include_usage": True}}
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert frames[-1] == "[DONE]"
    chunks = frames[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["x", "a", "b", ""]
    assert chunks[0]["choices"][0] == {
        "text": "x",
        "index": 0,
        "logprobs": None,
        "finish_reason": None,
    }
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


async def test_stream_stop_spanning_pieces(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(body=["def f():\n    pass\n\nd", "ef g():"], chunk_delay=0.02))
    _, frames = await _stream(proxy, {"prompt": "code", "stop": ["\ndef"]})
    chunks = frames[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "def f():\n    pass\n"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_several_prompts_streamed_interleave(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.route(
        "slow", Reply(body=["s1 ", "s2 ", "s3"], chunk_delay=0.15, headers={"prompttokens": "2"})
    )
    sai.route(
        "fast", Reply(body=["f1 ", "f2 ", "f3"], chunk_delay=0.05, headers={"prompttokens": "3"})
    )
    _, frames = await _stream(
        proxy,
        {"prompt": ["slow", "fast"], "echo": True, "stream_options": {"include_usage": True}},
    )
    assert frames.count("[DONE]") == 1 and frames[-1] == "[DONE]"
    usage_chunk = frames[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] == 5
    chunks = frames[:-2]
    assert all(len(c["choices"]) == 1 for c in chunks)
    order = [c["choices"][0]["index"] for c in chunks]
    # Interleaved: the fast prompt's chunks come while the slow one's are still arriving.
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)
    assert order != sorted(order)
    for index, prompt, text in ((0, "slow", "s1 s2 s3"), (1, "fast", "f1 f2 f3")):
        own = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert own[0]["text"] == prompt  # echo: the choice's first chunk is its prompt
        assert "".join(c["text"] for c in own[1:]) == text
        assert [c["finish_reason"] for c in own] == [None] * (len(own) - 1) + ["stop"]


async def test_sdk_streams_several_prompts(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.route("a", Reply(body=["A", "A"], chunk_delay=0.03))
    sai.route("b", Reply(body=["B", "B"], chunk_delay=0.02))
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    async with _sdk(proxy) as client:
        stream = await client.completions.create(model="sai-model", prompt=["a", "b"], stream=True)
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert texts == {0: "AA", 1: "BB"}
    assert finishes == {0: "stop", 1: "stop"}


async def test_continue_style_fill_in_the_middle(proxy: Any, sai: FakeSai) -> None:
    # What an IDE autocomplete plugin (Continue's tab completion) sends for a FIM model.
    sai.script(Reply(body=["total = ", "sum(values)", "\n\ndef other():"], chunk_delay=0.02))
    body = {
        "model": "sai-model",
        "prompt": "def mean(values):\n    ",
        "suffix": "\n    return total / len(values)\n",
        "max_tokens": 256,
        "temperature": 0.01,
        "top_p": 1,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "stop": ["\n\n", "\ndef ", "```"],
        "stream": True,
    }
    response = await proxy.post(URL, json=body)
    frames = _frames(await response.text())
    assert response.status == 200
    chunks = frames[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "total = sum(values)"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    inputs = sai.received[0].json["inputs"]
    assert inputs["system"] == FILL_INSTRUCTION
    assert inputs["user"] == (
        f"def mean(values):\n    {FILL_MARKER}\n    return total / len(values)\n"
    )


# --- client errors: real 400s in OpenAI's shape, both modes


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [[1, 2], [3]]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"prompt": "a", "n": 2}, "n"),
        ({"prompt": "a", "logprobs": 2}, "logprobs"),
        ({"prompt": "a", "suffix": 3}, "suffix"),
        ({"prompt": "a", "stop": [1]}, "stop"),
        ({"prompt": "a", "echo": "yes"}, "echo"),
        ({"prompt": "a", "stream": True, "stream_options": 1}, "stream_options"),
    ],
)
async def test_invalid_requests(proxy: Any, sai: FakeSai, body: dict[str, Any], param: str) -> None:
    response = await proxy.post(URL, json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert sai.received == []


async def test_token_prompt_message(proxy: Any) -> None:
    response = await proxy.post("/completions", json={"prompt": [101, 102]})
    assert response.status == 400
    assert "token IDs" in (await response.json())["error"]["message"]


async def test_sdk_logprobs_bad_request(proxy: Any) -> None:
    async with _sdk(proxy, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model="sai-model", prompt="hi", logprobs=1)
    assert "logprobs" in caught.value.message
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "logprobs"


async def test_strict_models_unknown_model(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(STRICT_MODELS="true")
    response = await proxy.post(URL, json={"model": "nope", "prompt": "hi"})
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "model_not_found"
    assert sai.received == []


# --- upstream errors: message mode (the default)


async def test_message_mode_error_is_the_text(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(status=429))
    async with _sdk(proxy, max_retries=0) as client:
        raw = await client.completions.with_raw_response.create(model="sai-model", prompt="hi")
    result = raw.parse()
    assert raw.headers["X-Saiproxy-Error"] == "rate_limit_exceeded"
    assert "usage limit" in result.choices[0].text
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None and result.usage.total_tokens == 0


async def test_message_mode_one_prompt_fails(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(MAX_RETRIES="0")
    sai.route("ok", Reply(body="fine"))
    sai.route("bad", Reply(status=500, body="boom"))
    response = await proxy.post(URL, json={"prompt": ["ok", "bad"]})
    assert response.status == 200
    assert response.headers["X-Saiproxy-Error"] == "upstream_error"
    choices = (await response.json())["choices"]
    assert choices[0]["text"] == "fine"
    assert "SAI could not answer" in choices[1]["text"]


async def test_message_mode_stream_error_before_start(proxy: Any, sai: FakeSai) -> None:
    sai.script(Reply(status=401))
    response, frames = await _stream(proxy, {"prompt": "hi"})
    assert response.status == 200
    assert response.headers["X-Saiproxy-Error"] == "invalid_api_key"
    assert "SAI rejected the SAI_KEY" in frames[0]["choices"][0]["text"]
    assert frames[-2]["choices"][0]["finish_reason"] == "stop"
    assert frames[-1] == "[DONE]"


async def test_message_mode_context_too_long(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(MAX_CONTEXT_TOKENS="10")
    response = await proxy.post(URL, json={"prompt": "x" * 100})
    choice = (await response.json())["choices"][0]
    assert choice["finish_reason"] == "length"
    assert "too long" in choice["text"]
    assert sai.received == []


async def test_message_mode_stream_breaks_off(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(MAX_RETRIES="0")
    sai.script(Reply(body=["partial ", "more"], chunk_delay=0.05, reset_after=1))
    _, frames = await _stream(proxy, {"prompt": "hi"})
    chunks = frames[:-1]
    assert chunks[0]["choices"][0]["text"] == "partial "
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert frames[-1] == "[DONE]"


# --- upstream errors: http mode


async def test_http_mode_sdk_sees_status(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(ERROR_MODE="http")
    sai.script(Reply(status=429, headers={"Retry-After": "3"}))
    async with _sdk(proxy, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.completions.create(model="sai-model", prompt="hi")
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["Retry-After"] == "3"


async def test_http_mode_stream_status_before_start(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(ERROR_MODE="http")
    sai.script(Reply(status=401))
    async with _sdk(proxy, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.completions.create(model="sai-model", prompt="hi", stream=True)


async def test_http_mode_one_failing_prompt_fails_the_request(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(ERROR_MODE="http")
    for calls, stream in enumerate((False, True), start=1):
        sai.route("slow", Reply(body="late", delay=60))
        sai.route("bad", Reply(status=401))
        response = await proxy.post(URL, json={"prompt": ["slow", "bad"], "stream": stream})
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_api_key"
        # The slow prompt's call is cancelled (SAI sees the hang-up), not waited for.
        await _settled(sai)
        assert sai.disconnects == calls
    assert sum(call.user == "slow" for call in sai.received) == 2


async def _settled(sai: FakeSai) -> None:
    """Wait until the fake SAI has no response open (its calls ended or were cut)."""
    async with asyncio.timeout(10):
        while sai.open_responses:
            await asyncio.sleep(0.02)


def _bad_breaks_off_while_ok_streams(paced: PacedSai) -> None:
    """Route "ok" to send a piece and wait (the proxy should stop it); "bad" to break off."""
    paced.route("ok", "o", paced.gate("ok held"), "k", "!")
    paced.route("bad", "partial ", paced.gate("ok began", after=[("sent", "ok", "o")]), ABORT)


async def test_http_mode_stream_breaks_off(make_proxy: MakeProxy, paced: PacedSai) -> None:
    proxy = await make_proxy(SAI_URL=paced.url, ERROR_MODE="http", MAX_RETRIES="0")
    _bad_breaks_off_while_ok_streams(paced)
    _, frames = await _stream(proxy, {"prompt": ["ok", "bad"]})
    assert frames[-1] == "[DONE]" and frames.count("[DONE]") == 1
    assert frames[-2]["error"]["code"] == "upstream_error"
    # Nothing follows the error: the other choice stopped there, unfinished.
    finishes = [c["choices"][0]["finish_reason"] for c in frames[:-2]]
    assert finishes == [None] * len(finishes)
    await paced.settled()
    assert ("cut", "ok") in paced.events


# --- logs: one received and one finished line per prompt, same request ID


async def test_logs_per_prompt(make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path) -> None:
    proxy = await make_proxy()
    response = await proxy.post(
        URL, json={"prompt": ["a", "b"]}, headers={"X-Request-ID": "legacy-42"}
    )
    assert response.status == 200
    await _finish_lines(tmp_path, "legacy-42", 2)  # the received lines are written before
    lines = [json.loads(line) for line in log_lines(tmp_path)]
    mine = [line for line in lines if line.get("request_id") == "legacy-42"]
    received = [line for line in mine if line["message"].endswith("request received")]
    finished = [line for line in mine if line["message"].endswith("response finished")]
    assert sorted(line["choice"] for line in received) == [0, 1]
    assert sorted(line["choice"] for line in finished) == [0, 1]
    assert {line["protocol"] for line in received} == {"completions"}
    assert all(line["outcome"] == "ok" for line in finished)


async def _finish_lines(tmp_path: Path, request_id: str, count: int) -> dict[int, dict[str, Any]]:
    """Return the request's finish lines by choice, once ``count`` are written."""
    async with asyncio.timeout(10):  # the log listener writes in the background
        while True:
            lines = [json.loads(line) for line in log_lines(tmp_path)]
            finished = {
                line["choice"]: line
                for line in lines
                if line.get("request_id") == request_id
                and line["message"].endswith("response finished")
            }
            if len(finished) >= count:
                return finished
            await asyncio.sleep(0.05)


async def test_logs_how_each_choice_ended(
    make_proxy: MakeProxy, paced: PacedSai, tmp_path: Path
) -> None:
    """One finish line per choice: the one that failed, and the one it stopped (``cancelled``)."""
    proxy = await make_proxy(SAI_URL=paced.url, ERROR_MODE="http", MAX_RETRIES="0")
    never = paced.gate("never")  # "slow" is answered only once the proxy stopped waiting
    paced.route("slow", never, "late")
    paced.route("bad", status=401)
    response = await proxy.post(
        URL, json={"prompt": ["slow", "bad"]}, headers={"X-Request-ID": "ended-1"}
    )
    assert response.status == 401
    # Streamed: the stream started, so the failure is in-band and the status stays 200.
    _bad_breaks_off_while_ok_streams(paced)
    response = await proxy.post(
        URL, json={"prompt": ["ok", "bad"], "stream": True}, headers={"X-Request-ID": "ended-2"}
    )
    assert response.status == 200
    await response.read()
    statuses = {
        choice: (line["status"], line["outcome"], line["finish_reason"])
        for choice, line in (await _finish_lines(tmp_path, "ended-1", 2)).items()
    }
    assert statuses == {0: (401, "cancelled", None), 1: (401, "invalid_api_key", None)}
    statuses = {
        choice: (line["status"], line["outcome"], line["finish_reason"])
        for choice, line in (await _finish_lines(tmp_path, "ended-2", 2)).items()
    }
    assert statuses == {0: (200, "cancelled", None), 1: (200, "upstream_error", "error")}


async def test_client_disconnect_cancels_every_prompt(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.route("a", Reply(body=["tick "] * 200, chunk_delay=0.05))
    sai.route("b", Reply(body=["tock "] * 200, chunk_delay=0.05))
    sai.route("c", Reply(body="never", delay=30))
    baseline_tasks = len(asyncio.all_tasks())
    response = await proxy.post(URL, json={"prompt": ["a", "b", "c"], "stream": True})
    async for line in response.content:
        if b"tock" in line:
            break
    response.close()  # hang up mid-stream
    state = proxy.app[STATE]  # type: ignore[index]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (sai.open_responses or sai.disconnects < 3):
        await asyncio.sleep(0.05)
    assert (sai.open_responses, sai.disconnects) == (0, 3)
    while time.monotonic() < deadline and len(asyncio.all_tasks()) > baseline_tasks:
        await asyncio.sleep(0.05)
    assert len(asyncio.all_tasks()) <= baseline_tasks
    assert (state.in_flight, state.open_streams) == (0, 0)


async def test_keepalive_while_every_prompt_waits(make_proxy: MakeProxy, paced: PacedSai) -> None:
    proxy = await make_proxy(SAI_URL=paced.url, PING_INTERVAL="0.2")
    # SAI answers neither prompt until the client has had three keep-alives.
    pinged = paced.gate("three pings")
    paced.route("a", pinged, "late a")
    paced.route("b", pinged, "later b")
    response = await proxy.post(URL, json={"prompt": ["a", "b"], "stream": True})
    head = b""
    while head.count(b": ping\n\n") < 3 and not pinged.is_open:
        block = await response.content.readuntil(b"\n\n")
        head += block
        if block != b": ping\n\n":
            break  # an answer (or an error) came before three pings: checked below
    pinged.open()
    raw = (head + await response.read()).decode()
    blocks = [block for block in raw.split("\n\n") if block]
    first_data = next(i for i, block in enumerate(blocks) if block.startswith("data:"))
    assert first_data >= 3 and set(blocks[:first_data]) == {": ping"}
    assert paced.index("arrived", "a") < paced.index("opened", "three pings")
    assert paced.index("arrived", "b") < paced.index("opened", "three pings")
    texts: dict[int, str] = {}
    for frame in _frames(raw)[:-1]:
        for choice in frame["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "late a", 1: "later b"}


# --- other real clients


async def test_node_openai_sdk(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.route("a", Reply(body="A!", headers={"prompttokens": "1", "completiontokens": "1"}))
    sai.route("b", Reply(body="B!", headers={"prompttokens": "2", "completiontokens": "1"}))
    sai.route("s", Reply(body=["str", "eamed"], chunk_delay=0.02))
    result = await run_node("legacy_completions.mjs", openai_url(proxy))
    assert result["texts"] == [[0, "aA!", "stop"], [1, "bB!", "stop"]]
    assert result["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert (result["streamed"], result["finish"]) == ("streamed", "stop")
    assert result["streamUsage"]["total_tokens"] > 0
    assert result["model"] == "sai-model"
    assert result["missing"] == {"status": 404, "code": "model_not_found"}


async def test_langchain_openai_llm(make_proxy: MakeProxy, sai: FakeSai) -> None:
    from langchain_openai import OpenAI

    proxy = await make_proxy()
    sai.route("Tell me a joke", Reply(body=["Why did ", "the chicken..."], chunk_delay=0.02))
    sai.route("Tell me a joke", Reply(body="Knock knock."))
    async with httpx.AsyncClient() as http:  # LangChain would leave its own unclosed
        llm = OpenAI(
            base_url=openai_url(proxy),
            api_key="unused",
            model="gpt-3.5-turbo-instruct",
            http_async_client=http,
        )
        pieces = [piece async for piece in llm.astream("Tell me a joke")]
        assert "".join(pieces) == "Why did the chicken..."
        assert await llm.ainvoke("Tell me a joke") == "Knock knock."
