"""The snippets of docs/clients.md, run as written against the proxy: docs that cannot rot.

Each snippet is taken from the page, its ``http://localhost:4000/v1`` pointed
at the test proxy, and run: the Python ones in a thread (they are
synchronous), the TypeScript one with Node and the SDK pinned in tests/node,
the curl one with curl. The fake SAI shows which credential each call used.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest

from .conftest import NODE_DIR, ROOT, FakeSai, MakeProxy, openai_url

PAGE = ROOT / "docs" / "clients.md"
DOCUMENTED_URL = "http://localhost:4000/v1"
USER_KEY = "sk-my-sai-key"  # the key the snippets send
# LiteLLM is not a dependency of saiproxy or its tests: its snippet is only read.
NOT_RUN = ("import litellm",)


def snippets(language: str, page: Path = PAGE) -> list[str]:
    """Return the page's code blocks in ``language``, in order, up to its agents' settings.

    The section "Coding agents" is run by tests/test_agents.py.
    """
    text = page.read_text(encoding="utf-8").split("\n## Coding agents\n")[0]
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_the_page_has_the_snippets_this_file_runs() -> None:
    assert len(snippets("python")) == 3 and len(snippets("ts")) == 1 and len(snippets("sh")) == 1
    assert all(DOCUMENTED_URL in code for code in snippets("python") + snippets("ts"))


async def test_the_python_snippets_run_and_send_the_users_key(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    ran = 0
    for code in snippets("python"):
        if any(marker in code for marker in NOT_RUN):
            continue
        code = code.replace(DOCUMENTED_URL, openai_url(proxy))
        await asyncio.to_thread(exec, compile(code, str(PAGE), "exec"), {})
        ran += 1
    # OpenAI SDK: a default header, then metadata in the body; LangChain: a default header.
    assert ran == 2
    assert [call.auth for call in sai.received] == [("X-Api-Key", USER_KEY)] * 3


@pytest.mark.skipif(shutil.which("node") is None, reason="Node is not installed")
async def test_the_typescript_snippet_runs_with_the_pinned_sdk(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    (code,) = snippets("ts")
    # The snippet makes the client; one call shows it works. Plain JavaScript
    # too, so Node runs it as a module from tests/node, where the SDK is pinned.
    program = code.replace(DOCUMENTED_URL, openai_url(proxy)) + (
        "const answer = await client.chat.completions.create("
        '{ model: "sai-model", messages: [{ role: "user", content: "Hi" }] });\n'
        "console.log(JSON.stringify(answer.choices[0].message));\n"
    )
    process = await asyncio.create_subprocess_exec(
        "node", "--input-type=module", "-e", program,
        cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert '"role":"assistant"' in stdout.decode()
    assert [call.auth for call in sai.received] == [("X-Api-Key", USER_KEY)]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_the_curl_snippet_runs(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    (command,) = snippets("sh")
    command = command.replace("localhost:4000", f"{proxy.host}:{proxy.port}")
    process = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    assert b'"object":"chat.completion"' in stdout
    assert [call.auth for call in sai.received] == [("X-Api-Key", USER_KEY)]
