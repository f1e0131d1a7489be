"""``saiproxy trace`` over replicas' log files, and the /metrics endpoint."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import pytest

from saiproxy.cli import trace

from .conftest import SYSTEM_COOKIE, FakeSai, MakeProxy, Reply, chat

URL = "/v1/chat/completions"


async def test_trace_joins_two_replicas_files(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    # Replicas are separate processes; here they run one after the other, since
    # two applications in one process would share the root logger.
    headers = {"X-Request-ID": "trace-42"}
    replica_a = await make_proxy(LOG_DIR=str(tmp_path / "a"))
    await replica_a.post(URL, json=chat(("user", "noise")))
    # The client retries one request ID on another replica after a 503.
    sai.script(Reply(status=503), Reply(status=503), Reply(status=503), Reply(status=503))
    first = await replica_a.post(URL, json=chat(("user", "q")), headers=headers)
    assert first.status == 200
    await replica_a.close()

    replica_b = await make_proxy(LOG_DIR=str(tmp_path / "b"), LOG_MAX_BYTES="1500")
    for _ in range(3):  # enough to rotate b's file
        await replica_b.post(URL, json=chat(("user", "noise")))
    sai.script(Reply(body="the answer", headers={"prompttokens": "5", "completiontokens": "2"}))
    second = await replica_b.post(URL, json=chat(("user", "q")), headers=headers)
    assert (await second.json())["choices"][0]["message"]["content"] == "the answer"
    await asyncio.sleep(0.3)

    files = sorted((tmp_path / "a").iterdir()) + sorted((tmp_path / "b").iterdir())
    assert len(files) >= 3  # b rotated
    out = io.StringIO()
    assert trace.main(["trace-42", *map(str, files)], out) == 0
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("request trace-42: ")
    events = [line for line in lines if re.match(r"  \d{4}-", line)]
    messages = [re.split(r"\s{2,}", line.strip())[-1] for line in events]
    # Replica a: four attempts and a finish with the error; then replica b's success.
    assert messages.count("upstream attempt") == 4  # the failed ones; the success is in its finish
    assert messages.count("retrying upstream call") == 3
    assert messages.count("response finished") == 2
    # Replica b's request, after replica a's whole story: received, then finished.
    assert messages[-2:] == ["request received", "response finished"]
    assert messages.index("upstream failed, no retries left") < len(messages) - 2
    assert "noise" not in text
    assert lines[-1] == (
        "summary: status 200, outcome ok, finish stop, latency "
        + re.search(r"latency ([\d.]+) ms", lines[-1]).group(1)  # type: ignore[union-attr]
        + " ms, first byte "
        + re.search(r"first byte ([\d.]+) ms", lines[-1]).group(1)  # type: ignore[union-attr]
        + " ms, prompt 5 tok, completion 2 tok, "
        + re.search(r"([\d.]+) tok/s", lines[-1]).group(1)  # type: ignore[union-attr]
        + " tok/s, model sai-model"
    )
    # Times are in order.
    stamps = [line.split()[0] + " " + line.split()[1] for line in events]
    assert stamps == sorted(stamps)


def test_trace_reports_a_missing_request(tmp_path: Path) -> None:
    log = tmp_path / "saiproxy-x-1.log"
    log.write_text('{"request_id": "other", "message": "[other] hi"}\nnot json\n')
    assert trace.main(["absent", str(log)], io.StringIO()) == 1


async def test_metrics_count_what_happened(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE, MAX_RETRIES="1")
    sai.script(Reply(status=429), Reply(body="ok"))  # fallback
    await proxy.post(URL, json=chat(("user", "a")))
    sai.script(Reply(status=503), Reply(body="ok"))  # retry
    await proxy.post(URL, json=chat(("user", "b"), stream=True))
    sai.script(Reply(status=401))
    await proxy.post(URL, json=chat(("user", "c")), headers={"user-api-key": "uk-metrics-1"})
    await proxy.post(URL, data=b"{bad")
    await proxy.get("/nope/1")
    await proxy.get("/nope/2")

    response = await proxy.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()

    def value(sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} ([\d.e+]+)$", text, re.MULTILINE)
        assert match, sample
        return float(match.group(1))

    path = "/v1/chat/completions"
    assert value(f'saiproxy_requests_total{{outcome="ok",path="{path}",status="200"}}') == 2
    assert (
        value(f'saiproxy_requests_total{{outcome="invalid_api_key",path="{path}",status="200"}}')
        == 1
    )
    assert value(f'saiproxy_requests_total{{outcome="error",path="{path}",status="400"}}') == 1
    assert value('saiproxy_requests_total{outcome="error",path="other",status="404"}') == 2
    assert value('saiproxy_upstream_attempts_total{status="200"}') == 2
    assert value('saiproxy_upstream_attempts_total{status="429"}') == 1
    assert value('saiproxy_upstream_attempts_total{status="503"}') == 1
    assert value('saiproxy_upstream_attempts_total{status="401"}') == 1
    assert value("saiproxy_credential_fallbacks_total") == 1
    assert value('saiproxy_upstream_retries_total{reason="upstream_error"}') == 1
    assert value('saiproxy_request_latency_seconds_count{stream="false"}') == 2
    assert value('saiproxy_request_latency_seconds_count{stream="true"}') == 1
    assert value('saiproxy_time_to_first_byte_seconds_count{stream="true"}') == 1
    assert value("saiproxy_in_flight_requests") == 0
    assert value("saiproxy_open_streams") == 0
    assert "uk-metrics-1" not in text


async def test_gauges_show_open_streams(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body=["a", "b", "c"], chunk_delay=0.3))
    response = await proxy.post(URL, json=chat(("user", "a"), stream=True))
    await response.content.readline()
    text = await (await proxy.get("/metrics")).text()
    assert "saiproxy_open_streams 1.0" in text
    assert "saiproxy_in_flight_requests 1.0" in text
    await response.read()


async def test_trace_finds_the_files_in_the_configured_log_dir(
    make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # log_dir set in the TOML file only: trace reads the same settings the proxy does.
    config = tmp_path / "saiproxy.toml"
    config.write_text(f'[logging]\nlog_dir = "{tmp_path / "from-toml"}"\n')
    proxy = await make_proxy(LOG_DIR=None, SAIPROXY_CONFIG=str(config))
    await proxy.post(URL, json=chat(("user", "q")), headers={"X-Request-ID": "toml-1"})
    await asyncio.sleep(0.2)
    monkeypatch.delenv("LOG_DIR", raising=False)
    monkeypatch.setenv("SAIPROXY_CONFIG", str(config))
    out = io.StringIO()
    assert trace.main(["toml-1"], out) == 0
    assert out.getvalue().startswith("request toml-1: ")
