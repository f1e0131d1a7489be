"""The demo upstream of ``saiproxy --demo``: the fake SAI with scripted outcomes.

It answers by echoing the user's words, dripped word by word. A user message
starting with one of the magic values below gets that outcome instead, so
every example in the README runs with no SAI at all (docs/demo.md lists them
with the commands).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from .fake_sai import FakeSai, Received, Reply

__all__ = [
    "DEMO_COOKIE",
    "DEMO_KEY",
    "DEMO_TEMPLATE",
    "HANG_SECONDS",
    "MAGIC",
    "PREFIX",
    "WORD_DELAY",
    "demo_answer",
    "demo_sai",
    "start_demo_upstream",
]

DEMO_KEY: Final = "demo-key"
DEMO_COOKIE: Final = "demo-session=1; Cookies=demo"
DEMO_TEMPLATE: Final = "demo-template"
WORD_DELAY: Final = 0.05
PREFIX: Final = "demo:"
# SAI's answer headers: token counts and the model that answered.
_HEADERS: Final = {"Content-Type": "text/plain; charset=utf-8"}
# Long enough for any REQUEST_TIMEOUT a demo uses (the proxy gives up first).
HANG_SECONDS: Final = 3600.0

# What each magic value does, for the help text and docs/demo.md.
MAGIC: Final = {
    "demo:401": "SAI rejects the credential (401); so does any key but the demo's",
    "demo:429": "SAI rate-limits every credential (429, Retry-After: 7)",
    "demo:fallback": "SAI rate-limits an API key but answers a cookie: the SAI_COOKIE fallback",
    "demo:500": "SAI fails (500): upstream_error, not retried",
    "demo:503": "SAI is unavailable (503): retried MAX_RETRIES times, then upstream_error",
    "demo:long": "SAI says the prompt is too long: context_length_exceeded",
    "demo:timeout": "SAI never answers: upstream_timeout after REQUEST_TIMEOUT",
    "demo:slow": "SAI waits 5 s before answering: streams show ': ping' comments",
    "demo:break": "SAI's body breaks off after three words: an in-band error",
    "demo:tool": "SAI calls the first tool the request offers",
}


def _words(text: str, call: Received, status: int = 200, **extra: Any) -> Reply:
    words = text.split(" ")
    pieces: list[str | bytes] = [w if i == 0 else " " + w for i, w in enumerate(words)]
    headers = {
        **_HEADERS,
        "prompttokens": str(max(1, len(call.user) // 4)),
        "completiontokens": str(len(words)),
        "model": call.query.get("modelOverride", "sai-demo"),
    }
    return Reply(status=status, body=pieces, headers=headers, chunk_delay=WORD_DELAY, **extra)


def _echo(call: Received) -> Reply:
    history = call.json.get("chatMessages", []) if isinstance(call.json, dict) else []
    template = call.path.split("/")[-2]
    return _words(
        f"Hello from the saiproxy demo upstream! You said: {call.user!r} "
        f"({len(history)} message(s) in the history, template {template}).",
        call,
    )


def _tool_call(call: Received) -> Reply:
    """Call the first offered tool, with a sample value for each declared argument."""
    inputs = call.json.get("inputs", {}) if isinstance(call.json, dict) else {}
    tools = orjson.loads(inputs["tools"]) if inputs.get("tools") else []
    if not tools:
        return _words("demo:tool needs a request that offers tools.", call)
    tool = tools[0]
    if tool.get("type") == "custom":
        body: dict[str, Any] = {"name": tool["custom"]["name"], "input": "demo input"}
    else:
        function = tool["function"]
        properties = (function.get("parameters") or {}).get("properties") or {}
        samples = {"string": "demo", "integer": 1, "number": 1.5, "boolean": True}
        arguments = {name: samples.get(spec.get("type")) for name, spec in properties.items()}
        body = {"name": function["name"], "arguments": arguments}
    block = "<tool_call>" + orjson.dumps(body).decode() + "</tool_call>"
    return Reply(body=block, headers=_HEADERS)


def demo_answer(call: Received) -> Reply:
    """Return the demo's reply to one call: a magic value's outcome, else the echo."""
    magic = call.user.split(maxsplit=1)[0] if call.user.startswith(PREFIX) else ""
    kind, value = call.auth
    if magic == "demo:429" or (magic == "demo:fallback" and kind == "X-Api-Key"):
        return Reply(status=429, body="too many requests", headers={"Retry-After": "7"})
    if magic == "demo:500":
        return Reply(status=500, body="internal error")
    if magic == "demo:503":
        return Reply(status=503, body="service unavailable")
    if magic == "demo:long":
        return Reply(status=500, body='{"error": "prompt is too long: 210000 tokens > 200000"}')
    if magic == "demo:timeout":
        return Reply(delay=HANG_SECONDS)
    if magic == "demo:slow":
        return _words("Sorry for the wait: here is the answer.", call, delay=5.0)
    if magic == "demo:break":
        return _words("This answer breaks off here and never ends.", call, reset_after=3)
    # Like SAI, only a known key or a session cookie gets an answer: a user's
    # own key (any other value) is rejected, as is everything with demo:401.
    if magic == "demo:401" or (kind == "X-Api-Key" and value != DEMO_KEY) or not value:
        return Reply(status=401, body="invalid api key")
    if magic == "demo:tool":
        return _tool_call(call)
    return _echo(call)


def demo_sai() -> FakeSai:
    """Return the demo upstream; it records nothing (it may run for days)."""
    return FakeSai(answer=demo_answer, record=False)


async def start_demo_upstream() -> tuple[FakeSai, str]:
    """Start the demo upstream on a free loopback port; return it and its URL."""
    sai = demo_sai()
    return sai, await sai.start()
