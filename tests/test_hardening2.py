"""Hardening, second round: no fetch for a client, no loop stall, bounded caches and SAI calls."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from saiproxy.base.settings import load_settings
from saiproxy.core.exchange import Exchange
from saiproxy.core.fanout import respond_all
from saiproxy.core.sse import EventStream
from saiproxy.protocols.completions import ChoiceRenderer, CompletionChoices
from saiproxy.protocols.completions import parse as parse_completion
from saiproxy.web.app import create_app, log_setup_for

from . import hostile
from .conftest import (
    ROOT,
    SYSTEM_COOKIE,
    FakeSai,
    MakeProxy,
    Reply,
    base_env,
    chat,
    log_lines,
)
from .hostile import HostileSai
from .test_cli import Proxy, free_port

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def evil() -> AsyncIterator[HostileSai]:
    async for server in hostile.hostile_server():
        yield server


class Listener:
    """A loopback port, served by a thread of its own, that records every connection made to it.

    A thread, not the test's loop: a blocking fetch from the proxy (which
    shares the loop) must still be answered, so the test sees it rather than hangs.
    """

    def __init__(self) -> None:
        self.connections = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        body = b'{"type": "string"}'
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with connection:
                connection.settimeout(2)
                with contextlib.suppress(OSError):
                    connection.recv(65536)
                    connection.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + body
                    )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def _raw(body: Any) -> io.BytesIO:
    # json, not orjson: orjson writes no more than 254 levels. aiohttp warns about large bytes.
    return io.BytesIO(json.dumps(body).encode())


def _with_schema(path: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    if path == CHAT:
        return chat(
            ("user", "give me json"),
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
            **extra,
        )
    return {
        "input": "give me json",
        "text": {"format": {"type": "json_schema", "name": "s", "schema": schema}},
        **extra,
    }


# --- 1. $ref resolves inside the client's own schema only ------------------------------------


@pytest.mark.parametrize("path", [CHAT, "/v1/responses"])
@pytest.mark.parametrize("where", ["http", "file", "relative", "dynamic"])
async def test_an_external_ref_is_a_400_and_nothing_is_fetched(
    make_proxy: MakeProxy, sai: FakeSai, listener: Listener, tmp_path: Path, path: str, where: str
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"type": "string", "description": "the-file-content"}')
    ref = {
        "http": f"{listener.url}/internal",
        "file": secret.as_uri(),
        "relative": "other.json#/x",
        "dynamic": f"{listener.url}/dyn",
    }[where]
    keyword = "$dynamicRef" if where == "dynamic" else "$ref"
    schema = {"$id": f"{listener.url}/root.json", "type": "object",
              "properties": {"a": {keyword: ref}}}  # fmt: skip
    sai.script(Reply(body='{"a": 1}'), Reply(body='{"a": "x"}'))
    proxy = await make_proxy()
    response = await proxy.post(path, json=_with_schema(path, schema))
    assert response.status == 400, await response.text()
    assert ref in (await response.json())["error"]["message"]
    assert listener.connections == 0
    assert sai.received == []
    await proxy.close()
    assert not any("the-file-content" in line for line in log_lines(tmp_path))


async def test_no_request_opens_a_connection_anywhere_but_sai(
    make_proxy: MakeProxy, sai: FakeSai, listener: Listener
) -> None:
    # Every schema keyword that may name a URL, with answers that do and do not follow it.
    proxy = await make_proxy()
    schemas = [
        {"$schema": f"{listener.url}/meta", "type": "object"},
        {"$id": f"{listener.url}/s", "type": "object", "properties": {"a": {"$ref": "#/$defs/a"}},
         "$defs": {"a": {"type": "string"}}},
        {"type": "object", "properties": {"a": {"$recursiveRef": "#"}}},
        {"type": "object", "properties": {"a": {"format": "uri", "type": "string"}}},
    ]  # fmt: skip
    for schema in schemas:
        for answer in ('{"a": 1}', '{"a": "http://127.0.0.1:1/x"}'):
            sai.script(Reply(body=answer), Reply(body=answer))
            response = await proxy.post(CHAT, json=_with_schema(CHAT, schema))
            assert response.status < 500, await response.text()
    assert listener.connections == 0


async def test_a_local_ref_is_followed_to_validate_and_repair(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/word"}},
              "required": ["a"], "$defs": {"word": {"type": "string"}}}  # fmt: skip
    sai.script(Reply(body='{"a": 1}'), Reply(body='{"a": "fixed"}'))
    proxy = await make_proxy()
    response = await proxy.post(CHAT, json=_with_schema(CHAT, schema))
    assert response.status == 200
    assert (await response.json())["choices"][0]["message"]["content"] == '{"a": "fixed"}'
    assert len(sai.received) == 2
    assert "schema at a:" in sai.received[1].json["chatMessages"][-1]["content"]


# --- 2. caches are bounded by bytes, keyed by content -----------------------------------------


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _big_tool_bodies(size: int, index: int) -> list[tuple[str, dict[str, Any]]]:
    text = f"{index:06d}" + "d" * size  # each request's tool differs: no two share an entry
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    return [
        (CHAT, chat(("user", "hi"), tools=[
            {"type": "function", "function": {"name": "f", "description": text,
                                              "parameters": schema}}])),
        ("/v1/responses", {"input": "hi", "tools": [
            {"type": "function", "name": "f", "description": text, "parameters": schema}]}),
        ("/v1/messages", {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                          "tools": [{"name": "f", "description": text, "input_schema": schema}]}),
        ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "hi"}],
                                       "tools": [{"name": "f", "description": text,
                                                  "input_schema": schema}]}),
    ]  # fmt: skip


async def test_rss_stays_near_idle_after_large_tools_accepted_and_refused(
    sai: FakeSai, tmp_path: Path
) -> None:
    import aiohttp

    # 3 MB tools are answered (1.5 M tokens estimated), 6 MB ones refused as too long.
    proxy = Proxy(tmp_path, SAI_URL=sai.url, SAI_KEY="k", SAI_TEMPLATE_ID="t",
                  MAX_CONTEXT_TOKENS="2000000", LOG_LEVEL="warning")  # fmt: skip
    try:
        await asyncio.to_thread(proxy.wait_ready)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{proxy.url}{CHAT}", json=chat(("user", "hi"))) as response:
                assert response.status == 200
            await asyncio.sleep(0.5)
            idle = _rss_kb(proxy.process.pid)
            statuses = set()
            for index in range(6):
                size = 3_000_000 if index % 2 else 6_000_000
                for path, body in _big_tool_bodies(size, index):
                    raw = io.BytesIO(orjson.dumps(body))
                    async with session.post(f"{proxy.url}{path}", data=raw, headers=JSON) as r:
                        await r.read()
                        statuses.add((path, r.status, size))
            await asyncio.sleep(0.5)
            after = _rss_kb(proxy.process.pid)
        assert {s for _, s, _ in statuses} <= {200, 400}, statuses
        assert (CHAT, 200, 3_000_000) in statuses  # some were answered...
        assert after - idle < 100 * 1024, f"idle {idle} kB, after {after} kB"
    finally:
        proxy.stop()


def test_anthropic_tools_repeat_as_one_cached_value() -> None:
    from saiproxy.core.prompt import sai_payload
    from saiproxy.core.toolcache import ToolCaches
    from saiproxy.protocols import anthropic

    caches = ToolCaches()  # an application's (create_app makes one)

    def body() -> dict[str, Any]:  # a fresh parse of the same JSON every turn, as Claude Code
        return json.loads(json.dumps({
            "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": f"t{i}", "description": "d", "input_schema": {"type": "object"}}
                      for i in range(20)]}))  # fmt: skip

    first, second = anthropic.parse(body(), caches=caches), anthropic.parse(body(), caches=caches)
    assert first.tools is second.tools
    assert (
        sai_payload(first, 0, caches)[0]["inputs"]["tools"]
        is sai_payload(second, 0, caches)[0]["inputs"]["tools"]
    )


def test_the_tool_caches_hold_a_bounded_number_of_bytes() -> None:
    from saiproxy.core.prompt import sai_payload
    from saiproxy.core.toolcache import TOOL_CACHE_BYTES, ToolCaches
    from saiproxy.protocols import chat as chat_protocol

    caches = ToolCaches()  # an application's (create_app makes one)

    for index in range(40):
        text = f"{index}" + "x" * 1_000_000
        conversation, _ = chat_protocol.parse(
            chat(
                ("user", "hi"),
                tools=[{"type": "function", "function": {"name": "f", "description": text}}],
            ),
            caches,
        )
        sai_payload(conversation, 0, caches)
    # Each cache is bounded on its own.
    tools, instructions = caches.sizes()
    assert tools <= TOOL_CACHE_BYTES
    assert instructions <= TOOL_CACHE_BYTES


async def test_two_applications_share_no_tool_cache(
    sai: FakeSai, tmp_path: Path, aiohttp_client: Any
) -> None:
    from saiproxy.core.toolcache import TOOL_CACHES

    settings = load_settings(base_env(sai, tmp_path))
    first, second = create_app(settings), create_app(settings)
    client = await aiohttp_client(first)
    tools = [{"type": "function", "function": {"name": "f", "description": "d"}}]
    response = await client.post("/v1/chat/completions", json=chat(("user", "hi"), tools=tools))
    assert response.status == 200
    assert min(first[TOOL_CACHES].sizes()) > 0  # the tools and their instructions
    assert second[TOOL_CACHES].sizes() == (0, 0)


# --- 3. validating against the client's schema never stalls the loop --------------------------


async def _max_round_cpu(proxy: Any, request: asyncio.Future[Any]) -> float:
    """Probe /health until ``request`` is done; return the most CPU time one round took.

    Each round is a yield to the loop and a probe. The loop runs the proxy, the
    fake SAI and the probes on this one thread, so work that holds the loop
    shows as this thread's CPU time within one round. Unlike the wall clock,
    that time does not grow when other processes keep the machine busy. The
    objects alive before the request are frozen out of the garbage collector's
    reach meanwhile: a full collection of the test process's heap is no work
    of the proxy's.
    """
    worst, rounds = 0.0, 0
    gc.collect()
    gc.freeze()
    try:
        while not request.done():
            started = time.thread_time()
            await asyncio.sleep(0)
            assert (await proxy.get("/health")).status == 200
            worst = max(worst, time.thread_time() - started)
            rounds += 1
    finally:
        gc.unfreeze()
    assert rounds >= 1
    return worst


UNIQUE = {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}
CATASTROPHIC = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a+)+$"}}}


@pytest.mark.parametrize(
    ("schema", "answer"),
    [
        (UNIQUE, {"a": [{"i": i, "j": [i]} for i in range(3000)]}),
        (CATASTROPHIC, {"a": "a" * 24 + "!"}),
    ],
    ids=["uniqueItems", "pattern"],
)
async def test_validation_never_stalls_the_loop(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path, schema: dict[str, Any], answer: Any
) -> None:
    proxy = await make_proxy(SCHEMA_CHECK_TIMEOUT="0.5")
    await proxy.get("/health")
    sai.script(Reply(body=orjson.dumps(answer).decode()))
    request = asyncio.ensure_future(proxy.post(CHAT, json=_with_schema(CHAT, schema)))
    worst = await _max_round_cpu(proxy, request)
    assert worst < 0.1, f"the loop worked {worst * 1000:.0f} ms between two /health probes"
    response = await request
    assert response.status == 200
    assert len(sai.received) == 1  # past the deadline: answered as is, no repair
    await proxy.close()
    assert any("not validated" in line for line in log_lines(tmp_path))


@pytest.mark.parametrize("schema", [None, {"type": "object"}], ids=["json_object", "json_schema"])
async def test_a_large_structured_answer_is_judged_off_the_loop(
    make_proxy: MakeProxy, sai: FakeSai, schema: dict[str, Any] | None
) -> None:
    # A fenced 3.6 MB answer: the fence, the parse and the check take time, more than
    # the rest of its way through the proxy (which any answer that long takes).
    answer = "```json\n" + json.dumps({"a": [{"i": 1}] * 400_000}) + "\n```"
    sai.script(Reply(body=answer))
    proxy = await make_proxy()
    await proxy.post(CHAT, json=_with_schema(CHAT, {"type": "object"}))  # the checker starts
    sai.script(Reply(body=answer))
    format_ = (
        {"type": "json_object"}
        if schema is None
        else {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    )
    body = chat(("user", "json please"), response_format=format_)
    request = asyncio.ensure_future(proxy.post(CHAT, json=body))
    worst = await _max_round_cpu(proxy, request)
    assert worst < 0.1, f"the loop worked {worst * 1000:.0f} ms between two /health probes"
    response = await request
    assert (await response.json())["choices"][0]["message"]["content"].startswith('{"a": [')


async def test_an_oversized_output_schema_is_a_400(make_proxy: MakeProxy, sai: FakeSai) -> None:
    schema = {"type": "object",
              "properties": {f"p{i:05d}": {"type": "string"} for i in range(12_000)}}  # fmt: skip
    proxy = await make_proxy()
    response = await proxy.post(CHAT, data=_raw(_with_schema(CHAT, schema)), headers=JSON)
    assert response.status == 400
    assert "MAX_SCHEMA_BYTES" in (await response.json())["error"]["message"]
    assert sai.received == []


# --- 4. stop sequences ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "a"}],
                          "stop_sequences": [f"s{i}" for i in range(200_000)]},
         "at most"),
        ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "a"}],
                          "stop_sequences": ["x" * 5_000]},
         "characters"),
        (CHAT, chat(("user", "a"), stop=["x" * 2_000_000] * 4), "characters"),
        ("/v1/completions", {"prompt": "a", "stop": "y" * 5_000}, "characters"),
    ],
)  # fmt: skip
async def test_stop_sequences_are_capped_in_the_protocols_shape(
    make_proxy: MakeProxy, sai: FakeSai, path: str, body: dict[str, Any], fragment: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.post(path, data=_raw(body), headers=JSON)
    assert response.status == 400
    error = await response.json()
    if path == "/v1/messages":
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert fragment in error["error"]["message"]
    assert sai.received == []


async def test_many_stop_sequences_do_not_stall_the_loop(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    sai.script(Reply(body=["word "] * 20, chunk_delay=0.01))
    proxy = await make_proxy()
    await proxy.get("/health")
    body = {"max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "a"}],
            "stop_sequences": [f"stop-{i}" for i in range(200_000)]}  # fmt: skip
    request = asyncio.ensure_future(proxy.post("/v1/messages", data=_raw(body), headers=JSON))
    worst = await _max_round_cpu(proxy, request)
    assert worst < 0.1, f"the loop worked {worst * 1000:.0f} ms between two /health probes"
    assert (await request).status == 400


async def test_long_stops_and_long_pieces_do_not_stall_the_loop(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    from saiproxy.core.bounds import MAX_STOP_CHARS

    stops = ["a" * (MAX_STOP_CHARS - 1) + "b", "a" * (MAX_STOP_CHARS - 2) + "c"]
    pieces = ["a" * 200_000 for _ in range(10)] + ["b", " after"]
    sai.script(Reply(body=pieces))
    proxy = await make_proxy()
    request = asyncio.ensure_future(
        proxy.post("/v1/messages", json={"max_tokens": 5, "stream": True, "stop_sequences": stops,
                                         "messages": [{"role": "user", "content": "a"}]})
    )  # fmt: skip
    worst = await _max_round_cpu(proxy, request)
    text = await (await request).text()
    assert '"stop_reason":"stop_sequence"' in text
    assert worst < 0.1, f"the loop worked {worst * 1000:.0f} ms between two /health probes"


# --- 5. deep nesting --------------------------------------------------------------------------


def _deep(levels: int) -> Any:
    value: Any = "x"
    for index in range(levels):
        value = {"k": value} if index % 2 else [value]
    return value


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, chat(("user", "a"), tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"d": _deep(300)}}}}])),
        (CHAT, chat(("user", "a"), response_format={"type": "json_schema", "json_schema": {
            "name": "s", "schema": {"type": "object", "properties": {"d": _deep(300)}}}})),
        ("/v1/responses", {"input": [{"type": "message", "role": "user", "content": "a",
                                      "extra": _deep(300)}]}),
        ("/v1/responses", {"input": "a", "metadata": _deep(300)}),
        ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [_deep(300)]}]}]}),
        ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "a"}],
                          "tools": [{"name": "f", "input_schema": _deep(300)}]}),
    ],
)  # fmt: skip
async def test_nesting_beyond_the_limit_is_a_400_at_parse_time(
    make_proxy: MakeProxy, sai: FakeSai, path: str, body: dict[str, Any]
) -> None:
    proxy = await make_proxy()
    response = await proxy.post(path, data=_raw(body), headers=JSON)
    assert response.status == 400, await response.text()
    assert "MAX_JSON_DEPTH" in json.dumps(await response.json())
    assert sai.received == []


async def test_deep_arguments_in_a_chat_history_go_to_sai_as_text(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    arguments = json.dumps(_deep(300))  # a string in Chat's shape: the body itself is shallow
    proxy = await make_proxy()
    response = await proxy.post(CHAT, json={"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
         "function": {"name": "f", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"}]})  # fmt: skip
    assert response.status == 200
    assert json.dumps(arguments) in sai.received[0].json["chatMessages"][1]["content"]


def _deep_call() -> str:
    deep = "[" * 300 + "]" * 300
    return f'<tool_call>{{"name": "f", "arguments": {{"d": {deep}}}}}</tool_call>'


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("stream", [False, True])
async def test_deep_tool_arguments_from_sai_are_left_as_text(
    make_proxy: MakeProxy, sai: FakeSai, stream: bool
) -> None:
    sai.script(Reply(body=_deep_call()))
    proxy = await make_proxy()
    response = await proxy.post(CHAT, json=chat(("user", "a"), tools=TOOLS, stream=stream))
    assert response.status == 200
    raw = await asyncio.wait_for(response.text(), 10)
    assert "tool_calls" not in raw.replace('"tool_calls":null', "")
    assert "[[[" in raw


async def test_a_messages_stream_with_deep_tool_arguments_ends(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    sai.script(Reply(body=["Let me look.\n", _deep_call()]))
    proxy = await make_proxy()
    response = await proxy.post("/v1/messages", json={
        "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "a"}],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}]})  # fmt: skip
    raw = await asyncio.wait_for(response.text(), 10)
    assert raw.rstrip().endswith('data: {"type":"message_stop"}')
    assert "HTTP/1.1" not in raw


async def test_a_failure_after_the_stream_started_stays_in_band(
    sai: FakeSai, tmp_path: Path, aiohttp_client: Any
) -> None:
    settings = load_settings(base_env(sai, tmp_path))
    app = create_app(settings, log_setup=log_setup_for(settings))

    async def boom(request: web.Request) -> web.StreamResponse:
        response = EventStream()
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        raise RuntimeError("broke after the start")

    app.router.add_post("/v1/boom", boom)
    client = await aiohttp_client(app)
    response = await client.post("/v1/boom")
    assert response.status == 200
    raw = await asyncio.wait_for(response.read(), 10)
    assert raw.startswith(b"data: first\n\n")
    assert b"HTTP/1.1" not in raw and b"Internal error" not in raw


class _BrokenOnce(ChoiceRenderer):
    """A choice renderer that fails on its second piece: saiproxy failing mid-stream."""

    pieces = 0

    def text(self, piece: str) -> bytes:
        _BrokenOnce.pieces += 1
        if _BrokenOnce.pieces == 2:
            raise RuntimeError("broke after the start")
        return super().text(piece)


class _BrokenChoices(CompletionChoices):
    def choice(self, index: int) -> ChoiceRenderer:
        return _BrokenOnce(f"cmpl-{index}", 0, index=index)


@pytest.mark.parametrize("mode", ["http", "message"])
async def test_a_failure_after_a_shared_stream_started_stays_in_band(
    sai: FakeSai, tmp_path: Path, aiohttp_client: Any, mode: str
) -> None:
    # Several prompts share one stream: a failure after it started ends every
    # unfinished choice in-band, then the terminator; never a second response.
    _BrokenOnce.pieces = 0
    sai.default = Reply(body=["one ", "two ", "three"], chunk_delay=0.05)
    settings = load_settings({**base_env(sai, tmp_path), "ERROR_MODE": mode})
    app = create_app(settings, log_setup=log_setup_for(settings))

    async def broken(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        exchanges = [
            Exchange(request, body, conversation, protocol="completions")
            for conversation in parse_completion(body).conversations
        ]
        return await respond_all(
            exchanges, _BrokenChoices("cmpl-x", 0, ["", ""], include_usage=False)
        )

    app.router.add_post("/v1/broken", broken)
    client = await aiohttp_client(app)
    response = await client.post("/v1/broken", json={"prompt": ["a", "b"], "stream": True})
    assert response.status == 200
    raw = await asyncio.wait_for(response.read(), 10)
    assert b"HTTP/1.1" not in raw and b"Internal error" not in raw
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    frames = [orjson.loads(line[6:]) for line in raw.split(b"\n\n") if line.startswith(b"data: {")]
    if mode == "http":
        assert frames[-1]["error"]["code"] == "internal_error"
    else:
        finishes = [c["finish_reason"] for f in frames for c in f["choices"] if c["finish_reason"]]
        assert finishes and set(finishes) == {"length"}
        assert b"failed while relaying" in raw


# --- 6. a request's SAI calls are bounded -----------------------------------------------------


@pytest.mark.parametrize("first", [503, 429])
async def test_a_request_has_a_budget_of_sai_calls(
    make_proxy: MakeProxy, sai: FakeSai, first: int
) -> None:
    # 16 prompts, SAI fails every time: one call per prompt, then the request's budget.
    sai.default = Reply(status=503, body="down")
    if first == 429:
        sai.script(*[Reply(status=429, body="slow down")] * 16)
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE, ERROR_MODE="http")
    response = await proxy.post("/v1/completions", json={"prompt": [f"p{i}" for i in range(16)]})
    assert response.status >= 400
    assert len(sai.received) <= 16 + 4, len(sai.received)


async def test_prompts_run_with_bounded_concurrency(make_proxy: MakeProxy, sai: FakeSai) -> None:
    sai.default = Reply(body="ok", delay=0.05)
    proxy = await make_proxy(PROMPT_CONCURRENCY="3")
    request = asyncio.ensure_future(
        proxy.post("/v1/completions", json={"prompt": [f"p{i}" for i in range(12)]})
    )
    busiest = 0
    while not request.done():
        busiest = max(busiest, sai.open_responses)
        await asyncio.sleep(0.005)
    body = await (await request).json()
    assert [choice["text"] for choice in body["choices"]] == ["ok"] * 12
    assert 1 <= busiest <= 3


@pytest.mark.parametrize(
    ("body", "param"),
    [({"prompt": "a", "best_of": 2}, "best_of"), ({"prompt": "a", "best_of": "x"}, "best_of"),
     ({"prompt": "a", "n": 3}, "n")],
)  # fmt: skip
async def test_best_of_and_n_beyond_one_are_refused(
    make_proxy: MakeProxy, sai: FakeSai, body: dict[str, Any], param: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.post("/v1/completions", json=body)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == param
    assert sai.received == []
    ok = await proxy.post("/v1/completions", json={"prompt": "a", "best_of": 1})
    assert ok.status == 200


# --- 7. the 429 fallback follows AUTH_CHAIN --------------------------------------------------


async def test_the_rate_limit_fallback_follows_the_auth_chain(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    sai.script(Reply(status=429, body="slow down"))
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE, AUTH_CHAIN="header", ERROR_MODE="http")
    response = await proxy.post(CHAT, json=chat(("user", "a")), headers={"user_api_key": "uk-1"})
    assert response.status == 429
    assert [call.auth for call in sai.received] == [("X-Api-Key", "uk-1")]


async def test_the_rate_limit_fallback_still_reaches_a_chained_cookie(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    sai.script(Reply(status=429, body="slow down"))
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE, AUTH_CHAIN="header,system_cookie")
    response = await proxy.post(CHAT, json=chat(("user", "a")), headers={"user_api_key": "uk-1"})
    assert response.status == 200
    assert [call.auth for call in sai.received] == [
        ("X-Api-Key", "uk-1"), ("Cookie", SYSTEM_COOKIE)]  # fmt: skip


# --- 8. one log line for many unrecognised tool blocks ------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_unrecognised_tool_blocks_are_one_line_with_a_count(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path, stream: bool
) -> None:
    sai.script(Reply(body="".join('<tool_call>{"name": "nope"}</tool_call>' for _ in range(500))))
    proxy = await make_proxy()
    response = await proxy.post(CHAT, json=chat(("user", "a"), tools=TOOLS, stream=stream))
    assert response.status == 200
    await response.read()
    await proxy.close()
    lines = [json.loads(line) for line in log_lines(tmp_path) if "not recognised" in line]
    assert len(lines) == 1, len(lines)
    assert lines[0]["count"] == 500


# --- 9. saiproxy trace reads regular files, bounded lines, any level ------------------------------


def _trace(*args: str) -> subprocess.CompletedProcess[str]:
    def limit() -> None:  # a runaway read fails here rather than filling the machine
        resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))

    return subprocess.run(
        [sys.executable, "-m", "saiproxy", "trace", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT, capture_output=True, text=True, timeout=20, preexec_fn=limit,
    )  # fmt: skip


def test_trace_skips_bad_lines_and_reads_regular_files_only(tmp_path: Path) -> None:
    good = tmp_path / "saiproxy-1.log"
    lines = [
        {"time": "2026-01-01T00:00:00.000Z", "level": {"x": 1}, "message": "odd level",
         "request_id": "abc"},
        {"time": "2026-01-01T00:00:00.100Z", "level": ["WARNING"], "logger": 7,
         "message": {"m": 1}, "request_id": "abc"},
        {"time": "2026-01-01T00:00:00.200Z", "level": "INFO", "message": "fine",
         "request_id": "abc"},
    ]  # fmt: skip
    huge = '{"request_id": "abc", "message": "' + "z" * 3_000_000 + '"}'
    good.write_text("\n".join([*map(json.dumps, lines), huge, "not json abc"]) + "\n")
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    result = _trace("abc", "/dev/zero", str(fifo), str(good))
    assert result.returncode == 0, result.stderr
    assert "fine" in result.stdout and "odd level" in result.stdout
    assert "zzzz" not in result.stdout
    assert "not a regular file" in result.stderr


# --- 10. no open relay beyond loopback unless asked for -------------------------------------------


def _start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saiproxy"],
        env={"PATH": "/usr/bin:/bin", "PORT": str(free_port()), "SAI_URL": "http://127.0.0.1:9",
             "SAI_KEY": "k", "SAI_TEMPLATE_ID": "t", "LOG_FILE": "false", **env},
        cwd=ROOT, capture_output=True, text=True, timeout=20,
    )  # fmt: skip


def test_an_open_relay_beyond_loopback_stops_the_start() -> None:
    result = _start({"HOST": "0.0.0.0"})
    assert result.returncode == 2
    assert "ALLOW_OPEN_RELAY" in result.stderr and "PROXY_API_KEYS" in result.stderr


def test_compose_and_stack_settle_the_open_relay_question() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["saiproxy"]
    # Published on the host's loopback only, so the container's 0.0.0.0 is allowed to be open.
    assert all(str(port).startswith("127.0.0.1:") for port in compose["ports"])
    assert compose["environment"]["ALLOW_OPEN_RELAY"] == "${ALLOW_OPEN_RELAY:-true}"
    stack = yaml.safe_load((ROOT / "docker-stack.yml").read_text())["services"]["saiproxy"]
    assert "ALLOW_OPEN_RELAY" not in stack.get("environment", {})


# --- a NUL byte in a SAI header is an upstream error, not a reason to retry ---------------------


async def test_a_nul_byte_in_a_sai_header_is_not_retried(
    make_proxy: MakeProxy, evil: HostileSai
) -> None:
    evil.script(*[hostile.answer(b"x", headers=[("model", b"a\x00b")])] * 4)
    proxy = await make_proxy(SAI_URL=evil.url, ERROR_MODE="http", MAX_RETRIES="3")
    response = await proxy.post(CHAT, json=chat(("user", "a")))
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "upstream_error"
    assert len(evil.received) == 1
