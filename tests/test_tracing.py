"""OpenTelemetry traces: spans, attributes, context in and out, logs, exemplars, a dead collector.

The proxy runs as in production with the spans going to the SDK's in-memory
exporter (the real backend, Phoenix, is driven by tests/phoenix_check.py in CI).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from saiproxy.base.otel import tracing_config
from saiproxy.base.settings import SettingsError, load_settings
from saiproxy.cli import trace
from saiproxy.tracing.hooks import TRACING
from saiproxy.web.app import create_app, log_setup_for
from saiproxy.web.server import runner_options

from .conftest import (
    ROOT,
    SYSTEM_COOKIE,
    SYSTEM_KEY,
    FakeSai,
    Reply,
    base_env,
    chat,
    log_lines,
    openai_url,
)

Proxy = TestClient[web.Request, web.Application]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def traced(
    aiohttp_client: Any, sai: FakeSai, tmp_path: Path
) -> Callable[..., Awaitable[tuple[Proxy, InMemorySpanExporter]]]:
    """Start a proxy whose spans go to an in-memory exporter; keywords set variables."""

    async def factory(
        exporter: Any = None, **overrides: str | None
    ) -> tuple[Proxy, InMemorySpanExporter]:
        env = {**base_env(sai, tmp_path), "OTEL_TRACES_EXPORTER": "otlp"}
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        settings = load_settings(env)
        memory = InMemorySpanExporter()
        app = create_app(
            settings,
            log_setup=log_setup_for(settings),
            span_exporter=memory if exporter is None else exporter,
        )
        options = runner_options(settings)
        options.pop("handler_cancellation")
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(**options)
        client: Proxy = await aiohttp_client(server)
        return client, memory

    return factory


Traced = Callable[..., Awaitable[tuple[Proxy, InMemorySpanExporter]]]


async def spans_of(proxy: Proxy, memory: InMemorySpanExporter) -> list[ReadableSpan]:
    await asyncio.sleep(0)  # the finish line and the span's end run on the next loop turn
    tracing = proxy.app[TRACING]
    assert await asyncio.to_thread(tracing.flush)
    return list(memory.get_finished_spans())


def by_kind(spans: list[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in spans if span.kind is kind]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# --- configuration


def test_tracing_is_off_without_otel_variables() -> None:
    assert tracing_config({}) is None
    assert tracing_config({"OTEL_SERVICE_NAME": "x"}) is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    assert tracing_config({**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing_config({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None


def test_tracing_config_reads_the_standard_variables() -> None:
    config = tracing_config(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_SERVICE_NAME": "gateway",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=a%20b",
            "OTEL_SEMCONV_STABILITY_OPT_IN": "http,gen_ai_latest_experimental",
        }
    )
    assert config is not None
    assert config.endpoint == "http://collector:4318/v1/traces"
    assert config.service_name == "gateway"
    assert (config.sampler, config.sampler_arg) == ("parentbased_traceidratio", 0.25)
    assert config.resource_attributes == {"deployment.environment": "prod", "team": "a b"}
    assert config.latest_semconv and not config.capture_content
    traces = tracing_config({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"})
    assert traces is not None and traces.endpoint == "http://c:4318/custom"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_SAMPLER": "sometimes"},
            "OTEL_TRACES_SAMPLER",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "2",
            },
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_BSP_MAX_QUEUE_SIZE": "0"},
            "OTEL_BSP_MAX_QUEUE_SIZE",
        ),
    ],
)
def test_a_bad_otel_variable_is_named(
    sai: FakeSai, tmp_path: Path, env: dict[str, str], variable: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({**base_env(sai, tmp_path), **env})
    assert caught.value.variable == variable


def test_tracing_off_never_imports_opentelemetry(tmp_path: Path) -> None:
    """Off (the default), the proxy serves without importing OpenTelemetry at all."""
    script = (
        "import sys, asyncio\n"
        "from aiohttp.test_utils import TestServer, TestClient\n"
        "from saiproxy.web.app import create_app\n"
        "from saiproxy.upstream.fake_sai import FakeSai\n"
        "from saiproxy.base.settings import load_settings\n"
        "async def main():\n"
        "    fake = FakeSai(); sai = TestServer(fake.app, host='127.0.0.1')\n"
        "    await sai.start_server()\n"
        "    env = {'SAI_URL': str(sai.make_url('')).rstrip('/'), 'SAI_KEY': 'k' * 12,\n"
        "           'SAI_TEMPLATE_ID': 't', 'SAIPROXY_CONFIG': sys.argv[1]}\n"
        "    client = TestClient(TestServer(create_app(load_settings(env)), host='127.0.0.1'))\n"
        "    await client.start_server()\n"
        "    body = {'messages': [{'role': 'user', 'content': 'hi'}]}\n"
        "    r = await client.post('/v1/chat/completions', json=body)\n"
        "    assert r.status == 200, r.status\n"
        "    await client.close(); await sai.close()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "config" / "saiproxy.toml")],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


# --- spans


async def test_a_chat_completion_is_one_server_span_with_an_attempt_child(
    traced: Traced, sai: FakeSai, tmp_path: Path
) -> None:
    proxy, memory = await traced()
    sai.script(Reply(body="Hello there", headers={"model": "gpt-x"}))
    body = chat(("user", "hi"), model="sai-model", max_tokens=50, temperature=0.3, top_p=0.9)
    response = await proxy.post(
        "/v1/chat/completions",
        json=body,
        headers={
            "traceparent": TRACEPARENT,
            "tracestate": "vendor=1",
            "X-Request-ID": "req-otel-1",
        },
    )
    assert response.status == 200
    spans = await spans_of(proxy, memory)
    [server] = by_kind(spans, SpanKind.SERVER)
    [attempt] = by_kind(spans, SpanKind.CLIENT)
    assert server.name == "chat sai-model"
    # The client's span is the parent; the attempt is the server span's child.
    assert f"{server.context.trace_id:032x}" == CLIENT_TRACE
    assert server.parent is not None and f"{server.parent.span_id:016x}" == "b7ad6b7169203331"
    assert attempt.parent is not None and attempt.parent.span_id == server.context.span_id
    a = attrs(server)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "sai"
    assert a["gen_ai.system"] == "sai"  # the v1.36 name, until opted in to the latest
    assert a["gen_ai.request.model"] == "sai-model"
    assert a["gen_ai.response.model"] == "gpt-x"
    assert a["gen_ai.request.max_tokens"] == 50
    assert a["gen_ai.request.temperature"] == 0.3
    assert a["gen_ai.request.top_p"] == 0.9
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["http.request.method"] == "POST"
    assert a["http.route"] == "/v1/chat/completions"
    assert a["http.response.status_code"] == 200
    assert a["server.address"] == "127.0.0.1"
    assert a["saiproxy.request_id"] == "req-otel-1"
    assert a["saiproxy.client.id"] == "anonymous"
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a
    b = attrs(attempt)
    assert attempt.name == "POST"
    assert b["http.response.status_code"] == 200
    assert b["saiproxy.credential.kind"] == "key"
    assert (b["saiproxy.sai.retry"], b["saiproxy.sai.fallback"]) == (0, False)
    # SAI got the attempt's context: same trace, the attempt span as parent.
    [received] = sai.received
    assert received.headers["traceparent"] == (
        f"00-{CLIENT_TRACE}-{attempt.context.span_id:016x}-01"
    )
    assert received.headers["tracestate"] == "vendor=1"
    # No credential value anywhere in any span.
    dumped = "".join(span.to_json() for span in spans)
    assert SYSTEM_KEY not in dumped


async def test_a_stream_records_first_token_and_end_and_each_retry(
    traced: Traced, sai: FakeSai
) -> None:
    proxy, memory = await traced(OTEL_SEMCONV_STABILITY_OPT_IN="gen_ai_latest_experimental")
    sai.script(Reply(status=503), Reply(body=["Hel", "lo"], chunk_delay=0.01))
    response = await proxy.post("/v1/chat/completions", json=chat(("user", "hi"), stream=True))
    assert response.status == 200
    await response.read()
    spans = await spans_of(proxy, memory)
    [server] = by_kind(spans, SpanKind.SERVER)
    attempts = sorted(by_kind(spans, SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    assert [attrs(s)["saiproxy.sai.retry"] for s in attempts] == [0, 1]
    assert attrs(attempts[0])["error.type"] == "503"
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert attrs(attempts[1])["saiproxy.sai.body_complete"] is True
    a = attrs(server)
    assert "gen_ai.system" not in a  # opted in to the latest names only
    assert a["saiproxy.stream"] is True
    assert a["saiproxy.sai.retries"] == 1
    assert a["gen_ai.server.time_to_first_token"] > 0
    events = [event.name for event in server.events]
    assert events == ["saiproxy.stream.first_token", "saiproxy.stream.end"]
    first, end = server.events
    assert server.start_time is not None and first.timestamp >= server.start_time
    assert end.timestamp >= first.timestamp


async def test_a_fallback_attempt_names_the_credential_kind_never_its_value(
    traced: Traced, sai: FakeSai
) -> None:
    proxy, memory = await traced(SAI_COOKIE=SYSTEM_COOKIE)
    sai.script(Reply(status=429), Reply(body="ok"))
    response = await proxy.post("/v1/chat/completions", json=chat(("user", "hi")))
    assert response.status == 200
    spans = await spans_of(proxy, memory)
    attempts = sorted(by_kind(spans, SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    assert [attrs(s)["saiproxy.credential.kind"] for s in attempts] == ["key", "cookie"]
    assert [attrs(s)["saiproxy.sai.fallback"] for s in attempts] == [False, True]
    assert attrs(attempts[0])["http.response.status_code"] == 429
    dumped = "".join(span.to_json() for span in spans)
    assert SYSTEM_KEY not in dumped and "sys-cookie" not in dumped


async def test_a_failed_request_carries_error_type(traced: Traced, sai: FakeSai) -> None:
    proxy, memory = await traced(ERROR_MODE="http")
    sai.script(Reply(status=401))
    response = await proxy.post("/v1/messages", json={
        "model": "sai-model", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}],
    })  # fmt: skip
    assert response.status >= 400
    spans = await spans_of(proxy, memory)
    [server] = by_kind(spans, SpanKind.SERVER)
    a = attrs(server)
    assert a["error.type"] == "invalid_api_key"
    assert a["http.response.status_code"] == response.status
    assert server.status.status_code is StatusCode.ERROR
    assert a["gen_ai.request.max_tokens"] == 20
    [attempt] = by_kind(spans, SpanKind.CLIENT)
    assert attrs(attempt)["error.type"] == "401"


async def test_legacy_completions_is_a_text_completion(traced: Traced, sai: FakeSai) -> None:
    proxy, memory = await traced()
    response = await proxy.post("/v1/completions", json={"model": "sai-model", "prompt": "Say"})
    assert response.status == 200
    [server] = by_kind(await spans_of(proxy, memory), SpanKind.SERVER)
    assert server.name == "text_completion sai-model"
    assert attrs(server)["gen_ai.operation.name"] == "text_completion"


async def test_structured_output_check_and_repair_are_children(
    traced: Traced, sai: FakeSai
) -> None:
    # The check runs in a child process: a slow machine must not time it out.
    proxy, memory = await traced(SCHEMA_CHECK_TIMEOUT="60")
    sai.script(Reply(body="not json"), Reply(body='{"a": 1}'))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    response = await proxy.post(
        "/v1/chat/completions",
        json=chat(
            ("user", "give json"),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        ),
    )
    assert response.status == 200
    spans = await spans_of(proxy, memory)
    [server] = by_kind(spans, SpanKind.SERVER)
    internal = {span.name: span for span in by_kind(spans, SpanKind.INTERNAL)}
    assert set(internal) == {"saiproxy.output.check", "saiproxy.output.repair"}
    checks = [s for s in by_kind(spans, SpanKind.INTERNAL) if s.name == "saiproxy.output.check"]
    assert sorted(attrs(s)["saiproxy.output.valid"] for s in checks) == [False, True]
    repair = internal["saiproxy.output.repair"]
    assert repair.parent is not None and repair.parent.span_id == server.context.span_id
    assert attrs(server)["gen_ai.output.type"] == "json"
    assert len(by_kind(spans, SpanKind.CLIENT)) == 2


async def test_limits_admission_is_a_child_when_limits_are_on(traced: Traced, sai: FakeSai) -> None:
    proxy, memory = await traced(LIMITS_CLIENT_RPM="100")
    response = await proxy.post("/v1/chat/completions", json=chat(("user", "hi")))
    assert response.status == 200
    spans = await spans_of(proxy, memory)
    [server] = by_kind(spans, SpanKind.SERVER)
    [admit] = [s for s in spans if s.name == "saiproxy.limits.admit"]
    assert admit.parent is not None and admit.parent.span_id == server.context.span_id


async def test_content_is_captured_only_when_asked_and_masked(traced: Traced, sai: FakeSai) -> None:
    proxy, memory = await traced(OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true")
    sai.script(Reply(body="the answer"))
    response = await proxy.post(
        "/v1/chat/completions",
        json=chat(("system", "be brief"), ("user", f"my key is {SYSTEM_KEY}")),
    )
    assert response.status == 200
    [server] = by_kind(await spans_of(proxy, memory), SpanKind.SERVER)
    a = attrs(server)
    messages = json.loads(a["gen_ai.input.messages"])
    assert messages[-1]["role"] == "user"
    assert "***" in messages[-1]["parts"][0]["content"]
    assert SYSTEM_KEY not in a["gen_ai.input.messages"]
    assert json.loads(a["gen_ai.system_instructions"])[0]["content"] == "be brief"
    output = json.loads(a["gen_ai.output.messages"])
    assert output[0]["parts"][0]["content"] == "the answer"


async def test_unsampled_requests_pass_context_on_but_record_nothing(
    traced: Traced, sai: FakeSai
) -> None:
    proxy, memory = await traced(OTEL_TRACES_SAMPLER="always_off")
    response = await proxy.post("/v1/chat/completions", json=chat(("user", "hi")))
    assert response.status == 200
    assert await spans_of(proxy, memory) == []
    flags = sai.received[0].headers["traceparent"].rsplit("-", 1)[1]
    assert int(flags, 16) & 1 == 0  # not sampled


# --- logs, saiproxy trace, exemplars


async def test_log_lines_carry_trace_and_span_ids_and_trace_prints_the_trace_id(
    traced: Traced, sai: FakeSai, tmp_path: Path
) -> None:
    proxy, memory = await traced()
    response = await proxy.post(
        "/v1/chat/completions",
        json=chat(("user", "hi")),
        headers={"traceparent": TRACEPARENT, "X-Request-ID": "req-logs-1"},
    )
    assert response.status == 200
    [server] = by_kind(await spans_of(proxy, memory), SpanKind.SERVER)
    await proxy.close()  # flushes the log files
    lines = [json.loads(line) for line in log_lines(tmp_path) if "req-logs-1" in line]
    assert len(lines) >= 2
    for line in lines:
        assert line["trace_id"] == CLIENT_TRACE
        assert line["span_id"] == f"{server.context.span_id:016x}"
    out = io.StringIO()
    files = sorted(str(path) for path in (tmp_path / "logs").glob("saiproxy-*.log*"))
    assert trace.main(["req-logs-1", *files], out) == 0
    assert f"trace id: {CLIENT_TRACE}" in out.getvalue()


async def test_latency_exemplars_carry_the_trace_id_in_openmetrics(
    traced: Traced, sai: FakeSai
) -> None:
    proxy, memory = await traced()
    response = await proxy.post(
        "/v1/chat/completions", json=chat(("user", "hi")), headers={"traceparent": TRACEPARENT}
    )
    assert response.status == 200
    await spans_of(proxy, memory)
    scraped = await proxy.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert scraped.headers["Content-Type"].startswith("application/openmetrics-text")
    text = await scraped.text()
    assert any(
        line.startswith("saiproxy_request_latency_seconds_bucket") and CLIENT_TRACE in line
        for line in text.splitlines()
    )
    plain = await (await proxy.get("/metrics")).text()
    assert CLIENT_TRACE not in plain and "saiproxy_trace_spans_dropped 0.0" in plain


# --- a collector that is down


async def test_an_unreachable_collector_costs_requests_nothing(
    traced: Traced, sai: FakeSai, tmp_path: Path
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    dead = f"http://127.0.0.1:{_free_port()}/v1/traces"
    proxy, _ = await traced(
        exporter=OTLPSpanExporter(endpoint=dead, timeout=1),
        OTEL_BSP_MAX_QUEUE_SIZE="4",
        OTEL_BSP_SCHEDULE_DELAY="60000",
    )
    for _ in range(10):
        response = await proxy.post("/v1/chat/completions", json=chat(("user", "hi")))
        assert response.status == 200
    await asyncio.sleep(0)
    # Two spans a request (server, SAI attempt); the queue holds 4.
    assert proxy.app[TRACING].dropped() >= 16
    await asyncio.to_thread(proxy.app[TRACING].flush, 30)
    assert proxy.app[TRACING].dropped() == 20  # and the collector took none
    scraped = await (await proxy.get("/metrics")).text()
    assert "saiproxy_trace_spans_dropped 20.0" in scraped
    await proxy.close()
    lines = [json.loads(line) for line in log_lines(tmp_path)]
    warnings = [line for line in lines if line["level"] in ("WARNING", "ERROR")]
    assert len(warnings) == 1
    assert warnings[0]["message"].endswith(
        "trace spans dropped (the export queue is full: the collector is slow or unreachable); "
        "requests are not affected, saiproxy_trace_spans_dropped counts them"
    )


# --- a client's own trace


async def test_the_openai_sdk_span_is_the_parent_of_saiproxys(traced: Traced, sai: FakeSai) -> None:
    """A client that instruments its own SDK (its httpx client) sees saiproxy under its spans."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    proxy, memory = await traced()
    client_spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(client_spans))
    tracer = provider.get_tracer("client-app")
    http = httpx.AsyncClient()
    HTTPXClientInstrumentor.instrument_client(http, tracer_provider=provider)
    sdk = openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused", http_client=http)
    with tracer.start_as_current_span("ask the model") as mine:
        answer = await sdk.chat.completions.create(
            model="sai-model", messages=[{"role": "user", "content": "hi"}]
        )
    await http.aclose()
    assert answer.choices[0].message.content
    [server] = by_kind(await spans_of(proxy, memory), SpanKind.SERVER)
    # The client's tree: its own span, then the SDK's HTTP call, then saiproxy's.
    [call] = [s for s in client_spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert call.parent is not None and call.parent.span_id == mine.get_span_context().span_id
    assert server.context.trace_id == call.context.trace_id
    assert server.parent is not None and server.parent.span_id == call.context.span_id
    trace_hex = f"{call.context.trace_id:032x}"
    assert sai.received[0].headers["traceparent"].split("-")[1] == trace_hex
    assert otel_trace.get_current_span().get_span_context().is_valid is False


# --- each worker its own provider, flushed in the drain


async def test_each_worker_sends_its_spans_and_flushes_them_at_shutdown(tmp_path: Path) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from .test_cli import Proxy, http

    received: list[tuple[int, str]] = []  # (the resource's process.pid, span name)

    async def traces(request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value for a in resource_spans.resource.attributes}
            pid = resource["process.pid"].int_value
            for scope in resource_spans.scope_spans:
                received.extend((pid, span.name) for span in scope.spans)
        return web.Response(content_type="application/x-protobuf")

    sink = web.Application()
    sink.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(sink, access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    proxy = Proxy(
        tmp_path, "--demo", WORKERS="2",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_BSP_SCHEDULE_DELAY="600000",  # nothing goes out before the drain
    )  # fmt: skip
    try:
        await asyncio.to_thread(proxy.wait_ready)
        workers: set[int] = set()
        # A new connection each (the demo answers slowly, so all at once): the
        # kernel spreads them across the workers.
        answers = await asyncio.gather(*(
            asyncio.to_thread(
                http, "POST", f"{proxy.url}/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}]},
            )
            for _ in range(20)
        ))  # fmt: skip
        assert [status for status, _, _ in answers] == [200] * 20
        for _ in range(40):
            _, _, body = await asyncio.to_thread(http, "GET", f"{proxy.url}/health")
            workers.add(json.loads(body)["pid"])
        assert received == []
        assert await asyncio.to_thread(proxy.stop) == 0
        chats = [(pid, name) for pid, name in received if name.startswith("chat ")]
        assert len(chats) == 20
        assert {pid for pid, _ in chats} <= workers
        assert len({pid for pid, _ in chats}) == 2
    finally:
        proxy.stop()
        await runner.cleanup()
