"""What the agent tests share: SAI's side of a tool loop, the recording front, the fixtures.

SAI's side (:class:`AgentSai`): a call that offers the agent's shell tool
is answered with a call to it, in saiproxy's calling convention, whose
command writes :data:`PROOF` (or with a call of its file-write tool); once
the tool's result comes back (``<tool_result`` in the user text) SAI
answers with text. A call offering no such tool (an agent's side request:
a title, a summary) gets text.

The recording front (:class:`Recorder`) sits between the agent and the
proxy on its own loopback port: it forwards every request untouched and
keeps what the agent sent and the status it got, so a test can show the
request saiproxy refused, and so the requests can be kept as fixtures
(tests/fixtures/agents/, written when ``SAIPROXY_RECORD_AGENTS=1``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from .conftest import NODE_DIR, ROOT, Received, Reply

FIXTURES = ROOT / "tests" / "fixtures" / "agents"
PROOF = "proof.txt"
PROOF_TEXT = "written by the agent through saiproxy"
FINAL_TEXT = "Done: proof.txt is written."
# The shell tools of the agents: Claude Code, opencode, Codex (its tool names over the releases).
SHELL_TOOLS = ("Bash", "bash", "shell", "shell_command", "exec_command")
WRITE_TOOLS = ("Write", "write")
# A loop that never gets its tool result back stops here instead of at the test's timeout.
MAX_TOOL_CALLS = 3
# Headers that carry a credential, never kept in a fixture.
SECRET_HEADERS = frozenset(
    {"authorization", "x-api-key", "cookie", "user-api-key", "proxy-authorization"}
)
# Headers of the hop, not of the request.
HOP_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "accept-encoding"}
)


def installed_version(package: str, node_dir: Path = NODE_DIR) -> str:
    """Return the version of ``package`` installed in ``node_dir``."""
    manifest = node_dir / "node_modules" / package / "package.json"
    version: str = json.loads(manifest.read_text(encoding="utf-8"))["version"]
    return version


def offered_tools(call: Received) -> list[dict[str, Any]]:
    """Return the tools saiproxy passed to SAI in ``inputs.tools`` (Chat Completions' shape)."""
    inputs = call.json.get("inputs") if isinstance(call.json, dict) else None
    raw = inputs.get("tools") if isinstance(inputs, dict) else None
    tools = orjson.loads(raw) if isinstance(raw, str) and raw else []
    return tools if isinstance(tools, list) else []


def tool_names(call: Received) -> list[str]:
    """Return the names of the tools offered to SAI in one call."""
    names = []
    for tool in offered_tools(call):
        spec = tool.get("function") or tool.get("custom") or {}
        names.append(str(spec.get("name")))
    return names


def shell_call(tools: list[dict[str, Any]], command: str) -> dict[str, Any] | None:
    """Return a call of the first offered shell tool running ``command``, or None.

    The arguments follow the tool's own schema: the command property
    (``command`` or ``cmd``) as a string, or as an argv list when the schema
    says array; any other required string (a description) gets a short text.
    """
    for name in SHELL_TOOLS:
        for tool in tools:
            function = tool.get("function") or {}
            if tool.get("type") != "function" or function.get("name") != name:
                continue
            schema = function.get("parameters") or {}
            properties = schema.get("properties") or {}
            arguments: dict[str, Any] = {}
            for key in ("command", "cmd"):
                if key in properties:
                    is_list = properties[key].get("type") == "array"
                    arguments[key] = ["bash", "-lc", command] if is_list else command
                    break
            else:
                continue
            for key in schema.get("required") or []:
                if key not in arguments and (properties.get(key) or {}).get("type") == "string":
                    arguments[key] = "Write the proof file"
            return {"name": name, "arguments": arguments}
    for tool in tools:
        # Codex's code mode: its shell is a nested tool of the free-form `exec` (JavaScript).
        if tool.get("type") == "custom" and (tool.get("custom") or {}).get("name") == "exec":
            script = f"await tools.exec_command({{cmd: {json.dumps(command)}}});\ntext('done');\n"
            return {"name": "exec", "input": script}
    return None


def write_call(tools: list[dict[str, Any]], path: str, content: str) -> dict[str, Any] | None:
    """Return a call of the offered file-write tool (Claude Code's, opencode's), or None."""
    for tool in tools:
        function = tool.get("function") or {}
        if tool.get("type") != "function" or function.get("name") not in WRITE_TOOLS:
            continue
        properties = (function.get("parameters") or {}).get("properties") or {}
        key = next((k for k in ("file_path", "filePath", "path") if k in properties), None)
        if key is not None and "content" in properties:
            return {"name": function["name"], "arguments": {key: path, "content": content}}
    return None


@dataclass
class AgentSai:
    """SAI's side of one agent's tool loop (the fake SAI's ``answer``).

    With ``write_to`` (an absolute path) SAI calls the agent's file-write
    tool instead of its shell.
    """

    command: str = f"echo '{PROOF_TEXT}' > {PROOF}"
    write_to: str | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)  # the tool calls SAI made
    offered: list[list[str]] = field(default_factory=list)  # the tool names of each call

    def __call__(self, call: Received) -> Reply:
        self.offered.append(tool_names(call))
        if "<tool_result" in call.user or len(self.calls) >= MAX_TOOL_CALLS:
            return Reply(body=FINAL_TEXT)
        if self.write_to is not None:
            chosen = write_call(offered_tools(call), self.write_to, PROOF_TEXT + "\n")
        else:
            chosen = shell_call(offered_tools(call), self.command)
        if chosen is None:
            return Reply(body="Proof file")  # a side request: a title, a summary
        self.calls.append(chosen)
        block = "<tool_call>" + orjson.dumps(chosen).decode() + "</tool_call>"
        return Reply(body="I will run the command.\n" + block)


@dataclass
class Exchange:
    """One request an agent sent, and the status saiproxy answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    status: int = 0
    error: str = ""  # the answer's body when the status is 4xx or 5xx

    def fixture(self) -> dict[str, Any]:
        """Return the request as kept in a fixture: no credentials, no status."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in SECRET_HEADERS}
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body": self.body,
        }


class Recorder:
    """A loopback front that forwards every request to ``target`` and keeps it."""

    def __init__(self, target: URL) -> None:
        self.target = target
        self.exchanges: list[Exchange] = []
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.server = TestServer(app, host="127.0.0.1")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> URL:
        await self.server.start_server(access_log=None)
        self._session = aiohttp.ClientSession(auto_decompress=True)
        return self.server.make_url("")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self.server.close()

    def refused(self) -> list[Exchange]:
        """Return the requests saiproxy answered with a 4xx or 5xx."""
        return [exchange for exchange in self.exchanges if exchange.status >= 400]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        exchange = Exchange(request.method, request.path, dict(request.query), headers, body)
        self.exchanges.append(exchange)
        assert self._session is not None
        url = self.target.with_path(request.path).with_query(request.query)
        async with self._session.request(
            request.method, url, headers=headers, data=raw, allow_redirects=False
        ) as upstream:
            exchange.status = upstream.status
            out = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() not in HOP_HEADERS | {"content-encoding"}
            }
            response = web.StreamResponse(status=upstream.status, headers=out)
            await response.prepare(request)
            kept = bytearray()
            async for chunk in upstream.content.iter_any():
                if upstream.status >= 400:
                    kept.extend(chunk)
                await response.write(chunk)
            exchange.error = kept.decode("utf-8", "replace")[:2000]
            await response.write_eof()
            return response


def tool_kinds(body: Any) -> list[str]:
    """Return ``type:name`` of each tool a request body offers (for messages)."""
    tools = body.get("tools") if isinstance(body, dict) else None
    kinds = []
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict):
            name = tool.get("name") or (tool.get("function") or {}).get("name")
            kinds.append(f"{tool.get('type', '')}:{name}")
    return kinds


def describe_refused(recorder: Recorder) -> str:
    """Return the refused requests of a run, for an assertion message."""
    lines = []
    for exchange in recorder.refused():
        body = json.dumps(exchange.body)[:1500] if exchange.body is not None else ""
        lines.append(
            f"{exchange.method} {exchange.path} -> {exchange.status}: {exchange.error}\n  {body}"
        )
    return "\n".join(lines)


def write_fixture(
    agent: str, package: str, node_dir: Path, recorder: Recorder, scrub: dict[str, str]
) -> Path:
    """Keep the requests of a run as ``tests/fixtures/agents/<agent>.json``.

    ``scrub`` maps text of this run (its temporary paths) to stable stand-ins.
    """
    requests = [exchange.fixture() for exchange in recorder.exchanges]
    text = json.dumps(
        {
            "agent": agent,
            "package": f"{package}@{installed_version(package, node_dir)}",
            "requests": requests,
        },
        indent=1,
        ensure_ascii=False,
    )
    for value, stand_in in sorted(scrub.items(), key=lambda item: -len(item[0])):
        text = text.replace(value, stand_in)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{agent}.json"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def doc_section(page: str, title: str) -> str:
    """Return the text of the ``### title`` section of a page."""
    found = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^#{{2,3}} |\Z)", page, re.S | re.M)
    assert found, f"no section {title!r}"
    return found.group(1)


def doc_blocks(section: str, language: str) -> list[str]:
    """Return a section's code blocks in ``language``."""
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def doc_exports(block: str) -> dict[str, str]:
    """Return the variables a shell block exports (``export NAME=value`` lines)."""
    found = re.findall(r"^export ([A-Z_][A-Z0-9_]*)=(\S*)$", block, re.M)
    assert len(found) == len(block.strip().splitlines()), f"not only exports: {block!r}"
    return dict(found)
