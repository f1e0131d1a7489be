"""Every request body the pinned agents sent, replayed through saiproxy: none gets a 4xx.

tests/fixtures/agents/<agent>.json holds the requests of one run of
tests/test_agents.py (credentials left out), written with
``SAIPROXY_RECORD_AGENTS=1 ./scripts/test tests/test_agents.py``. Each one
goes to its own endpoint as recorded, then with ``stream`` flipped, and a
Messages body also to ``/v1/messages/count_tokens``; the fake SAI answers
as in the agent's loop (a call of its shell tool while none has run, then
text). Fast: no agent runs here.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from .agents import FIXTURES, AgentSai
from .conftest import FakeSai, MakeProxy

RECORDED = sorted(FIXTURES.glob("*.json"))


def variants(request: dict[str, Any]) -> list[tuple[str, Any]]:
    """Return (path, body) of each way a recorded request is replayed."""
    path, body = request["path"], request["body"]
    out = [(path, body)]
    if isinstance(body, dict) and isinstance(body.get("stream"), bool):
        out.append((path, {**body, "stream": not body["stream"]}))
    if path == "/v1/messages" and isinstance(body, dict):
        counted = {k: v for k, v in body.items() if k not in ("stream", "max_tokens")}
        out.append(("/v1/messages/count_tokens", counted))
    return out


def test_every_agent_has_recorded_requests() -> None:
    agents = {path.stem for path in RECORDED}
    assert {"claude-code", "codex", "opencode"} <= agents, agents
    for path in RECORDED:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        assert recorded["requests"], path
        secrets = {"authorization", "x-api-key", "cookie", "user-api-key"}
        for request in recorded["requests"]:
            assert not secrets & {name.lower() for name in request["headers"]}, path


@pytest.mark.parametrize(
    "recorded",
    [json.loads(path.read_text(encoding="utf-8")) for path in RECORDED],
    ids=[path.stem for path in RECORDED],
)
async def test_recorded_agent_requests_get_no_4xx(
    make_proxy: MakeProxy, sai: FakeSai, recorded: dict[str, Any]
) -> None:
    proxy = await make_proxy(ERROR_MODE="http")
    refused = []
    replayed = 0
    for request in recorded["requests"]:
        for path, body in variants(request):
            sai.answer = AgentSai()
            data = orjson.dumps(body) if body is not None else None
            response = await proxy.request(
                request["method"], path, params=request["query"],
                headers=request["headers"], data=data,
            )  # fmt: skip
            text = await response.text()
            replayed += 1
            if response.status >= 400:
                refused.append(f"{path} ({recorded['package']}) -> {response.status}: {text[:800]}")
    assert not refused, "\n".join(refused)
    assert replayed >= 2 * len(recorded["requests"])
