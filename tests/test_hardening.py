"""Hardening: hostile upstreams, hostile clients, bounded logs, safe defaults."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from saiproxy.base.settings import load_settings
from saiproxy.cli import trace
from saiproxy.logs import LogSetup, write_failures
from saiproxy.web import malformed
from saiproxy.web.malformed import ProxyRunner
from saiproxy.web.server import serve

from . import hostile
from .conftest import ROOT, SYSTEM_KEY, FakeSai, MakeProxy, base_env, chat, log_lines
from .hostile import HostileSai

URL = "/v1/chat/completions"
HTTP = {"ERROR_MODE": "http", "MAX_RETRIES": "1"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def evil() -> AsyncIterator[HostileSai]:
    async for server in hostile.hostile_server():
        yield server


@pytest.fixture
async def elsewhere() -> AsyncIterator[HostileSai]:
    """Where a redirect points: it must never hear from the proxy."""
    async for server in hostile.hostile_server():
        yield server


async def _sse_text(response: aiohttp.ClientResponse) -> tuple[str, list[Any]]:
    """Return the streamed content and the finish reasons and error frames seen."""
    text, ends = "", []
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        frame = json.loads(line[6:])
        if "error" in frame:
            ends.append(frame["error"]["code"])
            continue
        for choice in frame["choices"]:
            text += choice["delta"].get("content") or ""
            if choice.get("finish_reason"):
                ends.append(choice["finish_reason"])
    return text, ends


# --- 1. redirects --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_upstream_redirect_is_never_followed(
    make_proxy: MakeProxy, evil: HostileSai, elsewhere: HostileSai, status: int
) -> None:
    proxy = await make_proxy(SAI_URL=evil.url, **HTTP)
    evil.script(hostile.redirect(status, f"{elsewhere.url}/api/templates/x/execute"))
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["code"] == "upstream_error" and f"HTTP {status}" in error["message"]
    assert elsewhere.received == []  # the key never left for the other host
    assert len(evil.received) == 1  # a redirect is not retried


# --- 2. undecodable header bytes ------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_undecodable_model_header_is_cleaned_and_logs_go_on(
    make_proxy: MakeProxy, evil: HostileSai, tmp_path: Path, stream: bool
) -> None:
    proxy = await make_proxy(SAI_URL=evil.url)
    evil.script(
        hostile.answer(
            b"first", headers=[("model", b"m\xff\xfe-\x01x"), ("prompttokens", b"7\xff")]
        ),
        hostile.answer(b"second", headers=[("model", "after")]),
    )
    first = await proxy.post(URL, json=chat(("user", "a"), stream=stream))
    assert first.status == 200
    if stream:
        text, ends = await _sse_text(first)
        assert (text, ends) == ("first", ["stop"])
    else:
        body = await first.json()
        assert body["model"] == "m\ufffd\ufffd- x"
        assert body["usage"]["prompt_tokens"] != 7  # not a number: estimated
    second = await proxy.post(URL, json=chat(("user", "b")))
    assert (await second.json())["model"] == "after"
    await proxy.close()  # stops the writer thread after it wrote everything queued
    finished = [json.loads(line) for line in log_lines(tmp_path) if "response finished" in line]
    assert [line["model"] for line in finished] == ["m\ufffd\ufffd- x", "after"]


def test_clean_header_value() -> None:
    from saiproxy.upstream.stream import clean_header_value

    assert clean_header_value("sai-model") == "sai-model"
    assert clean_header_value("caf\u00e9") == "caf\u00e9"
    raw = b"a\xffb\x1bc".decode("utf-8", "surrogateescape")
    assert clean_header_value(raw) == "a\ufffdb c"


class _Flaky(io.StringIO):
    """A stream whose first write fails with something that is not an OSError."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = threading.Event()

    def write(self, text: str) -> int:
        if not self.failed.is_set():
            self.failed.set()
            raise RuntimeError("boom")
        return super().write(text)


def test_log_writer_survives_any_line_and_counts_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = _Flaky()
    before = write_failures()
    setup = LogSetup(
        fmt="json", level=20, log_dir=str(tmp_path), max_bytes=10**6, backups=1, stream=stream
    )
    logger = logging.getLogger("saiproxy.test")
    setup.start()
    try:
        logger.warning("one")
        assert stream.failed.wait(10)  # the first write failed; the writer must live on
        logger.warning("bad \udcff surrogate")
        logger.warning("three")
    finally:
        setup.stop()
    assert write_failures() == before + 1
    out = stream.getvalue()
    assert "one" not in out and "surrogate" in out and "three" in out
    file_text = setup.path.read_text(encoding="utf-8") if setup.path else ""
    assert "one" in file_text and "three" in file_text and "\\udcff" in file_text
    assert capsys.readouterr().err.count("cannot write to stdout") == 1


# --- 3. bounded answers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "action", [hostile.gzip_bomb(16 * 1024 * 1024), hostile.endless(), hostile.answer(b"x" * 2**21)]
)
async def test_an_answer_past_max_answer_bytes_is_an_upstream_error(
    make_proxy: MakeProxy, evil: HostileSai, action: hostile.Action
) -> None:
    proxy = await make_proxy(SAI_URL=evil.url, MAX_ANSWER_BYTES=str(2**20), **HTTP)
    evil.script(action)
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["code"] == "upstream_error" and "MAX_ANSWER_BYTES" in error["message"]
    assert len(evil.received) == 1  # not asked again


@pytest.mark.parametrize("action", [hostile.gzip_bomb(16 * 1024 * 1024), hostile.endless()])
async def test_a_stream_past_max_answer_bytes_ends_with_the_error(
    make_proxy: MakeProxy, evil: HostileSai, action: hostile.Action
) -> None:
    limit = 256 * 1024  # an SSE frame stays below the test client's line limit
    proxy = await make_proxy(SAI_URL=evil.url, MAX_ANSWER_BYTES=str(limit))
    evil.script(action)
    response = await proxy.post(URL, json=chat(("user", "hi"), stream=True))
    text, ends = await _sse_text(response)
    assert "MAX_ANSWER_BYTES" in text
    assert len(text) < limit + 1000  # relayed up to the cap, not beyond
    assert ends and "stop" not in ends


# --- 11. resets at every phase ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fault", [hostile.reset_before_headers, hostile.reset_mid_headers, hostile.reset_mid_body]
)
async def test_resets_at_every_phase_are_retried_then_upstream_errors(
    make_proxy: MakeProxy, evil: HostileSai, fault: Any
) -> None:
    proxy = await make_proxy(SAI_URL=evil.url, **HTTP)
    evil.script(fault(), fault())
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "upstream_error"
    assert len(evil.received) == 2
    evil.script(fault())
    recovered = await proxy.post(URL, json=chat(("user", "hi")))  # one retry, then fine
    assert (await recovered.json())["choices"][0]["message"]["content"] == "Hello from SAI"


# --- 5. client-triggered 500s --------------------------------------------------------------


@pytest.mark.parametrize("key", ["uk-123\r\nX-Evil: 1", "uk-\x1b[2J", "uk-\x00"])
async def test_user_key_with_control_characters_is_a_400(
    make_proxy: MakeProxy, sai: FakeSai, key: str
) -> None:
    proxy = await make_proxy()
    body = chat(("user", "hi"), metadata={"user_api_key": key})
    response = await proxy.post(URL, json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and "control characters" in error["message"]
    assert key not in error["message"]
    assert sai.received == []


async def _raw(host: str, port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def _status_and_json(raw: bytes) -> tuple[int, dict[str, Any], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body), head


async def test_non_ascii_bearer_token_is_a_401(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(PROXY_API_KEYS="pk-one")
    assert proxy.server.host is not None and proxy.server.port is not None
    raw = await _raw(
        proxy.server.host,
        proxy.server.port,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pk-\xff\xfe\r\n"
        b"Connection: close\r\n\r\n",
    )
    status, body, _ = _status_and_json(raw)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(env: dict[str, str]) -> AsyncIterator[str]:
    """Run serve() as production does; yield its loopback URL."""
    port = free_port()
    settings = load_settings({"PORT": str(port), "SHUTDOWN_DELAY": "0", **env})
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(settings, stop=stop))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            assert not task.done(), task
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/health") as response:
                    if response.status == 200:
                        break
            await asyncio.sleep(0.05)
    try:
        yield url
    finally:
        stop.set()
        await task


def _env(sai: FakeSai, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**base_env(sai, tmp_path), "HOST": "127.0.0.1", **extra}


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE /\x01 NOPE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    ],
)
async def test_requests_aiohttp_cannot_parse_answer_in_the_openai_shape(
    sai: FakeSai, tmp_path: Path, request_bytes: bytes
) -> None:
    async with serving(_env(sai, tmp_path)) as url:
        port = int(url.rsplit(":", 1)[1])
        raw = await _raw("127.0.0.1", port, request_bytes)
    status, body, head = _status_and_json(raw)
    assert 400 <= status < 500
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "malformed_request"
    assert b"X-Request-ID" in head
    lines = [json.loads(line) for line in log_lines(tmp_path)]
    assert [line["level"] for line in lines if line["level"] in ("ERROR", "CRITICAL")] == []
    assert not any("exc_info" in line for line in lines)
    assert any(line["message"].endswith("malformed request refused") for line in lines)


async def test_the_private_aiohttp_api_malformed_py_relies_on_still_fits() -> None:
    # saiproxy/web/malformed.py is the one place aiohttp's private API is used; a
    # release that changes it must fail here, by name, not only in the test above.
    runner = ProxyRunner(web.Application())
    await runner.setup()
    try:
        assert malformed.fits(web.Server(runner.server.request_handler)), (
            "this aiohttp release changed the private API saiproxy/web/malformed.py relies on"
        )
        assert type(runner.server).__module__ == "saiproxy.web.malformed"
    finally:
        await runner.cleanup()


# --- 6. logs clients cannot forge or flood -----------------------------------------------------


FORGED = "2026-01-01 00:00:00,000 ERROR saiproxy.views FORGED"


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_client_strings_cannot_forge_or_flood_log_lines(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path, fmt: str
) -> None:
    proxy = await make_proxy(LOG_FORMAT=fmt, LOG_MAX_BYTES=str(2**20), LOG_BACKUPS="1")
    forged = await proxy.post(URL, json=chat(("user", "hi"), model=f"m\n{FORGED}\x1b[2J"))
    assert forged.status == 200
    await proxy.get(f"/nowhere%0A{FORGED.replace(' ', '%20')}%1B%5B2J")
    huge = "M" * (3 * 2**20)
    body = orjson.dumps(chat(("user", "hi"), model=huge))
    for _ in range(2):
        # A model name that long is refused (400) before anything logs it whole.
        response = await proxy.post(URL, data=io.BytesIO(body), headers=JSON)
        assert response.status == 400
    await proxy.get("/nowhere/" + "p" * 6000)  # the access line bounds the path
    await proxy.close()
    files = list((tmp_path / "logs").glob("saiproxy-*.log*"))
    assert len(files) == 1  # nothing rotated away
    lines = log_lines(tmp_path)
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert not any("\x1b" in line for line in lines)
    assert max(len(line) for line in lines) < 4000
    assert any("more chars]" in line for line in lines)


def test_trace_escapes_control_characters(tmp_path: Path) -> None:
    log = tmp_path / "saiproxy-h-1.log"
    record = {
        "time": "2026-01-01 00:00:00,000",
        "level": "INFO",
        "logger": "saiproxy.views",
        "message": f"[abcd1234] response finished\n{FORGED}\x1b[2J",
        "request_id": "abcd1234",
        "model": "m\n\x1b]0;title\x07",
    }
    log.write_text(json.dumps(record) + "\n")
    out = io.StringIO()
    assert trace.main(["abcd1234", str(log)], out=out) == 0
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("2026-01-01 00:00:00,000 ERROR") for line in text.splitlines())
    assert "\\n" in text and "\\x1b" in text


# --- 7. secrets in SAI_URL -----------------------------------------------------------------------


async def test_user_info_in_sai_url_is_used_but_never_logged(sai: FakeSai, tmp_path: Path) -> None:
    password = "pw-url-secret-93"
    env = _env(sai, tmp_path, SAI_URL=sai.url.replace("http://", f"http://op:{password}@"))
    async with (
        serving(env) as url,
        aiohttp.ClientSession() as session,
        session.post(f"{url}{URL}", json=chat(("user", "hi"))) as response,
    ):
        assert response.status == 200
    expected = "Basic " + base64.b64encode(f"op:{password}".encode()).decode()
    assert sai.received[0].headers["Authorization"] == expected
    text = "\n".join(log_lines(tmp_path))
    assert password not in text
    listening = [json.loads(line) for line in log_lines(tmp_path) if "listening" in line]
    assert listening and listening[0]["upstream"] == sai.url


# --- 9. slow clients ---------------------------------------------------------------------------


async def test_idle_keepalive_connections_are_closed(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(KEEPALIVE_TIMEOUT="0.2")
    assert proxy.server.host is not None and proxy.server.port is not None
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        # The server hangs up on its own; without a timeout it would wait an hour.
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


async def test_a_stalled_request_body_is_a_408(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(BODY_READ_TIMEOUT="0.2")
    assert proxy.server.host is not None and proxy.server.port is not None
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"messages": ['
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)  # answered, then closed
    finally:
        writer.close()
    status, body, head = _status_and_json(raw)
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert b"X-Request-ID" in head
    assert sai.received == []


# --- 10. deployment defaults ---------------------------------------------------------------------


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
async def test_listening_beyond_loopback_without_proxy_keys_warns(
    sai: FakeSai, tmp_path: Path, host: str, warned: bool
) -> None:
    async with serving(_env(sai, tmp_path, HOST=host, ALLOW_OPEN_RELAY="true")):
        pass
    warnings = [line for line in map(json.loads, log_lines(tmp_path)) if line["level"] == "WARNING"]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert "PROXY_API_KEYS" in warnings[0]["message"]


async def test_proxy_keys_silence_the_open_relay_warning(sai: FakeSai, tmp_path: Path) -> None:
    async with serving(_env(sai, tmp_path, HOST="0.0.0.0", PROXY_API_KEYS="pk-x1")):
        pass
    assert not any('"WARNING"' in line for line in log_lines(tmp_path))


def _cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saiproxy"],
        env={"PATH": "/usr/bin:/bin", "PORT": str(free_port()), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_an_unwritable_log_dir_stops_the_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = _cli(
        {
            "SAI_URL": "http://127.0.0.1:9",
            "SAI_KEY": SYSTEM_KEY,
            "SAI_TEMPLATE_ID": "t",
            "HOST": "127.0.0.1",
            "LOG_DIR": str(blocker / "logs"),
        }
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "LOG_DIR" in lines[0]


async def test_log_file_can_be_switched_off(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    proxy = await make_proxy(LOG_FILE="false")
    assert (await proxy.post(URL, json=chat(("user", "hi")))).status == 200
    await proxy.close()
    assert not (tmp_path / "logs").exists()


def test_scripts_run_listens_on_loopback_unless_told() -> None:
    script = (ROOT / "scripts" / "run").read_text()
    assert 'HOST="${HOST:-127.0.0.1}"' in script


def test_stack_requires_proxy_keys_and_runs_locked_down() -> None:
    for name in ("docker-stack.yml", "docker-compose.yml"):
        service = yaml.safe_load((ROOT / name).read_text())["services"]["saiproxy"]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert all(not str(v).startswith("/var/log:") for v in service["volumes"]), name
    stack = yaml.safe_load((ROOT / "docker-stack.yml").read_text())
    service = stack["services"]["saiproxy"]
    assert service["environment"]["PROXY_API_KEYS"] == "/run/secrets/PROXY_API_KEYS"
    assert "PROXY_API_KEYS" in service["secrets"]
    assert stack["secrets"]["PROXY_API_KEYS"] == {"external": True}


# --- the fake's own sanity: a normal answer goes through ------------------------------------------


async def test_hostile_fake_answers_normally_by_default(
    make_proxy: MakeProxy, evil: HostileSai
) -> None:
    proxy = await make_proxy(SAI_URL=evil.url)
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert (await response.json())["choices"][0]["message"]["content"] == "Hello from SAI"
    assert evil.received[0].headers["x-api-key"] == SYSTEM_KEY


async def test_message_and_content_part_counts_are_capped(make_proxy: MakeProxy) -> None:
    from saiproxy.core.conversation import MAX_CONTENT_PARTS, MAX_MESSAGES

    proxy = await make_proxy()
    many = {"messages": [{"role": "user", "content": "a"}] * (MAX_MESSAGES + 1)}
    response = await proxy.post(URL, data=orjson.dumps(many), headers=JSON)
    assert response.status == 400
    assert f"at most {MAX_MESSAGES}" in (await response.json())["error"]["message"]
    parts = [{"type": "text", "text": "a"}] * (MAX_CONTENT_PARTS + 1)
    response = await proxy.post(URL, json={"messages": [{"role": "user", "content": parts}]})
    assert response.status == 400
    assert f"at most {MAX_CONTENT_PARTS}" in (await response.json())["error"]["message"]


async def test_a_huge_body_does_not_stall_other_requests(make_proxy: MakeProxy) -> None:
    # 8 MiB of tiny messages: parsed in a thread and refused by count, while
    # health checks keep being answered.
    proxy = await make_proxy()
    huge = orjson.dumps({"messages": [{"role": "user", "content": "a"}] * 270_000})
    posts = [
        asyncio.ensure_future(proxy.post(URL, data=io.BytesIO(huge), headers=JSON))
        for _ in range(3)
    ]
    answered = 0
    while not all(post.done() for post in posts):
        assert (await proxy.get("/health")).status == 200
        answered += 1
    assert [(await post).status for post in posts] == [400, 400, 400]
    assert answered > 1


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/v1/responses", {"input": [{"role": "user", "content": "a"}] * 10_001},
         "'input' has 10001 items"),
        ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "a"}] * 10_001},
         "'messages' has 10001 messages"),
        ("/v1/messages", {"max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}] * 1_001}]},
         "1001 content blocks"),
    ],
)  # fmt: skip
async def test_every_protocol_caps_its_counts(
    make_proxy: MakeProxy, path: str, body: dict[str, Any], fragment: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.post(path, data=orjson.dumps(body), headers=JSON)
    assert response.status == 400
    assert fragment in json.dumps(await response.json())
