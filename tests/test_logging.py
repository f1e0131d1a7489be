"""Logs (docs/operations.md): every line of a request carries its ID, no secret is written."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import io
import json
import logging
import re
import time
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saiproxy.base.settings import load_settings
from saiproxy.logs import LogSetup, Masker, event, request_id_var, serialise
from saiproxy.logs.format import JsonFormatter
from saiproxy.web.app import create_app, log_setup_for

from .conftest import (
    SYSTEM_COOKIE,
    SYSTEM_KEY,
    FakeSai,
    MakeProxy,
    Reply,
    base_env,
    chat,
    log_lines,
)

URL = "/v1/chat/completions"
USER_KEY = "uk-distinctive-5e1f0a"
USER_COOKIE = "sid=uc-distinctive-77b2; Cookies=ok"
PROXY_KEY = "pk-distinctive-c3d9e8"
SECRET_PARTS = (
    USER_KEY,
    USER_COOKIE,
    "uc-distinctive-77b2",
    PROXY_KEY,
    SYSTEM_KEY,
    SYSTEM_COOKIE,
    "sys-cookie-4d8e2a6f0c",
)


async def _mixed_requests(make_proxy: MakeProxy, sai: FakeSai, **env: str) -> dict[str, str]:
    """Run success, rejected user key, 429 fallback and streaming calls at once."""
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE, PROXY_API_KEYS=PROXY_KEY, **env)
    auth = {"Authorization": f"Bearer {PROXY_KEY}"}
    sai.route("a", Reply(status=401, delay=0.05))
    sai.route("b", Reply(status=429, delay=0.05), Reply(body="fallback answer", delay=0.05))
    sai.route("c", Reply(body=["streamed ", "answer"], chunk_delay=0.05, delay=0.05))
    sai.route("d", Reply(body="plain answer", delay=0.05))
    calls: dict[str, Any] = {
        "rejected": proxy.post(
            URL, json=chat(("user", "a")), headers={**auth, "user_api_key": USER_KEY}
        ),
        "fallback": proxy.post(
            URL, json=chat(("user", "b")), headers={**auth, "user-api-key": USER_COOKIE}
        ),
        "stream": proxy.post(URL, json=chat(("user", "c"), stream=True), headers=auth),
        "ok": proxy.post(URL, json=chat(("user", "d")), headers=auth),
        "denied": proxy.post(
            URL, json=chat(("user", "e")), headers={"Authorization": "Bearer not-the-key"}
        ),
    }
    ids: dict[str, str] = {}
    responses = await asyncio.gather(*calls.values())  # all in flight at once
    for name, response in zip(calls, responses, strict=True):
        body = await response.read()
        for secret in SECRET_PARTS:
            assert secret.encode() not in body
        ids[name] = response.headers["X-Request-ID"]
    return ids


def _story_ends(ids: dict[str, str]) -> list[str]:
    """Return the last line (its message) of each request of ``_mixed_requests``."""
    return [
        f"[{request_id}] POST /v1/chat/completions 401"
        if name == "denied"
        else f"[{request_id}] response finished"
        for name, request_id in ids.items()
    ]


async def _written(tmp_path: Path, *needles: str) -> list[str]:
    """Return the log lines once each needle is in one (the listener writes in the background)."""
    async with asyncio.timeout(10):
        while True:
            lines = log_lines(tmp_path)
            if all(any(needle in line for line in lines) for needle in needles):
                return lines
            await asyncio.sleep(0.05)


async def test_request_lines_are_tagged_and_complete_json(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    ids = await _mixed_requests(make_proxy, sai, VERBOSE_LOGGING="true")
    lines = await _written(tmp_path, *_story_ends(ids))
    records = [json.loads(line) for line in lines]  # every line parses
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)

    for name, request_id in ids.items():
        by_field = [r for r in records if r.get("request_id") == request_id]
        by_tag = [r for r in records if f"[{request_id}]" in r["message"]]
        by_grep = [line for line in lines if f'"request_id": "{request_id}"' in line]
        assert by_field == by_tag, name
        assert len(by_grep) == len(by_field)
        for other, other_id in ids.items():
            if other != name:
                assert all(other_id not in line for line in by_grep)
        messages = [re.sub(r"^\[[^]]+\] ", "", r["message"]) for r in by_field]
        if name == "denied":
            # Refused before any handler: the access line is its story.
            assert messages == ["proxy access refused", "POST /v1/chat/completions 401"]
        else:
            assert messages[0] == "request received"
            assert messages[-1] == "response finished"
            received = next(r for r in by_field if r["message"].endswith("request received"))
            assert received["credential"] in ("user key", "user cookie", "SAI_KEY")
            assert received["length"] > 0 and received["source"]
            finished = by_field[-1]
            assert finished["attempts"] >= 1
            assert finished["upstream_status"] in (200, 401)
            assert finished["upstream_latency_ms"] >= 0
            assert finished["template"] and finished["credential"]
            # A failed attempt has a line of its own; a successful one does not.
            failed = [r for r in by_field if r["message"].endswith("upstream attempt")]
            expected = {"rejected": [401], "fallback": [429]}.get(name, [])
            assert [r["status"] for r in failed] == expected

    finished = {r["request_id"]: r for r in records if r["message"].endswith("] response finished")}
    ok = finished[ids["ok"]]
    # No token headers: ceil(1 / 4) and ceil(len("plain answer") / 4).
    assert ok["prompt_tokens"] == 1 and ok["completion_tokens"] == 3
    assert ok["finish_reason"] == "stop" and ok["latency_ms"] >= 0 and ok["ttfb_ms"] >= 0
    assert finished[ids["rejected"]]["outcome"] == "invalid_api_key"
    fallback_lines = [r for r in records if r.get("request_id") == ids["fallback"]]
    assert any("falling back" in r["message"] for r in fallback_lines)
    assert finished[ids["stream"]]["finish_reason"] == "stop"


async def test_text_format_is_tagged_too(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    ids = await _mixed_requests(make_proxy, sai, LOG_FORMAT="text")
    lines = await _written(tmp_path, *_story_ends(ids))
    assert lines and not lines[0].startswith("{")
    for name, request_id in ids.items():
        tagged = [line for line in lines if f"[{request_id}]" in line]
        fielded = [line for line in lines if f"request_id={request_id}" in line]
        assert tagged == fielded, name
        assert tagged


async def test_no_secret_reaches_any_output(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    json_ids = await _mixed_requests(make_proxy, sai, VERBOSE_LOGGING="true")
    text_ids = await _mixed_requests(make_proxy, sai, VERBOSE_LOGGING="true", LOG_FORMAT="text")
    written = "\n".join(await _written(tmp_path, *_story_ends(json_ids), *_story_ends(text_ids)))
    captured = capfd.readouterr()
    assert '"credential": "user key"' in written or "credential=user key" in written
    for output in (written, captured.out, captured.err):
        for secret in SECRET_PARTS:
            assert secret not in output


@pytest.mark.parametrize(
    "message",
    [
        "headers: {'Authorization': 'Bearer tok-abcdef123'}",
        "X-Api-Key: tok-abcdef123",
        'sent "user_api_key": "tok-abcdef123"',
        "user-api-key=tok-abcdef123",
        "Cookie: tok-abcdef123",
    ],
)
def test_mask_hides_credential_values(message: str) -> None:
    line = _logged(message, detail=message)
    assert "tok-abcdef123" not in line["message"]
    assert "tok-abcdef123" not in line["detail"]
    assert "***" in line["message"]


def test_mask_hides_configured_secrets_anywhere() -> None:
    line = _logged("oops %s", "s3cr3t-value", secrets=["s3cr3t-value"],
                   note="the key is s3cr3t-value!")  # fmt: skip
    assert line["message"] == "oops ***"
    assert line["note"] == "the key is ***!"


def _logged(
    message: str, *args: Any, secrets: list[str] | None = None, **fields: Any
) -> dict[str, Any]:
    """Return the JSON line a record becomes, logged with no event loop running."""
    stream = io.StringIO()
    setup = LogSetup(fmt="json", level=logging.INFO, log_dir=None, max_bytes=0, backups=0,
                        secrets=secrets or (), stream=stream)  # fmt: skip
    setup.start()
    logging.getLogger("saiproxy.test").info(message, *args, extra=fields)
    setup.stop()
    line: dict[str, Any] = json.loads(stream.getvalue())
    return line


async def test_rotation_keeps_bounded_files(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    proxy = await make_proxy(LOG_MAX_BYTES="4000", LOG_BACKUPS="2")
    for _ in range(40):
        response = await proxy.post(URL, json=chat(("user", "rotate me")))
    await _written(tmp_path, f"[{response.headers['X-Request-ID']}] response finished")
    files = sorted((tmp_path / "logs").iterdir())
    assert len(files) == 3  # the live file and LOG_BACKUPS rotated ones
    names = {f.name for f in files}
    base = next(n for n in names if n.endswith(".log"))
    assert names == {base, f"{base}.1", f"{base}.2"}
    for path in files:
        assert path.stat().st_size <= 4000 + 1000  # at most one line over


async def test_lines_keep_their_order_and_time_within_a_batch(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    # Lines are formatted a batch at a time; each keeps the moment it was logged.
    proxy = await make_proxy(RETRY_BACKOFF="0.001")
    sai.script(Reply(status=503), Reply(body="late answer", delay=0.03))
    response = await proxy.post(URL, json=chat(("user", "q")), headers={"X-Request-ID": "order-1"})
    assert response.status == 200
    records = [json.loads(line) for line in await _written(tmp_path, "[order-1] response finished")]
    mine = [r for r in records if r.get("request_id") == "order-1"]
    assert [r["message"] for r in mine] == [
        "[order-1] request received",
        "[order-1] upstream attempt",
        "[order-1] retrying upstream call",
        "[order-1] response finished",
    ]
    assert mine[1]["status"] == 503
    times = [
        time.mktime(time.strptime(r["time"][:19], "%Y-%m-%d %H:%M:%S")) + int(r["time"][20:]) / 1000
        for r in mine
    ]
    assert times == sorted(times)
    assert times[-1] - times[0] >= 0.025  # SAI's 30 ms delay sits between them


async def test_lines_logged_from_other_threads_are_written(tmp_path: Path) -> None:
    stream = io.StringIO()
    setup = LogSetup(
        fmt="json", level=logging.INFO, log_dir=None, max_bytes=0, backups=0, stream=stream
    )
    setup.start()  # on the running loop: batching
    log = logging.getLogger("saiproxy.test")
    request_id_var.set("thread-1")
    event(log, "on the loop", {"n": 1})
    await asyncio.to_thread(log.info, "from a worker thread", extra={"n": 2})
    event(log, "on the loop again", {"n": 3})
    await asyncio.sleep(0.01)
    setup.stop()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["message"], r["n"], r["request_id"]) for r in records] == [
        ("[thread-1] on the loop", 1, "thread-1"),
        ("[thread-1] from a worker thread", 2, "thread-1"),
        ("[thread-1] on the loop again", 3, "thread-1"),
    ]


def test_lines_logged_without_a_loop_are_written_at_once() -> None:
    stream = io.StringIO()
    setup = LogSetup(
        fmt="text", level=logging.INFO, log_dir=None, max_bytes=0, backups=0, stream=stream
    )
    setup.start()  # no running loop: every line is formatted when logged
    event(logging.getLogger("saiproxy.test"), "no loop here", {"n": 1})
    setup.stop()
    assert "INFO saiproxy.test no loop here n=1" in stream.getvalue()


async def test_lifecycle_lines_reach_other_handlers_too() -> None:
    # With another handler on the root logger, lifecycle lines go through the
    # logger as usual, so that handler sees them with their fields and request ID.
    stream = io.StringIO()
    setup = LogSetup(
        fmt="json", level=logging.INFO, log_dir=None, max_bytes=0, backups=0, stream=stream
    )
    seen: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    capture = Capture()
    setup.start()
    logging.root.addHandler(capture)
    try:
        request_id_var.set("other-1")
        event(logging.getLogger("saiproxy.test"), "request received", {"messages": 2})
        await asyncio.sleep(0.1)  # one batch
    finally:
        logging.root.removeHandler(capture)
        setup.stop()
    assert [(r.getMessage(), r.messages, r.request_id) for r in seen] == [  # type: ignore[attr-defined]
        ("[other-1] request received", 2, "other-1")
    ]
    line = json.loads(stream.getvalue())
    assert line["message"] == "[other-1] request received" and line["messages"] == 2


def test_serialised_lines_are_spaced_like_json_dumps() -> None:
    data = {
        "time": "2026-11-26 21:04:51,123",
        "message": 'quote " backslash \\ newline \n é 😀',
        "n": 3,
        "big": 2**80,  # beyond orjson: the fallback
        "x": 1.5,
        "none": None,
        "flag": True,
        "nested": {"a": [1, "b"]},
    }
    line = serialise(data)
    assert "\n" not in line and json.loads(line) == data
    flat = {key: value for key, value in data.items() if key != "nested"}
    assert serialise(flat) == json.dumps(flat, ensure_ascii=False)


def test_mask_cache_stays_bounded_and_correct() -> None:
    context = Masker(["s3cr3t-value"])
    for index in range(10_000):
        assert context.mask(f"value {index}") == f"value {index}"
    assert context.cached() <= 4096
    assert context.mask("key s3cr3t-value") == "key ***"
    assert context.mask("key s3cr3t-value") == "key ***"  # from the cache


async def test_unexpected_errors_log_a_masked_traceback(
    sai: FakeSai, tmp_path: Path, aiohttp_client: Any
) -> None:
    # A bug whose message quotes a secret: the client gets a plain 500, the
    # log gets the traceback with the secret masked. The bug is a handler of
    # the test's, served by the proxy's app behind all of its middlewares.
    settings = load_settings(base_env(sai, tmp_path))
    app = create_app(settings, log_setup=log_setup_for(settings))

    async def broken(request: web.Request) -> web.StreamResponse:
        await request.read()
        raise RuntimeError(f"bug while building the payload for {SYSTEM_KEY}")

    app.router.add_post("/v1/broken", broken)
    proxy = await aiohttp_client(app)
    response = await proxy.post(
        "/v1/broken", json=chat(("user", "q")), headers={"X-Request-ID": "bug-1"}
    )
    assert response.status == 500
    body = await response.json()
    assert body["error"]["type"] == "api_error" and SYSTEM_KEY not in str(body)
    async with asyncio.timeout(10):  # the log listener writes in the background
        while not any("unexpected error" in line for line in log_lines(tmp_path)):
            await asyncio.sleep(0.05)
    records = [json.loads(line) for line in log_lines(tmp_path)]
    failure = next(r for r in records if "unexpected error" in r["message"])
    assert failure["request_id"] == "bug-1" and failure["level"] == "ERROR"
    assert "RuntimeError: bug while building the payload for ***" in failure["exc_info"]
    assert all(SYSTEM_KEY not in json.dumps(r) for r in records)


async def test_a_batch_never_lends_a_request_id_to_other_lines() -> None:
    # The batch's timer is set by the first line of the batch, here one logged
    # inside a request; a line logged outside any request in the same batch
    # must still carry no request ID.
    stream = io.StringIO()
    setup = LogSetup(
        fmt="json", level=logging.INFO, log_dir=None, max_bytes=0, backups=0, stream=stream
    )
    setup.start()
    log = logging.getLogger("saiproxy.test")

    async def in_a_request() -> None:
        request_id_var.set("req-1")
        log.info("inside the request")

    await asyncio.create_task(in_a_request())  # a task: its own context
    log.info("outside any request")
    await asyncio.sleep(0.1)
    setup.stop()
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["message"] == "[req-1] inside the request" and inside["request_id"] == "req-1"
    assert outside["message"] == "outside any request" and "request_id" not in outside


_SCALAR_VALUES = (
    st.text()
    | st.integers()
    | st.booleans()
    | st.none()
    # The range where Python's float repr and orjson's agree (both shortest round-trip).
    | st.floats(min_value=1e-4, max_value=1e15)
)
_FIELD_VALUES = st.recursive(
    _SCALAR_VALUES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


# The names ``logger.info(..., extra=...)`` refuses: a LogRecord's own attributes.
_RECORD_NAMES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=st.dictionaries(
        st.text().filter(lambda key: key not in _RECORD_NAMES), _FIELD_VALUES, max_size=8
    ),
    message=st.text(),
    request_id=st.none() | st.text(min_size=1, max_size=8),
)
def test_lifecycle_lines_match_the_record_path_byte_for_byte(
    fields: dict[str, Any], message: str, request_id: str | None
) -> None:
    # Lifecycle lines are written by orjson when that is safe
    # (JsonFormatter._plain); they must be exactly what the generic path writes of
    # the record ``logger.info(message, extra=fields)`` makes (the request ID
    # added last, as the handler adds it, unless a field is called so).
    formatter, name, created = JsonFormatter(Masker(["sk-secret-1234"]).mask), "saiproxy.x", 1e9
    line = formatter.format_event(name, message, created, fields, request_id)
    extra = dict(fields)
    if request_id is not None and "request_id" not in extra:
        extra["request_id"] = request_id
    record = logging.getLogger(name).makeRecord(
        name, logging.INFO, "", 0, message, None, None, extra=extra
    )
    record.created = created
    assert line == formatter.format(record)
    assert "\n" not in line


class _Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class _Point:
    x: int


@pytest.mark.parametrize(
    "fields",
    [
        {"path": "/v1/chat/completions", "status": 200, "ttfb_ms": None, "ok": True},
        {"roles": {"user": 2, "system": 1}, "messages": 3},  # a small dict: written at once
        {"roles": {}, "calls": [], "tuple": (1, "a")},
        {"note": "sent Authorization: Bearer sk-secret-1234"},  # masked: field by field
        {"note": "the key is sk-secret-1234", "n": 1},
        {"note": "COOKIE=abc123456", "n": 1},
        {"note": "coo\u212aie: abc123456"},  # the Kelvin sign: re's case folding takes it as k
        {"note": "x" * 600},  # cut
        {"note": "x" * 500, "more": "y" * 30},  # each short, the line long
        {"items": list(range(70))},  # cut to 64 items
        {"items": {str(i): i for i in range(70)}},
        {"note": 'a "quoted" \\ text'},  # escaped in JSON
        {"big": 2**70, "point": _Point(1)},  # json's way, not orjson's
        {"path": "/v1/a:b", "colour": _Colour.RED},  # orjson writes "red", json "_Colour.RED"
        {"path": "/v1/a,b", "x": 1e-07, "y": 5e-05, "z": 1.5e16},  # json: 1e-07; orjson: 1e-7
        {"roles": {"user": 0.5}, "more": {"a": _Colour.RED}},
        {"latency_ms": 0.0, "nan": float("nan"), "inf": float("inf")},
        {"when": datetime(2026, 12, 7, 3, 0), "flag": IntEnum("F", "A").A},
        {"text": type("Text", (str,), {})("sub-class")},
    ],
)
def test_lifecycle_lines_written_at_once_or_field_by_field_are_the_same(
    fields: dict[str, Any],
) -> None:
    # The usual line's fields go to orjson at once (JsonFormatter._plain); anything
    # that needs masking, cutting or json's own way of writing a value must not.
    formatter = JsonFormatter(Masker(["sk-secret-1234"]).mask)
    line = formatter.format_event("saiproxy.x", "m", 1e9, fields, "ab12")
    record = logging.getLogger("saiproxy.x").makeRecord(
        "saiproxy.x", logging.INFO, "", 0, "m", None, None, extra={**fields, "request_id": "ab12"}
    )
    record.created = 1e9
    assert line == formatter.format(record)
    assert "sk-secret-1234" not in line and "abc123456" not in line
    json.loads(line)


@pytest.mark.parametrize(
    "text",
    ["Authorization: x1", "x-api-key=k2", "USER_API_KEY: k3", "Cookie: c4", "cookie value c5",
     "coo\u212aie: k6", "author\u0131zation: k7", "plain: text", "a=b", "api: nothing"],
)  # fmt: skip
def test_masking_finds_what_the_regex_alone_finds(text: str) -> None:
    # The substring check before the case-blind regex never lets a match through.
    from saiproxy.logs import mask

    expected = mask._SENSITIVE.sub(lambda m: f"{m[1]}{m[2]}{mask.MASK}", text)
    assert Masker().mask(text) == expected


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), -float("inf"), [float("nan")], {"x": float("inf")}, 2**80,
     1e-9, 1e300, "a, b: c", 'quote " and \\ backslash', "\ud800", object()],
)  # fmt: skip
def test_lifecycle_lines_stay_json_whatever_the_value(value: Any) -> None:
    def strict(line: str) -> Any:  # Python's json takes NaN and Infinity; JSON does not
        return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))

    formatter = JsonFormatter()
    line = formatter.format_event("saiproxy.exchange", "m", 1_764_000_000.0, {"v": value}, "ab12")
    parsed = strict(line)
    assert parsed["request_id"] == "ab12" and list(parsed)[-2:] == ["v", "request_id"]
    if isinstance(value, float) and value - value != 0:
        assert parsed["v"] is None  # not NaN or Infinity: those are not JSON
    assert '"v": ' in line and ", " in line
    # The same with a comma in another field (json's encoder then makes the line),
    # and as an ordinary record's field.
    fields = {"v": value, "note": "a, b"}
    assert strict(formatter.format_event("x", "m", 1.0, fields, "ab12"))["note"] == "a, b"
    record = logging.LogRecord("saiproxy.x", logging.WARNING, "", 0, "m", None, None)
    record.v = value
    assert "v" in strict(formatter.format(record))


async def test_first_byte_is_the_first_byte_of_sais_body(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    # Non-streamed as streamed: SAI's headers come at once, its first words
    # 0.4 s later; the time to first byte is the words', not the headers'.
    proxy = await make_proxy()
    for stream in (False, True):
        sai.script(Reply(body=["", "late", " words"], chunk_delay=0.4))
        response = await proxy.post(
            "/v1/chat/completions",
            json=chat(("user", "hi"), stream=stream),
            headers={"X-Request-ID": f"first-byte-{stream}"},
        )
        assert "late" in await response.text()
    await asyncio.sleep(0.3)  # the log listener writes in the background
    records = [json.loads(line) for line in log_lines(tmp_path)]
    for stream in (False, True):
        (finished,) = [
            r
            for r in records
            if r.get("request_id") == f"first-byte-{stream}"
            and r["message"].endswith("response finished")
        ]
        assert 350 <= finished["ttfb_ms"] < finished["latency_ms"], stream
