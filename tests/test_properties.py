"""Property tests: any JSON anywhere in a request body gets a 2xx or a 4xx, never a 5xx.

A real saiproxy process serves every endpoint against a fast fake SAI (in a
thread of this process); hypothesis sends valid bodies with one part replaced
by an arbitrary JSON value, and arbitrary JSON bodies. Every answer must be a
2xx or a 4xx in the endpoint's own error shape, and the process must stay
healthy with no traceback in its output.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_cli import Proxy, free_port

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
SEEDS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": "sai-model",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "r"},
        ],
        "tools": [TOOL],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "stop": ["x"],
        "stream": False,
        "stream_options": {"include_usage": True},
        "metadata": {"user_api_key": "raspberry"},
    },
    "/v1/completions": {
        "model": "sai-model", "prompt": ["a", "b"], "suffix": "z", "echo": True,
        "stop": "x", "stream": False, "max_tokens": 5,
    },
    "/v1/responses": {
        "model": "sai-model",
        "instructions": "be brief",
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "r"},
        ],
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "text": {"format": {"type": "json_object"}},
        "stream": False,
        "store": False,
    },
    "/v1/messages": {
        "model": "sai-model",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "s"}],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "r"}]},
        ],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "stop_sequences": ["x"],
        "stream": False,
    },
    "/v1/messages/count_tokens": {
        "model": "sai-model",
        "messages": [{"role": "user", "content": "q"}],
    },
}  # fmt: skip


def _openai_shape(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _anthropic_shape(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(body, dict)
        and body.get("type") == "error"
        and isinstance(error, dict)
        and isinstance(error.get("type"), str)
        and isinstance(error.get("message"), str)
    )


def _shape(path: str) -> Callable[[Any], bool]:
    return _anthropic_shape if path.startswith("/v1/messages") else _openai_shape


STRUCTURED = json.dumps(
    {"a": "a" * 24 + "!", "b": [{"x": i} for i in range(300)], "c": 4_999, "d": {"d": {"d": 1}}}
)


SAI_CALLS: list[int] = []  # one item per call the fast SAI answered


def _fast_sai() -> tuple[str, Callable[[], None]]:
    """Start a fake SAI that answers every call at once, in a thread; return its URL and stop."""

    async def execute(request: web.Request) -> web.Response:
        SAI_CALLS.append(1)
        # Asked for JSON, it answers an object the generated schemas judge in every way.
        text = STRUCTURED if b"# Output format" in await request.read() else "ok"
        return web.Response(text=text, headers={"prompttokens": "1", "completiontokens": "1"})

    app = web.Application()
    app.router.add_post("/api/templates/{template}/execute", execute)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    port = free_port()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
            loop.run_forever()
        finally:
            loop.close()
            asyncio.set_event_loop(None)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    sai_url, stop_sai = _fast_sai()
    tmp_path: Path = tmp_path_factory.mktemp("properties")
    proxy = Proxy(tmp_path, SAI_URL=sai_url, SAI_KEY="k-prop", SAI_TEMPLATE_ID="t",
                  MAX_RETRIES="0", REQUEST_TIMEOUT="5", SCHEMA_CHECK_TIMEOUT="0.3")  # fmt: skip
    try:
        proxy.wait_ready()
        yield proxy
        assert proxy.process.poll() is None, "saiproxy died"
        output = proxy.output.read_text()
        assert "Traceback" not in output and '"level": "ERROR"' not in output, output[-3000:]
        assert proxy.stop() == 0
    finally:
        proxy.stop()  # whatever failed above, no process outlives the tests
        stop_sai()


def _post(proxy: Proxy, path: str, raw: bytes) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    try:
        connection.request("POST", path, raw, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _check(proxy: Proxy, path: str, body: Any) -> None:
    status, raw = _post(proxy, path, json.dumps(body).encode())
    assert status < 500, (status, raw[:500], body)
    if status >= 400:
        assert _shape(path)(json.loads(raw)), (status, raw[:500], body)


def _replace(value: Any, where: list[int], new: Any) -> Any:
    """Return ``value`` with the node picked by ``where`` (indexes into children) replaced."""
    if not where or not isinstance(value, (dict, list)) or not value:
        return new
    keys = list(value) if isinstance(value, dict) else list(range(len(value)))
    key = keys[where[0] % len(keys)]
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    copy[key] = _replace(value[key], where[1:], new)
    return copy


PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("path", list(SEEDS))
@PROPERTY
@given(where=st.lists(st.integers(min_value=0, max_value=50), max_size=5), new=JSON_VALUES)
def test_any_value_anywhere_in_a_valid_body(
    live: Proxy, path: str, where: list[int], new: Any
) -> None:
    _check(live, path, _replace(SEEDS[path], where, new))


@pytest.mark.parametrize("path", list(SEEDS))
@PROPERTY
@given(body=JSON_VALUES)
def test_any_json_body(live: Proxy, path: str, body: Any) -> None:
    _check(live, path, body)


@PROPERTY
@given(extra=st.dictionaries(st.sampled_from(["stream", "n", "echo", "logprobs"]), JSON_VALUES))
def test_streaming_flags_with_any_value(live: Proxy, extra: dict[str, Any]) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        _check(live, path, {**SEEDS[path], **extra})


def _nested(depth: int, leaf: Any, kinds: list[bool]) -> Any:
    value = leaf
    for level in range(depth):
        value = {"k": value} if kinds[level % len(kinds)] else [value]
    return value


DEPTHS = st.integers(min_value=60, max_value=300)  # around MAX_JSON_DEPTH (64) and far past it
BOUNDED = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("path", list(SEEDS))
@BOUNDED
@given(
    where=st.lists(st.integers(min_value=0, max_value=50), max_size=5),
    depth=DEPTHS,
    kinds=st.lists(st.booleans(), min_size=1, max_size=3),
    leaf=JSON_VALUES,
)
def test_nesting_anywhere_past_the_limit(
    live: Proxy, path: str, where: list[int], depth: int, kinds: list[bool], leaf: Any
) -> None:
    body = _replace(SEEDS[path], where, _nested(depth, leaf, kinds))
    status, raw = _post(live, path, json.dumps(body).encode())
    assert status < 500, (status, raw[:500])
    if status >= 400:
        assert _shape(path)(json.loads(raw)), raw[:500]


SUBSCHEMAS = st.sampled_from([
    {"type": "string", "pattern": "^(a+)+$"},  # backtracks: only the deadline stops it
    {"type": "string", "pattern": "[unclosed"},
    {"type": "array", "uniqueItems": True},
    {"type": "array", "uniqueItems": True, "items": {"type": "object"}},
    {"enum": list(range(5_000))},
    {"enum": [{"x": i} for i in range(2_000)]},
    {"$ref": "#"},
    {"$ref": "#/$defs/loop"},
    {"$ref": "#/$defs/missing"},
    {"$ref": "http://127.0.0.1:9/schema"},
    {"$ref": "file:///etc/passwd"},
    {"$dynamicRef": "#meta"},
    {"$ref": "other.json"},
    {"format": "regex", "type": "string"},
    {"type": "object", "additionalProperties": {"$ref": "#/$defs/loop"}},
])  # fmt: skip


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
@BOUNDED
@given(
    properties=st.dictionaries(st.sampled_from("abcd"), SUBSCHEMAS, max_size=4),
    defs=st.dictionaries(st.sampled_from(["loop", "x"]), SUBSCHEMAS, max_size=2),
    extra=st.sampled_from([{}, {"$schema": "http://127.0.0.1:9/meta"}, {"$id": "urn:x"},
                           {"uniqueItems": True}, {"required": ["a", "zz"]}]),
)  # fmt: skip
def test_hostile_output_schemas(
    live: Proxy, path: str, properties: dict[str, Any], defs: dict[str, Any], extra: Any
) -> None:
    schema = {"type": "object", "properties": properties, "$defs": defs, **extra}
    if path == "/v1/chat/completions":
        spec = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        body = {**SEEDS[path], "response_format": spec, "tools": None}
    else:
        body = {**SEEDS[path], "text": {"format": {"type": "json_schema", "name": "s",
                                                   "schema": schema}}, "tools": None}  # fmt: skip
    calls = len(SAI_CALLS)
    status, raw = _post(live, path, json.dumps(body).encode())  # answered within 20 s
    assert status < 500, (status, raw[:500])
    if status >= 400:
        assert _shape(path)(json.loads(raw)), raw[:500]
    # Two SAI calls at most (the answer, one repair), so two checks at most, each
    # ended by SCHEMA_CHECK_TIMEOUT.
    assert len(SAI_CALLS) - calls <= 2


# Every type saiproxy gives a meaning (or refuses as media): any other carries
# nothing SAI could act on and must be accepted (docs/protocols.md).
KNOWN_TYPES = frozenset(
    {"text", "input_text", "output_text", "refusal", "function", "custom", "namespace",
     "message", "function_call", "function_call_output", "custom_tool_call",
     "custom_tool_call_output", "item_reference", "additional_tools", "tool_use",
     "tool_result", "search_result", "image", "image_url", "input_image", "file",
     "input_file", "audio", "input_audio", "video", "video_url", "document",
     "container_upload"}
)  # fmt: skip
UNKNOWN_TYPES = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=24
).filter(lambda kind: kind not in KNOWN_TYPES)
EXTRA_FIELDS = st.dictionaries(
    st.text(max_size=12).filter(lambda key: key != "type"), JSON_VALUES, max_size=3
)
TEXT_USER = {"role": "user", "content": [{"type": "text", "text": "q"}]}


def _unknown_everywhere(kind: str, extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return a valid body per endpoint with an unknown-typed part, block, item and tool."""
    thing = {**extra, "type": kind}
    return {
        "/v1/chat/completions": {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}, thing]}],
            "tools": [TOOL, thing],
        },
        "/v1/responses": {
            "input": [
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "q"}, thing]},
                thing,
            ],
            "tools": [{"type": "function", "name": "f"}, thing,
                      {"type": "namespace", "name": "ns", "tools": [thing]}],
        },
        "/v1/messages": {
            "max_tokens": 5,
            "system": [{"type": "text", "text": "s"}, thing],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "q"}, thing]},
                {"role": "assistant", "content": [thing, {"type": "text", "text": "a"}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": [thing]}, thing]},
            ],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}, thing],
        },
    }  # fmt: skip


@PROPERTY
@given(kind=UNKNOWN_TYPES, extra=EXTRA_FIELDS, field=st.text(max_size=12), value=JSON_VALUES)
def test_unknown_types_and_fields_are_accepted(
    live: Proxy, kind: str, extra: dict[str, Any], field: str, value: Any
) -> None:
    for path, body in _unknown_everywhere(kind, extra).items():
        status, raw = _post(live, path, json.dumps({**body, f"x_{field}": value}).encode())
        assert status == 200, (status, raw[:500], path, kind)


def test_the_process_is_healthy_after_all_that(live: Proxy) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    finally:
        connection.close()
