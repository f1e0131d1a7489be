"""Compaction of long Responses sessions, as Codex CLI asks for it (saiproxy/protocols/compaction.py).

The request shapes are Codex's own (tests/fixtures/compaction/, recorded from
the Codex CLI pinned in tests/node with ``SAIPROXY_RECORD_AGENTS=1``): both
forms answer one ``compaction`` item whose content is only the id of a
summary kept for the caller, expanded into the summary on the next turn; a
forged or another client's item is left out. Then Codex itself, as a user
who only sets ``OPENAI_BASE_URL``, compacts a session twice through saiproxy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from saiproxy.protocols.compaction import SUMMARISE, SUMMARY_HEAD

from .agents import FINAL_TEXT, PROOF, Recorder, offered_tools, shell_call
from .conftest import ROOT, FakeSai, MakeProxy, Received, Reply
from .test_agents import Loop, agent

FIXTURES = ROOT / "tests" / "fixtures" / "compaction"
RECORD = __import__("os").environ.get("SAIPROXY_RECORD_AGENTS") == "1"
STEPS = 4  # shell calls SAI makes in the Codex session before its last answer


def payload_text(call: Received) -> str:
    return orjson.dumps(call.json).decode()


def is_summary_call(call: Received) -> bool:
    return SUMMARISE[:60] in payload_text(call)


class CompactingSai:
    """SAI's side of a long Codex session: STEPS shell calls, a summary when asked, then text."""

    def __init__(self) -> None:
        self.summaries = 0
        self.steps = 0
        self.calls: list[Received] = []
        self.offered: list[list[str]] = []  # (what tests.agents.Loop reports)

    def __call__(self, call: Received) -> Reply:
        self.calls.append(call)
        if is_summary_call(call):
            self.summaries += 1
            return Reply(body=f"SUMMARY-{self.summaries}: the agent appended steps to {PROOF}.")
        if self.steps >= STEPS:
            return Reply(body=FINAL_TEXT)
        chosen = shell_call(offered_tools(call), f"echo step{self.steps} >> {PROOF}")
        if chosen is None:
            return Reply(body="Steps")  # a side request: a title
        self.steps += 1
        block = "<tool_call>" + orjson.dumps(chosen).decode() + "</tool_call>"
        return Reply(body=f"Step {self.steps}.\n{block}")


class HttpsRecorder(Recorder):
    """The recording front, where Codex's WebSocket attempts do not count as refused.

    Codex tries its Responses WebSocket first with the built-in provider;
    saiproxy serves HTTPS only, and Codex falls back to it.
    """

    def refused(self) -> list[Any]:
        return [e for e in super().refused() if e.method != "GET"]


CODEX_CONFIG = """\
check_for_update_on_startup = false
openai_base_url = "{url}/v1"
model_auto_compact_token_limit = {limit}

[analytics]
enabled = false

[features]
plugins = false
remote_compaction_v2 = {v2}
"""


@pytest.mark.parametrize("form", ["trigger", "compact"])
async def test_codex_compacts_a_long_session_twice(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path, form: str
) -> None:
    """Codex with only OPENAI_BASE_URL set compacts remotely; the summaries reach SAI."""
    script = CompactingSai()
    sai.answer = script
    proxy = await make_proxy(ERROR_MODE="http", PROXY_API_KEYS="sk-user")
    recorder = HttpsRecorder(proxy.make_url(""))
    url = str(await recorder.start()).rstrip("/")
    loop = Loop(url, script, recorder, tmp_path)  # type: ignore[arg-type]
    try:
        home, work = loop.dirs("codex")
        codex_home = home / ".codex"
        codex_home.mkdir()
        (codex_home / "config.toml").write_text(CODEX_CONFIG.format(url=url, limit=2000, v2=str(form == "trigger").lower()))
        env = loop.environment(
            home,
            {"CODEX_HOME": str(codex_home), "OPENAI_API_KEY": "sk-user",
             "CODEX_API_KEY": "sk-user"},
        )  # fmt: skip
        argv = [
            agent("codex"), "exec", "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox", "--color", "never",
            f"Append four steps to {PROOF} with your shell tool, one command each.",
        ]  # fmt: skip
        run = await loop.run(argv, env, home, work)
        dump = tmp_path / "codex-requests.json"
        dump.write_text(json.dumps([e.fixture() | {"status": e.status} for e in recorder.exchanges]))
        report = f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\nrequests: {dump}\n" + str(
            [(e.method, e.path, e.status) for e in recorder.exchanges]
        )
        assert not recorder.refused(), report
        assert run.returncode == 0, report
        assert script.summaries >= 2, report
    finally:
        await recorder.close()
