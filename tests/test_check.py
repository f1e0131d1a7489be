"""``saiproxy check`` against a real fake SAI: passes, rejections, limits, no route, no secrets."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from saiproxy.base.settings import load_settings
from saiproxy.cli.check import run_probes

from .conftest import ROOT, SYSTEM_COOKIE, SYSTEM_KEY, TEMPLATE, FakeSai, Reply

TWO_MODELS = """
default_model = "sai-model"

[models.sai-model]
template_id = ""

[models.big]
template_id = "tpl-big"
model_override = "gpt-big"
"""

SECRETS = (SYSTEM_KEY, SYSTEM_COOKIE, "proxy-key-9b2e")


def check_env(sai: FakeSai, tmp_path: Path, **overrides: str) -> dict[str, str]:
    """Return a clean environment (nothing inherited from SAI_*) for a check of the fake."""
    config = tmp_path / "saiproxy.toml"
    config.write_text(TWO_MODELS, encoding="utf-8")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SAI_", "PROXY_"))}
    return {
        **clean,
        "SAI_URL": sai.url,
        "SAI_KEY": SYSTEM_KEY,
        "SAI_COOKIE": SYSTEM_COOKIE,
        "SAI_TEMPLATE_ID": TEMPLATE,
        "SAIPROXY_CONFIG": str(config),
        "PROXY_API_KEYS": "proxy-key-9b2e",
        **overrides,
    }


async def run_check(
    env: dict[str, str], *args: str, command: list[str] | None = None
) -> tuple[int, str, str]:
    """Run the check as a process while the fake SAI keeps serving in this loop."""
    command = command or [sys.executable, "-m", "saiproxy", "check"]
    process = await asyncio.create_subprocess_exec(
        *command,
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
        assert "sys-cookie" not in text and "sys-key" not in text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_every_credential_and_model_passes(sai: FakeSai, tmp_path: Path) -> None:
    sai.default = Reply(body="OK", headers={"model": "gpt-sai"})
    status, out, err = await run_check(check_env(sai, tmp_path))
    assert status == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith("saiproxy check ")
    assert f"SAI {sai.url}, 2 model(s), credentials SAI_KEY, SAI_COOKIE" in lines[0]
    probes = lines[1:5]
    assert [line.split()[:2] for line in probes] == [
        ["PASS", "SAI_KEY"],
        ["PASS", "SAI_KEY"],
        ["PASS", "SAI_COOKIE"],
        ["PASS", "SAI_COOKIE"],
    ]
    assert "model sai-model  template tpl-42  HTTP 200" in probes[0]
    assert "model big  template tpl-big  HTTP 200" in probes[1]
    assert "(SAI model gpt-sai)" in probes[0]
    assert lines[5] == "summary: 4 of 4 probes passed, all passed"
    assert err == ""
    assert_no_secret(out, err)
    # One call per probe, each with exactly its own credential, to each model's template.
    assert [(r.path, r.auth) for r in sai.received] == [
        ("/api/templates/tpl-42/execute", ("X-Api-Key", SYSTEM_KEY)),
        ("/api/templates/tpl-big/execute", ("X-Api-Key", SYSTEM_KEY)),
        ("/api/templates/tpl-42/execute", ("Cookie", SYSTEM_COOKIE)),
        ("/api/templates/tpl-big/execute", ("Cookie", SYSTEM_COOKIE)),
    ]
    assert sai.received[1].query == {"modelOverride": "gpt-big"}
    body = sai.received[0].json
    assert body["inputs"]["system"] == ""
    assert body["chatMessages"][0]["role"] == "user"
    assert all(r.headers["X-Request-ID"].startswith("check-") for r in sai.received)


async def test_a_rejected_cookie_fails_with_advice(sai: FakeSai, tmp_path: Path) -> None:
    sai.script(Reply(), Reply(), Reply(status=401, body="expired"), Reply(status=401))
    status, out, err = await run_check(check_env(sai, tmp_path))
    assert status == 1
    lines = out.splitlines()
    assert lines[1].startswith("PASS  SAI_KEY")
    failed = lines[3]
    assert failed.startswith("FAIL  SAI_COOKIE")
    assert "HTTP 401" in failed
    assert "SAI rejected SAI_COOKIE: put a current value in SAI_COOKIE" in failed
    assert lines[-1] == "summary: 2 of 4 probes passed, 2 failed"
    assert err == ""
    assert_no_secret(out, err)


async def test_rate_limit_is_reported_without_falling_back(sai: FakeSai, tmp_path: Path) -> None:
    sai.script(Reply(status=429, body="Test template usage limit exceeded"))
    status, out, _ = await run_check(check_env(sai, tmp_path))
    assert status == 1
    failed = out.splitlines()[1]
    assert failed.startswith("FAIL  SAI_KEY") and "HTTP 429" in failed
    assert "rate limited" in failed and "fall back to SAI_COOKIE" in failed
    # The 429 was not retried with the cookie: each probe made exactly one call.
    assert len(sai.received) == 4
    assert sai.received[0].auth[0] == "X-Api-Key"
    assert sai.received[1].auth[0] == "X-Api-Key"


async def test_cookie_only_rate_limit_says_no_fallback(sai: FakeSai, tmp_path: Path) -> None:
    sai.default = Reply(status=429)
    env = check_env(sai, tmp_path)
    del env["SAI_KEY"]
    status, out, _ = await run_check(env)
    assert status == 1
    assert "credentials SAI_COOKIE" in out.splitlines()[0]
    assert "no fallback is left" in out.splitlines()[1]


async def test_connection_refused(sai: FakeSai, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    status, out, err = await run_check(check_env(sai, tmp_path, SAI_URL=url), "--json")
    assert status == 1, err
    report = json.loads(out)
    assert report["ok"] is False
    assert {p["status"] for p in report["probes"]} == {"connection_error"}
    assert {p["outcome"] for p in report["probes"]} == {"upstream_error"}
    assert f"cannot connect to {url}" in report["probes"][0]["advice"]
    assert sai.received == []


async def test_json_report(sai: FakeSai, tmp_path: Path) -> None:
    sai.script(Reply(body="OK", headers={"model": "gpt-sai"}), Reply(status=404))
    env = check_env(sai, tmp_path)
    del env["SAI_COOKIE"]
    status, out, err = await run_check(env, "--json")
    assert status == 1
    assert err == ""
    report = json.loads(out)  # the whole output is one JSON document
    assert report["ok"] is False
    assert report["sai_url"] == sai.url
    assert report["models"] == ["sai-model", "big"]
    assert report["credentials"] == ["SAI_KEY"]
    assert report["summary"] == {"probes": 2, "passed": 1, "failed": 1}
    first, second = report["probes"]
    assert first["ok"] is True
    assert first["credential"] == "SAI_KEY"
    assert first["model"] == "sai-model"
    assert first["template"] == TEMPLATE
    assert first["status"] == 200
    assert first["outcome"] == "ok"
    assert first["upstream_model"] == "gpt-sai"
    assert first["answer_chars"] == 2
    assert isinstance(first["latency_ms"], float)
    assert second["status"] == 404
    assert "SAI knows no template 'tpl-big'" in second["advice"]
    assert_no_secret(out)


async def test_configuration_error_exits_2_with_one_line(sai: FakeSai, tmp_path: Path) -> None:
    env = check_env(sai, tmp_path, SAI_URL="ftp://nowhere")
    status, out, err = await run_check(env)
    assert status == 2
    assert out == ""
    assert err.splitlines() == [
        "saiproxy: configuration error: SAI_URL: must be an http:// or https:// URL with a host"
    ]
    env = check_env(sai, tmp_path, AUTH_CHAIN="system_key,bearer")
    status, _, err = await run_check(env)
    assert status == 2
    assert len(err.splitlines()) == 1 and "PROXY_API_KEYS" in err
    assert_no_secret(err)
    assert sai.received == []


async def test_unknown_config_keys_are_reported(sai: FakeSai, tmp_path: Path) -> None:
    env = check_env(sai, tmp_path)
    config = Path(env["SAIPROXY_CONFIG"])
    await asyncio.to_thread(config.write_text, TWO_MODELS + "\n[server]\nprot = 4001\n")
    status, out, err = await run_check(env)
    assert status == 2
    assert out == ""
    assert err.splitlines() == [
        f"saiproxy: configuration error: {config}: unknown key 'prot' in [server] "
        "(did you mean 'port'?)"
    ]
    assert sai.received == []


async def test_the_console_script(sai: FakeSai, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("saiproxy")
    if not script.exists():
        pytest.fail(f"the saiproxy console script is not installed next to {sys.executable}")
    status, out, _ = await run_check(check_env(sai, tmp_path), command=[str(script), "check"])
    assert status == 0
    assert out.splitlines()[-1] == "summary: 4 of 4 probes passed, all passed"


async def test_secrets_in_sai_answers_never_reach_the_output(sai: FakeSai, tmp_path: Path) -> None:
    # A misbehaving SAI that echoes the credential back, in a header the check prints.
    sai.default = Reply(headers={"model": SYSTEM_KEY})
    status, out, _ = await run_check(check_env(sai, tmp_path))
    assert status == 0
    assert "(SAI model ***)" in out
    assert_no_secret(out)


async def test_a_short_secret_does_not_mangle_the_output(sai: FakeSai, tmp_path: Path) -> None:
    # One masker for logs and the command line: values shorter than its minimum
    # are no secrets worth masking, and masking them would garble every line.
    status, out, _ = await run_check(check_env(sai, tmp_path, SAI_KEY="k", SAI_COOKIE="he"))
    assert status == 0
    assert "credentials SAI_KEY, SAI_COOKIE" in out.splitlines()[0]
    assert "***" not in out
    assert out.splitlines()[-1] == "summary: 4 of 4 probes passed, all passed"


async def test_timeout_is_one_attempt(sai: FakeSai, tmp_path: Path) -> None:
    sai.default = Reply(delay=2)
    env = check_env(sai, tmp_path, SAI_COOKIE="")
    settings = load_settings(env)
    probes = await run_probes(settings, probe_timeout=0.2)
    assert [p.status for p in probes] == ["timeout", "timeout"]
    assert probes[0].outcome == "upstream_timeout"
    assert "did not answer within 0.2 s" in probes[0].advice
    assert len(sai.received) == 2
