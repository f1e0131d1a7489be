"""The coding agents, as pinned in tests/node, through a whole tool loop against saiproxy.

Claude Code, Codex CLI and opencode each run as a user would, with the
settings of their section in docs/clients.md (only the address changes),
in a temporary directory with their own HOME and XDG directories: the
agent asks, the fake SAI calls the agent's shell or file-write tool
(tests/agents.py), the agent runs it, the result goes back, SAI answers
with text. The test asserts the agent exited 0, the file exists, and
saiproxy refused none of its requests. Everything stays on loopback; each
run is bounded.

``SAIPROXY_RECORD_AGENTS=1`` keeps the requests of each run as
tests/fixtures/agents/<agent>.json (replayed by tests/test_agents_replay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .agents import (
    FINAL_TEXT,
    PROOF,
    PROOF_TEXT,
    AgentSai,
    Recorder,
    describe_refused,
    doc_blocks,
    doc_exports,
    doc_section,
    tool_kinds,
    write_fixture,
)
from .conftest import NODE_DIR, ROOT, FakeSai, MakeProxy, Reply

PAGE = (ROOT / "docs" / "clients.md").read_text(encoding="utf-8")
DOC_ROOT = "http://localhost:4000"
DOC_KEY = "unused"  # the key the documented settings send
# SAIPROXY_AGENTS_NODE_DIR: run the agents installed there (CI's newest-releases step).
AGENTS_DIR = Path(os.environ.get("SAIPROXY_AGENTS_NODE_DIR") or NODE_DIR)
BIN = AGENTS_DIR / "node_modules" / ".bin"
TIMEOUT = 150.0  # seconds one agent run may take
REFUSED_GRACE = 5.0  # seconds an agent may go on after saiproxy refused one of its requests
RECORD = os.environ.get("SAIPROXY_RECORD_AGENTS") == "1"
PROMPT = f"Create the file {PROOF} in the current directory with your shell tool."


def agent(name: str) -> str:
    """Return the path of an agent's command; skip (fail under CI) when it is not installed."""
    path = BIN / name
    if not path.exists():
        why = f"{path} is missing (scripts/test installs the agents pinned in tests/node)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return str(path)


@dataclass
class Run:
    """One agent run: where it ran, what it printed."""

    home: Path
    work: Path
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Loop:
    """A proxy behind a recording front, the fake SAI scripted for a tool loop."""

    url: str  # the front's root, as an agent takes it (no /v1)
    sai: AgentSai
    recorder: Recorder
    tmp: Path

    def environment(self, home: Path, extra: dict[str, str]) -> dict[str, str]:
        """Return an agent's environment: isolated HOME and XDG dirs, loopback only."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_STATE_HOME": str(home / ".local" / "state"),
            "TMPDIR": str(self.tmp),
            "NO_PROXY": "127.0.0.1,localhost",
            "TERM": "dumb",
            "NO_COLOR": "1",
        }
        env.update(extra)
        return env

    async def run(self, argv: list[str], env: dict[str, str], home: Path, work: Path) -> Run:
        """Run an agent in ``work``; kill it (and fail) after TIMEOUT seconds.

        An agent whose request saiproxy refused is stopped after REFUSED_GRACE
        seconds (agents retry a 4xx for minutes): the test fails at once.
        """
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=work, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        output = asyncio.ensure_future(process.communicate())
        clock = asyncio.get_running_loop().time
        deadline, refused_at = clock() + TIMEOUT, None
        while not output.done():
            await asyncio.wait({output}, timeout=0.25)
            if refused_at is None and self.recorder.refused():
                refused_at = clock()
            stalled = refused_at is not None and clock() - refused_at > REFUSED_GRACE
            if not output.done() and (clock() > deadline or stalled):
                os.killpg(process.pid, 9)
                await output
                why = (
                    f"was stopped {REFUSED_GRACE:.0f} s after saiproxy refused a request"
                    if stalled
                    else f"did not finish in {TIMEOUT:.0f} s"
                )
                pytest.fail(f"{argv[0]} {why}\n{self.report()}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)  # anything it left running in the background
        stdout, stderr = output.result()
        return Run(home, work, process.returncode or 0, stdout.decode(), stderr.decode())

    def dirs(self, name: str) -> tuple[Path, Path]:
        home, work = self.tmp / name / "home", self.tmp / name / "work"
        home.mkdir(parents=True)
        work.mkdir(parents=True)
        return home, work

    def report(self) -> str:
        """Return what went wrong on saiproxy's side, for an assertion message.

        The requests of the run are kept in ``requests.json`` beside it.
        """
        dump = self.tmp / "requests.json"
        dump.write_text(
            json.dumps([e.fixture() | {"status": e.status} for e in self.recorder.exchanges]),
            encoding="utf-8",
        )
        return (
            f"requests kept in {dump}\n"
            f"SAI's tool calls: {self.sai.calls}\ntools offered: {self.sai.offered}\n"
            f"requests: {[(e.method, e.path, e.status) for e in self.recorder.exchanges]}\n"
            f"refused:\n{describe_refused(self.recorder)}\n"
            f"tools sent: {[tool_kinds(e.body) for e in self.recorder.exchanges]}"
        )

    def check(self, run: Run) -> None:
        """Assert the loop completed: exit 0, the file, SAI's answers, no refused request."""
        assert not self.recorder.refused(), self.report()
        assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{self.report()}"
        assert len(self.sai.calls) == 1, self.report()
        proof = run.work / PROOF
        assert proof.exists(), f"{run.stdout[-3000:]}\n{self.report()}"
        assert proof.read_text().strip() == PROOF_TEXT

    def record(self, agent: str, package: str, run: Run) -> None:
        if RECORD:
            scrub = {str(run.work): "/work", str(run.home): "/home/agent", str(self.tmp): "/tmp"}
            write_fixture(agent, package, AGENTS_DIR, self.recorder, scrub)


@pytest.fixture
async def loop(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Loop]:
    """The loop with ERROR_MODE=http, as docs/clients.md advises for agents (or the param)."""
    agent_sai = AgentSai()
    sai.answer = agent_sai
    # The proxy requires a key: the value the settings of docs/clients.md send.
    proxy = await make_proxy(ERROR_MODE=getattr(request, "param", "http"), PROXY_API_KEYS=DOC_KEY)
    recorder = Recorder(proxy.make_url(""))
    url = str(await recorder.start()).rstrip("/")
    yield Loop(url, agent_sai, recorder, tmp_path)
    await recorder.close()


def claude_env(loop: Loop, home: Path) -> dict[str, str]:
    (block,) = doc_blocks(doc_section(PAGE, "Claude Code"), "sh")
    settings = doc_exports(block)
    assert settings["ANTHROPIC_BASE_URL"] == DOC_ROOT
    settings["ANTHROPIC_BASE_URL"] = loop.url
    return loop.environment(home, settings)


@pytest.mark.parametrize("output", ["json", "stream-json"])
async def test_claude_code_runs_its_shell_tool_through_saiproxy(loop: Loop, output: str) -> None:
    home, work = loop.dirs("claude")
    allowed = "Bash"
    if output == "stream-json":
        # Its file-write tool, this time: another tool's arguments, another result.
        allowed = "Bash Write"
        loop.sai.write_to = str(work / PROOF)
    argv = [agent("claude"), "-p", PROMPT, "--output-format", output, "--allowedTools", allowed]
    if output == "stream-json":
        argv.append("--verbose")
    run = await loop.run(argv, claude_env(loop, home), home, work)
    loop.check(run)
    assert loop.sai.calls[0]["name"] == ("Write" if output == "stream-json" else "Bash")
    if output == "json":
        result = json.loads(run.stdout)
        assert result["is_error"] is False and result["result"] == FINAL_TEXT
    else:
        events = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
        assert events[-1]["type"] == "result" and events[-1]["result"] == FINAL_TEXT
        assert any(e["type"] == "user" for e in events)  # the tool result went back
    if output == "json":  # the same requests either way
        loop.record("claude-code", "@anthropic-ai/claude-code", run)


@pytest.mark.parametrize("loop", ["message"], indirect=True)
async def test_claude_code_shows_the_context_too_long_explanation(loop: Loop, sai: FakeSai) -> None:
    """In ``message`` mode the explanation reaches Claude Code's user as its answer."""
    sai.default = Reply(status=500, body='{"error": "prompt is too long: 210000 tokens > 200000"}')
    sai.answer = None
    home, work = loop.dirs("claude")
    argv = [agent("claude"), "-p", "Hello", "--output-format", "json"]
    run = await loop.run(argv, claude_env(loop, home), home, work)
    assert not loop.recorder.refused(), loop.report()
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{loop.report()}"
    result = json.loads(run.stdout)
    assert "prompt is too long" in result["result"], result
    assert "Shorten the history" in result["result"], result


def codex_config(loop: Loop) -> str:
    (block,) = doc_blocks(doc_section(PAGE, "Codex CLI"), "toml")
    assert f'base_url = "{DOC_ROOT}/v1"' in block
    return block.replace(DOC_ROOT, loop.url)


async def test_codex_runs_its_shell_tool_through_saiproxy(loop: Loop) -> None:
    home, work = loop.dirs("codex")
    codex_home = home / ".codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(codex_config(loop), encoding="utf-8")
    env = loop.environment(home, {"CODEX_HOME": str(codex_home), "SAIPROXY_API_KEY": DOC_KEY})
    argv = [
        agent("codex"), "exec", "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox", "--color", "never", PROMPT,
    ]  # fmt: skip
    run = await loop.run(argv, env, home, work)
    loop.check(run)
    assert FINAL_TEXT in run.stdout
    loop.record("codex", "@openai/codex", run)


def offline_plugin_sdk(config_dir: Path) -> None:
    """Keep opencode off the npm registry: its plugin SDK counts as installed.

    At start opencode installs ``@opencode-ai/plugin`` (for local plugins)
    into each config directory, in the background, unless the directory's
    package.json and package-lock.json already list it. No plugin runs here.
    """
    (config_dir / "node_modules").mkdir()
    dependencies = {"@opencode-ai/plugin": "*"}
    lock = {"lockfileVersion": 3, "packages": {"": {"dependencies": dependencies}}}
    (config_dir / "package.json").write_text(json.dumps({"dependencies": dependencies}))
    (config_dir / "package-lock.json").write_text(json.dumps(lock))


def opencode_settings(loop: Loop) -> tuple[str, dict[str, str]]:
    section = doc_section(PAGE, "opencode")
    (config,) = doc_blocks(section, "json")
    (block,) = doc_blocks(section, "sh")
    assert f'"baseURL": "{DOC_ROOT}/v1"' in config
    return config.replace(DOC_ROOT, loop.url), doc_exports(block)


@pytest.mark.parametrize("tool", ["bash", "write"])
async def test_opencode_runs_its_shell_tool_through_saiproxy(loop: Loop, tool: str) -> None:
    home, work = loop.dirs("opencode")
    if tool == "write":
        loop.sai.write_to = str(work / PROOF)
    config, variables = opencode_settings(loop)
    config_dir = home / ".config" / "opencode"
    config_dir.mkdir(parents=True)
    (config_dir / "opencode.json").write_text(config, encoding="utf-8")
    offline_plugin_sdk(config_dir)
    argv = [agent("opencode"), "run", "--auto", PROMPT]
    run = await loop.run(argv, loop.environment(home, variables), home, work)
    loop.check(run)
    assert loop.sai.calls[0]["name"] == tool
    if tool == "bash":
        loop.record("opencode", "opencode-ai", run)
