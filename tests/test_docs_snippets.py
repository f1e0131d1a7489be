"""Every command and snippet of the README and docs/, run against the demo, output checked.

The blocks are read from the pages themselves, so a page that changes runs
as it now reads. Each block is claimed by exactly one entry below: the test
that runs it (``RUN_HERE``), or why it is not run here (``NOT_HERE``); a new
block that no entry claims fails :func:`test_every_block_is_run_or_says_why`.
Commands go to the test proxy instead of ``localhost:4000``; the proxy is
set up as ``./scripts/run`` sets it up with no SAI configured: the demo
upstream (``saiproxy --demo``), ``message`` error mode unless a command says
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import socket
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from saiproxy import __version__
from saiproxy.base.settings import load_settings
from saiproxy.core.conversation import Conversation, Tool, Turn
from saiproxy.core.prompt import sai_payload
from saiproxy.upstream.demo import DEMO_COOKIE, DEMO_KEY

from .conftest import ROOT, MakeProxy, log_lines, settings_of
from .test_layout import LAYERS

PAGES = ("README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
DOCUMENTED = "localhost:4000"
BIN = Path(sys.executable).parent  # saiproxy's console script, as the pages call it


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    code: str


def all_blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(page, line, match[1], match[2]))
    return found


# (page, a text only that block of the page contains): the test that runs it.
RUN_HERE: dict[tuple[str, str], str] = {
    ("README.md", "./scripts/run\n"): "test_scripts_run_and_the_first_requests",
    ("README.md", '"content": "Stream it"'): "test_scripts_run_and_the_first_requests",
    ("README.md", 'extra_body={"metadata"'): "test_a_users_own_key",
    ("README.md", "# log: request received"): "test_a_rate_limited_user_key_falls_back",
    ("README.md", '"finish_reason": "stop", "message"'): "test_the_error_answer_example",
    ("README.md", "tool_calls)"): "test_the_tools_example",
    ("README.md", 'wire_api = "responses"'): "test_the_codex_config",
    ("README.md", "anthropic.Anthropic("): "test_the_anthropic_client",
    ("README.md", '"prompt": ["Once upon'): "test_the_legacy_completion",
    ("README.md", "[models.sai-opus]"): "test_the_models_table",
    ("README.md", "grep '\\[a1b2c3d4\\]'"): "test_finding_a_requests_lines",
    ("README.md", "grep -h"): "test_finding_a_requests_lines",
    ("README.md", "$ saiproxy check "): "test_the_check_transcripts",
    ("README.md", "$ saiproxy trace 7c1e9a04"): "test_the_trace_transcript",
    ("README.md", "saiproxy/     one folder per layer"): "test_the_layouts_name_every_module",
    ("docs/architecture.md", "──► SAI client"): "test_the_layouts_name_every_module",
    (
        "docs/architecture.md",
        "cli/        the command",
    ): "test_the_drawn_layers_are_the_checked_ones",
    ("docs/configuration.md", "[models.sai-opus]"): "test_the_models_table",
    ("docs/configuration.md", "unknown key 'prot'"): "test_the_unknown_key_line",
    ("docs/configuration.md", "[limits]\nurl ="): "test_the_limits_table",
    ("docs/configuration.md", "[state]\n# url"): "test_the_state_table",
    ("README.md", "previous_response_id=first.id"): "test_the_state_table",
    ("README.md", "LIMITS_CLIENT_RPM=60"): "test_the_limits_table",
    ("docs/demo.md", '"content": "Hello!"'): "test_the_demo_page",
    ("docs/demo.md", "# 429 with no fallback left"): "test_the_demo_page",
    ("docs/operations.md", "saiproxy trace a1b2c3d4 "): "test_finding_a_requests_lines",
    ("docs/operations.md", "$ saiproxy check\n"): "test_the_check_transcripts",
    ("docs/protocols.md", "tool_calls)"): "test_the_tools_example",
    ("docs/protocols.md", '"prompt": ["Once upon'): "test_the_legacy_completion",
    ("docs/sai.md", '"chatMessages"'): "test_the_sai_body",
}
# (page, a text only that block of the page contains): why it is not run here.
NOT_HERE: dict[tuple[str, str], str] = {
    ("README.md", "./scripts/test\n"): "it runs this suite",
    ("README.md", "from agents import"): "the OpenAI Agents SDK is no test dependency; "
    "tests/test_responses_sdk.py drives the Responses API with the openai SDK",
    ("README.md", "# Claude Code\n"): "Claude Code is not installed here; "
    "tests/test_messages_claude_code.py replays its requests",
    ("README.md", "docker compose"): "needs a Docker engine; .ci/run lints the compose "
    "and stack files and rehearses a rolling update (deploy/rehearse.py)",
    ("README.md", "docker stack deploy"): "needs a Docker Swarm; as above",
    ("README.md", "$ python deploy/rehearse.py"): ".ci/run runs deploy/rehearse.py",
    ("docs/clients.md", "from openai import OpenAI"): "tests/test_docs_clients.py",
    ("docs/clients.md", 'import OpenAI from "openai"'): "tests/test_docs_clients.py",
    ("docs/clients.md", "ChatOpenAI("): "tests/test_docs_clients.py",
    ("docs/clients.md", "import litellm"): "LiteLLM is no test dependency",
    ("docs/clients.md", "curl -s"): "tests/test_docs_clients.py",
    # The agents' settings: tests/test_agents.py reads these blocks and runs each
    # agent with them through a whole tool loop (only the address changes).
    ("docs/clients.md", "export ANTHROPIC_BASE_URL"): "tests/test_agents.py (Claude Code)",
    ("docs/clients.md", 'model_provider = "saiproxy"'): "tests/test_agents.py (Codex CLI)",
    ("docs/clients.md", "https://opencode.ai/config.json"): "tests/test_agents.py (opencode)",
    ("docs/clients.md", "export OPENCODE_DISABLE_AUTOUPDATE"): "tests/test_agents.py (opencode)",
    ("docs/operations.md", "docker service create"): "needs a Docker Swarm and a registry",
    ("docs/limits.md", "$ saiproxy usage"): "an example's figures; tests/test_limits.py runs "
    "saiproxy usage against the store and the process and checks what it prints",
    ("docs/operations.md", "docker run --rm"): "needs a Docker engine and a registry",
    ("docs/operations.md", "OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector"): "needs those "
    "backends; tests/test_phoenix.py sends to Phoenix the way the block says",
}


def block(page: str, marker: str) -> Block:
    """Return the one block of ``page`` that contains ``marker`` (an entry of RUN_HERE)."""
    assert (page, marker) in RUN_HERE
    (found,) = [b for b in all_blocks() if b.page == page and marker in b.code]
    return found


def test_every_block_is_run_or_says_why() -> None:
    claims = {**RUN_HERE, **NOT_HERE}
    for found in all_blocks():
        owners = [key for key in claims if key[0] == found.page and key[1] in found.code]
        assert len(owners) == 1, f"{found.page}:{found.line} is claimed by {owners or 'nothing'}"
    for page, marker in claims:
        matching = [b for b in all_blocks() if b.page == page and marker in b.code]
        assert len(matching) == 1, (page, marker)


# --- running what a page says


def commands(code: str) -> list[str]:
    """Return a shell block's commands: continued and quoted lines joined, comments left out."""
    found: list[str] = []
    pending = ""
    for line in code.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        comment = re.search(r"\s#\s", line)
        if comment and (pending + line[: comment.start()]).count("'") % 2 == 0:
            line = line[: comment.start()].rstrip()  # a trailing comment, outside quotes
        pending += line + "\n"
        if pending.count("'") % 2 == 0 and not line.endswith("\\"):
            found.append(re.sub(r"\\\n\s*", " ", pending).strip())
            pending = ""
    assert not pending, pending
    return found


async def shell(command: str, proxy: Any = None, **options: Any) -> str:
    """Run ``command`` as bash would, pointed at ``proxy``; return its output (it must succeed)."""
    if proxy is not None:
        command = command.replace(DOCUMENTED, f"{proxy.host}:{proxy.port}")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **options.pop("env", {})}
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", command, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, **options,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, (command, err.decode()[-2000:])
    return out.decode()


async def run_python(code: str, proxy: Any, documented_base: str) -> str:
    """Run a Python snippet (in a thread: the SDKs it uses are synchronous); return its output."""
    code = code.replace(documented_base, str(proxy.make_url("")).rstrip("/"))
    printed = io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "<snippet>", "exec"), {})

    await asyncio.to_thread(run)
    return printed.getvalue()


def lines_of(tmp_path: Path, message: str) -> list[dict[str, Any]]:
    """Return the proxy's log lines (parsed) whose message ends with ``message``."""
    parsed = [json.loads(line) for line in log_lines(tmp_path)]
    return [line for line in parsed if line["message"].endswith(message)]


async def settled_logs() -> None:
    await asyncio.sleep(0.3)  # the log writer works in the background


def shape(expected: str, *loose: str) -> re.Pattern[str]:
    """Return a pattern for a documented output line: any figure, any run of spaces,
    any value where a ``loose`` text stands, anything where it ends in ``...``."""
    pattern = re.escape(expected)
    for text in loose:
        pattern = pattern.replace(re.escape(text), r"\S+")
    pattern = re.sub(r"\d+(?:\\\.\d+)*", r"[\\d.]+", pattern)
    pattern = re.sub(r"(?:\\ )+", " +", pattern)
    if pattern.endswith(r"\.\.\."):
        pattern = pattern[: -len(r"\.\.\.")] + ".*"
    return re.compile(pattern)


def assert_shaped(actual: str, documented: str, *loose: str) -> None:
    """Assert ``actual`` is the documented output line by line, figures aside."""
    actual_lines = actual.strip("\n").splitlines()
    documented_lines = documented.strip("\n").splitlines()
    assert len(actual_lines) == len(documented_lines), actual
    for got, expected in zip(actual_lines, documented_lines, strict=True):
        assert shape(expected, *loose).fullmatch(got), f"\n{got}\n{expected}"


# --- README: the first commands


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_scripts_run_and_the_first_requests(tmp_path: Path) -> None:
    # ./scripts/run with no SAI configured starts the demo; the README's next
    # commands answer from it.
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SAI_", "PROXY_"))}
    env = {**clean, "PORT": str(port), "LOG_DIR": str(tmp_path / "logs"), "SHUTDOWN_DELAY": "0"}
    env.pop("SAIPROXY_CONFIG", None)
    (command,) = commands(block("README.md", "./scripts/run\n").code)
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", f"exec {command}", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        # Up to a minute: the script reinstalls first when setup.cfg changed.
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/health") as health:
                        if health.status == 200:
                            break
                assert process.returncode is None, "./scripts/run stopped"
                await asyncio.sleep(0.1)
        asked, streamed = commands(block("README.md", '"content": "Stream it"').code)
        target = {"env": {}, "cwd": ROOT}
        answer = json.loads(await shell(asked.replace(DOCUMENTED, f"127.0.0.1:{port}"), **target))
        assert "You said: 'Hello!'" in answer["choices"][0]["message"]["content"]
        stream = await shell(streamed.replace(DOCUMENTED, f"127.0.0.1:{port}"), **target)
        frames = [line for line in stream.splitlines() if line]
        assert frames[-1] == "data: [DONE]"
        assert '"object":"chat.completion.chunk"' in frames[0]
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert "saiproxy demo: fake SAI at http://127.0.0.1:" in stderr.decode()


# --- README: clients, credentials, errors


async def test_a_users_own_key(make_demo_proxy: MakeProxy, tmp_path: Path) -> None:
    # The demo SAI knows no user key: the call gets the answer explaining SAI's 401.
    proxy = await make_demo_proxy()
    code = block("README.md", 'extra_body={"metadata"').code
    await run_python(code, proxy, f"http://{DOCUMENTED}")
    await settled_logs()
    (received,) = lines_of(tmp_path, "request received")
    assert received["credential"] == "user key"  # the body's, first in AUTH_CHAIN
    (finished,) = lines_of(tmp_path, "response finished")
    assert (finished["status"], finished["outcome"]) == (200, "invalid_api_key")


async def test_a_rate_limited_user_key_falls_back(
    make_demo_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = await make_demo_proxy()
    code = block("README.md", "# log: request received").code
    (command,) = commands(code)
    answer = json.loads(await shell(command, proxy))
    assert "You said: 'demo:fallback hi'" in answer["choices"][0]["message"]["content"]
    await settled_logs()
    # Each "# log:" comment names a line and fields it has.
    for message, fields in re.findall(r"# log: ([a-z ;]+) \{(.*)\}", code):
        (line,) = lines_of(tmp_path, message)
        for field in fields.split(", "):
            if field != "...":
                name, _, value = field.partition(": ")
                assert line[name] == json.loads(value), (message, name)


async def test_the_error_answer_example(make_demo_proxy: MakeProxy) -> None:
    # "from curl ... -H 'user-api-key: sk-mine' against the demo", message mode.
    documented = json.loads(block("README.md", '"finish_reason": "stop", "message"').code)
    proxy = await make_demo_proxy()
    response = await proxy.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}]},
        headers={"user-api-key": "sk-mine"},
    )
    answer = await response.json()
    (choice,) = documented["choices"]
    assert answer["choices"][0]["message"] == choice["message"]
    assert answer["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert answer["usage"] == documented["usage"]
    assert response.headers["X-Saiproxy-Error"] == "invalid_api_key"


async def test_the_tools_example(make_demo_proxy: MakeProxy) -> None:
    proxy = await make_demo_proxy()
    for page in ("README.md", "docs/protocols.md"):
        printed = await run_python(block(page, "tool_calls)").code, proxy, f"http://{DOCUMENTED}")
        assert "name='get_weather'" in printed, printed
        assert """arguments='{"city":"demo"}'""" in printed, printed


async def test_the_codex_config(make_demo_proxy: MakeProxy) -> None:
    config = tomllib.loads(block("README.md", 'wire_api = "responses"').code)
    provider = config["model_providers"][config["model_provider"]]
    assert provider["base_url"] == f"http://{DOCUMENTED}/v1"
    proxy = await make_demo_proxy()
    settings = load_settings({"SAI_URL": "http://sai.test", "SAI_KEY": "k", "SAI_TEMPLATE_ID": "t"})
    assert config["model"] in settings.models
    # Codex's idle timeout outlasts SAI's silence as saiproxy allows it.
    assert provider["stream_idle_timeout_ms"] == settings.request_timeout * 1000
    response = await proxy.post(
        f"/v1/{provider['wire_api']}", json={"model": config["model"], "input": "Hi"}
    )
    assert response.status == 200
    assert (await response.json())["status"] == "completed"


async def test_the_state_table(make_demo_proxy: MakeProxy, tmp_path: Path) -> None:
    # docs/configuration.md's [state] table, as written (in the process: no URL), and the
    # README's two turns with previous_response_id: the second sends SAI the whole chain.
    config = tmp_path / "state.toml"
    config.write_text(block("docs/configuration.md", "[state]\n# url").code)
    proxy = await make_demo_proxy(SAIPROXY_CONFIG=str(config))
    settings = settings_of(proxy)
    assert settings.responses_ttl == 604800 and settings.state_client_bytes == 64 * 1024 * 1024
    code = block("README.md", "previous_response_id=first.id").code
    printed = await run_python(code, proxy, f"http://{DOCUMENTED}")
    assert "'What is my name?' (3 message(s) in the history" in printed, printed


async def test_the_anthropic_client(make_demo_proxy: MakeProxy) -> None:
    proxy = await make_demo_proxy()
    code = "import anthropic\n" + block("README.md", "anthropic.Anthropic(").code
    code += (
        'message = client.messages.create(model="sai-model", max_tokens=100,\n'
        '    messages=[{"role": "user", "content": "Hi"}])\n'
        "print(message.content[0].text)\n"
    )
    printed = await run_python(code, proxy, "http://saiproxy.example.com:4000")
    # "<your own SAI key>" is a key the demo SAI does not know.
    assert printed.startswith("SAI rejected the user key (HTTP 401)"), printed


async def test_the_legacy_completion(make_demo_proxy: MakeProxy) -> None:
    proxy = await make_demo_proxy()
    for page in ("README.md", "docs/protocols.md"):
        (command,) = commands(block(page, '"prompt": ["Once upon').code)
        answer = json.loads(await shell(command, proxy))
        texts = [choice["text"] for choice in answer["choices"]]
        assert texts[0].startswith("Once upon a time") and "You said" in texts[0]
        assert texts[1].startswith("In the beginning") and "You said" in texts[1]


async def test_the_models_table(make_demo_proxy: MakeProxy, tmp_path: Path) -> None:
    for page in ("README.md", "docs/configuration.md"):
        config = tmp_path / "models.toml"
        config.write_text(block(page, "[models.sai-opus]").code)
        proxy = await make_demo_proxy(SAIPROXY_CONFIG=str(config))
        answer = await (
            await proxy.post(
                "/v1/chat/completions",
                json={"model": "sai-opus", "messages": [{"role": "user", "content": "Hi"}]},
            )
        ).json()
        assert answer["model"] == "claude-opus"  # the demo SAI names the override it got


async def test_the_limits_table(make_demo_proxy: MakeProxy, tmp_path: Path) -> None:
    # docs/configuration.md's [limits] table, as written (its store is unreachable here:
    # each replica then enforces its share, 60 / 8 requests per minute).
    config = tmp_path / "limits.toml"
    text = block("docs/configuration.md", "[limits]\nurl =").code
    config.write_text(text.replace("redis://valkey:6379/0", f"redis://127.0.0.1:{free_port()}/0"))
    proxy = await make_demo_proxy(SAIPROXY_CONFIG=str(config))
    statuses = []
    for _ in range(8):
        response = await proxy.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}
        )
        statuses.append(response.status)
    assert statuses == [200] * 7 + [429]
    assert response.headers["X-Saiproxy-Limits"] == "fallback"
    # The README's command: the same limits in the process.
    (command,) = commands(block("README.md", "LIMITS_CLIENT_RPM=60").code)
    assignments = dict(word.split("=") for word in command.split() if "=" in word)
    proxy = await make_demo_proxy(**assignments)
    for _ in range(4):
        response = await proxy.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}
        )
    assert response.headers["x-ratelimit-remaining-requests"] == "56"
    assert response.headers["X-Saiproxy-Limits"] == "local"


# --- README and docs/operations.md: logs, trace, check


async def test_finding_a_requests_lines(make_demo_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = await make_demo_proxy()
    await proxy.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}]},
        headers={"X-Request-ID": "a1b2c3d4"},
    )
    await settled_logs()
    found = [
        *commands(block("README.md", "grep '\\[a1b2c3d4\\]'").code),
        *commands(block("README.md", "grep -h").code),
        *commands(block("docs/operations.md", "saiproxy trace a1b2c3d4 ").code),
    ]
    logs = tmp_path / "logs"
    for command in found:
        command = command.replace("/var/log/saiproxy/", f"{logs}/")
        out = await shell(command, cwd=tmp_path, env={"LOG_DIR": str(logs)})
        if command.startswith("grep"):
            lines = out.splitlines()
            assert len(lines) == 2 and all("a1b2c3d4" in line for line in lines), command
        else:
            assert out.startswith("request a1b2c3d4: 2 lines"), command
            assert "summary: status 200, outcome ok, finish stop" in out, command


async def test_the_trace_transcript(make_demo_proxy: MakeProxy, tmp_path: Path) -> None:
    documented = block("README.md", "$ saiproxy trace 7c1e9a04").code
    command, output = documented.split("\n", 1)
    proxy = await make_demo_proxy()
    response = await proxy.post(
        "/v1/chat/completions",
        json={"stream": True, "messages": [{"role": "user", "content": "demo:fallback hi"}]},
        headers={"X-Request-ID": "7c1e9a04", "user-api-key": "sk-mine"},
    )
    await response.read()
    await settled_logs()
    command = command.removeprefix("$ ").replace("/var/log/", f"{tmp_path / 'logs'}/")
    actual = await shell(command)
    log_file = next((tmp_path / "logs").glob("saiproxy-*.log")).name
    assert_shaped(actual.replace(log_file, "saiproxy-node3-1.log"), output)


async def test_the_check_transcripts(demo_url: str, tmp_path: Path) -> None:
    # The demo SAI answers its session cookie and rejects any key but its own.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SAI_", "PROXY_"))}
    env = {
        **clean,
        "SAI_URL": demo_url,
        "SAI_KEY": "an-old-key",
        "SAI_COOKIE": DEMO_COOKIE,
        "SAI_TEMPLATE_ID": "tpl-123",
    }
    assert env["SAI_KEY"] != DEMO_KEY
    two_models = tmp_path / "two.toml"
    two_models.write_text(
        'default_model = "sai-model"\n[models.sai-model]\ntemplate_id = "tpl-123"\n'
        '[models.big]\ntemplate_id = "tpl-456"\n'
    )
    for page, marker, config in (
        ("README.md", "$ saiproxy check ", str(ROOT / "config" / "saiproxy.toml")),
        ("docs/operations.md", "$ saiproxy check\n", str(two_models)),
    ):
        command, output = block(page, marker).code.split("\n", 1)
        process = await asyncio.create_subprocess_exec(
            str(BIN / "saiproxy"), "check", env={**env, "SAIPROXY_CONFIG": config},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert command.startswith("$ saiproxy check")
        assert process.returncode == 1  # one credential failed
        actual = out.decode().replace(demo_url, "https://sai.example.com")
        assert f"saiproxy check {__version__}:" in actual
        assert_shaped(actual, output, "gpt-4o", "gpt-4.1")


async def test_the_unknown_key_line(tmp_path: Path) -> None:
    (line,) = block("docs/configuration.md", "unknown key 'prot'").code.splitlines()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "saiproxy.toml").write_text("[server]\nprot = 4001\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SAI_", "PROXY_"))}
    clean.pop("SAIPROXY_CONFIG", None)
    process = await asyncio.create_subprocess_exec(
        str(BIN / "saiproxy"), cwd=tmp_path, env={**clean, "SAI_URL": "http://sai.test"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert err.decode().splitlines() == [line]


def test_the_layouts_name_every_module() -> None:
    layout = block("README.md", "saiproxy/     one folder per layer").code
    package = ROOT / "saiproxy"
    tree = layout[: layout.index("\nbench/")]  # the package's part of the layout
    listed = dict(re.findall(r"(\w+)/\s+\(([^)]*)\)", tree))
    layers = {p.parent.name for p in package.glob("*/__init__.py")}
    assert set(listed) == layers
    for layer, names in listed.items():
        folder = package / layer
        children = {
            f"{child.stem}/" if child.is_dir() else child.stem
            for child in folder.iterdir()
            if child.name != "__pycache__" and not child.name.startswith("__init__")
        }
        assert set(re.split(r"[,\s]+", names.strip())) == children, layer
    for named in re.findall(r"[\w/]+\.py", layout):
        assert (package / named).exists() or list(ROOT.glob(f"*/{named}")), named
    diagram = block("docs/architecture.md", "──► SAI client").code
    for named in re.findall(r"[\w/]+\.py", diagram):
        if "*" not in named:
            assert (package / named).exists(), named


def test_the_drawn_layers_are_the_checked_ones() -> None:
    drawn = re.findall(
        r"^  (\w+)/ ", block("docs/architecture.md", "cli/        the command").code, re.M
    )
    assert drawn == list(reversed(LAYERS))  # top to bottom, as tests/test_layout.py orders them


# --- docs/demo.md and docs/sai.md


async def test_the_demo_page(make_demo_proxy: MakeProxy) -> None:
    proxy = await make_demo_proxy()
    (command,) = commands(block("docs/demo.md", '"content": "Hello!"').code)
    answer = json.loads(await shell(command, proxy))
    assert (
        "Hello from the saiproxy demo upstream! You said: 'Hello!'"
        in (answer["choices"][0]["message"]["content"])
    )
    outputs = []
    for command in commands(block("docs/demo.md", "# 429 with no fallback left").code):
        started = re.fullmatch(r"((?:\w+=\S+ )*)\./scripts/run", command)
        if started:  # a proxy of its own, with the settings the command gives
            proxy = await make_demo_proxy(**dict(v.split("=", 1) for v in started[1].split()))
        else:
            outputs.append(await shell(command, proxy))
    limited, fallback, tool, too_long = outputs
    assert limited.startswith("HTTP/1.1 429") and "Retry-After: 7" in limited
    assert '"code":"rate_limit_exceeded"' in limited
    (choice,) = json.loads(fallback)["choices"]
    assert "You said: 'demo:fallback hi'" in choice["message"]["content"]
    (choice,) = json.loads(too_long)["choices"]
    assert choice["finish_reason"] == "length" and "too long" in choice["message"]["content"]
    (choice,) = json.loads(tool)["choices"]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"demo"}'}


def test_the_sai_body() -> None:
    documented = json.loads(block("docs/sai.md", '"chatMessages"').code.replace(", ...]", "]"))
    conversation = Conversation([Turn("user", "Hi")], system="Be brief.", tools=(Tool("f"),))
    payload, _ = sai_payload(conversation, 1732651491123)
    assert payload.keys() == documented.keys()
    assert payload["inputs"].keys() == documented["inputs"].keys()
    assert payload["chatMessages"][0].keys() == documented["chatMessages"][0].keys()
