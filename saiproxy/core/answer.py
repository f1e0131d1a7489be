"""SAI's text, piece by piece, as prose to relay now and tool calls at the end (docs/sai.md).

:class:`AnswerFilter` is a small state machine fed the answer's pieces as they
arrive. It relays prose at once and holds back only what might be the start
of something it must not relay as prose: a call block (``<tool_call>`` or the
``{"tool_calls": ...}`` object, bare or fenced), a stop sequence split across
two pieces, or a code fence around a JSON answer. A call block is buffered to
the end of the answer and then parsed; what does not parse is flushed as text,
with the reason reported. The same filter serves non-streamed answers (one
piece), so both paths behave the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from .bounds import MAX_ARGUMENT_DEPTH, depth_exceeds
from .conversation import Conversation, OutputFormat, Tool, ToolCall, new_call_id
from .prompt import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from .schemacheck import FENCED, SchemaChecker, strip_fence

__all__ = [
    "SCHEMA_CHECKER",
    "AnswerFilter",
    "OnRejected",
    "Rejected",
    "output_problem",
    "strip_fence",
]

_JSON_CALLS_KEY: Final = '"tool_calls"'
_JSON_CALLS_START: Final = re.compile(r'(?:```(?:json)?\s*)?\{\s*"tool_calls"\s*:')
_TAG_BLOCK: Final = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.S
)
_MARKER_WINDOW: Final = 80  # the longest tail that can still become a block start
_MARKER_CHARS: Final = frozenset("<{`")


@dataclass(frozen=True, slots=True)
class Rejected:
    """A call block left as text: a metric label and the detail for the log."""

    reason: str
    detail: str


OnRejected = Callable[[Rejected], None]


def _viable_brace(tail: str) -> bool:
    rest = tail[1:].lstrip()
    if len(rest) <= len(_JSON_CALLS_KEY):
        return _JSON_CALLS_KEY.startswith(rest)
    return rest.startswith(_JSON_CALLS_KEY) and not rest[len(_JSON_CALLS_KEY) :].strip()


def _viable_start(tail: str) -> bool:
    """Return whether ``tail`` (the end of the text so far) may grow into a block start."""
    first = tail[0]
    if first == "<":
        return TOOL_CALL_OPEN.startswith(tail)
    if first == "{":
        return _viable_brace(tail)
    ticks = len(tail) - len(tail.lstrip("`"))
    if ticks < 3:
        return ticks == len(tail)
    rest = tail[3:]
    if len(rest) < 4 and "json".startswith(rest):
        return True
    rest = rest.removeprefix("json").lstrip()
    return not rest or (rest[0] == "{" and _viable_brace(rest))


def _held_tail(text: str) -> int:
    """Return how many characters at the end of ``text`` may begin a call block."""
    window = max(0, len(text) - _MARKER_WINDOW)
    for index in range(window, len(text)):
        if text[index] in _MARKER_CHARS and _viable_start(text[index:]):
            return len(text) - index
    return 0


def _block_start(text: str) -> int:
    """Return where the first complete block start is in ``text``, or -1."""
    if "<" not in text and "{" not in text:
        return -1
    tag = text.find(TOOL_CALL_OPEN)
    found = _JSON_CALLS_START.search(text) if "{" in text else None
    if found is not None and (tag < 0 or found.start() < tag):
        return found.start()
    return tag


def _partial_stop(text: str, stop: str) -> int:
    """Return the length of the longest end of ``text`` that begins ``stop`` (not all of it).

    Only the places where ``stop``'s first character occurs are tried, from
    the longest possible end; each try is one C comparison, so a long piece
    costs its last ``len(stop)`` characters, not its length times the stop's.
    """
    first = stop[0]
    index = text.find(first, max(0, len(text) - len(stop) + 1))
    while index >= 0:
        if stop.startswith(text[index:]):
            return len(text) - index
        index = text.find(first, index + 1)
    return 0


class _CallParser:
    """Turns call blocks into ToolCalls, checking names and arguments against the offer."""

    def __init__(self, tools: dict[str, Tool], parallel: bool, rejected: OnRejected) -> None:
        self._tools = tools
        self._parallel = parallel
        self._rejected = rejected

    def call(self, name: Any, arguments: Any, raw_input: Any) -> ToolCall | Rejected:
        if not isinstance(name, str) or not name:
            return Rejected("bad_shape", "the call names no tool")
        tool = self._tools.get(name)
        if tool is None:
            return Rejected("unknown_tool", f"the tool {name[:100]!r} was not offered")
        if tool.kind == "custom":
            if isinstance(raw_input, str):
                return ToolCall(new_call_id(), name, "custom", input=raw_input, wire=tool.wire)
            if isinstance(arguments, str):
                return ToolCall(new_call_id(), name, "custom", input=arguments, wire=tool.wire)
            return Rejected("bad_arguments", f"the free-form tool {name!r} got no input text")
        if isinstance(arguments, str):
            try:
                arguments = orjson.loads(arguments)
            except orjson.JSONDecodeError:
                return Rejected("bad_arguments", f"the arguments of {name!r} are not JSON")
        if arguments is None and raw_input is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return Rejected("bad_arguments", f"the arguments of {name!r} are not a JSON object")
        if depth_exceeds(arguments, MAX_ARGUMENT_DEPTH):
            return Rejected(
                "bad_arguments",
                f"the arguments of {name!r} nest deeper than {MAX_ARGUMENT_DEPTH} levels",
            )
        arguments_json = orjson.dumps(arguments).decode()
        return ToolCall(new_call_id(), name, "function", arguments_json, wire=tool.wire)

    def tags(self, block: str) -> tuple[list[ToolCall], str]:
        """Parse ``<tool_call>`` blocks; return the calls and what stays text."""
        calls: list[ToolCall] = []
        text: list[str] = []
        end = 0
        for match in _TAG_BLOCK.finditer(block):
            if block[end : match.start()].strip():
                text.append(block[end : match.start()])
            end = match.end()
            outcome = self._tag(match.group(1))
            if isinstance(outcome, ToolCall) and calls and not self._parallel:
                outcome = Rejected("parallel_not_allowed", "parallel_tool_calls is false")
            if isinstance(outcome, Rejected):
                self._rejected(outcome)
                text.append(match.group(0))
            else:
                calls.append(outcome)
        rest = block[end:]
        if rest.strip():
            self._rejected(Rejected("unterminated", f"no {TOOL_CALL_CLOSE} closes the block"))
            text.append(rest)
        return calls, "\n".join(part.strip("\n") for part in text)

    def _tag(self, inner: str) -> ToolCall | Rejected:
        try:
            body = orjson.loads(inner)
        except orjson.JSONDecodeError as exc:
            return Rejected("bad_json", f"the block is not JSON ({exc})")
        if not isinstance(body, dict):
            return Rejected("bad_shape", "the block is not a JSON object")
        return self.call(body.get("name"), body.get("arguments"), body.get("input"))

    def json_object(self, block: str) -> list[ToolCall] | None:
        """Parse a final ``{"tool_calls": [...]}`` object, bare or fenced; None if it is not one."""
        fenced = FENCED.match(block)
        try:
            body = orjson.loads(fenced.group(1) if fenced else block)
        except orjson.JSONDecodeError as exc:
            self._rejected(Rejected("bad_json", f"the tool_calls object is not JSON ({exc})"))
            return None
        items = body.get("tool_calls") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            self._rejected(Rejected("bad_shape", "tool_calls is not a list of calls"))
            return None
        calls: list[ToolCall] = []
        for item in items:
            outcome = self._json_item(item)
            if isinstance(outcome, Rejected):
                self._rejected(outcome)
                return None
            calls.append(outcome)
        if len(calls) > 1 and not self._parallel:
            self._rejected(Rejected("parallel_not_allowed", "parallel_tool_calls is false"))
            return None
        return calls

    def _json_item(self, item: Any) -> ToolCall | Rejected:
        if not isinstance(item, dict):
            return Rejected("bad_shape", "a tool call is not an object")
        kind = item.get("type", "function")
        if kind == "custom":
            custom = item.get("custom")
            if not isinstance(custom, dict):
                return Rejected("bad_shape", "a custom call has no custom object")
            return self.call(custom.get("name"), None, custom.get("input"))
        if kind not in ("function", "function_call"):
            return Rejected("bad_shape", "a tool call has an unknown type")
        function = item.get("function", item)
        if not isinstance(function, dict):
            return Rejected("bad_shape", "a tool call has no function object")
        return self.call(function.get("name"), function.get("arguments"), function.get("input"))


class AnswerFilter:
    """Feed SAI's pieces in; get prose to relay now, and the calls once the answer ends."""

    def __init__(self, conversation: Conversation, rejected: OnRejected) -> None:
        tools = {tool.name: tool for tool in conversation.offered_tools}
        self._calls = _CallParser(tools, conversation.parallel_tool_calls, rejected)
        self._rejected = rejected
        self._watch = bool(tools)
        self._stops = tuple(stop for stop in conversation.stop if stop)
        self._fence = conversation.output is not None and not tools
        self._fence_state = "start" if self._fence else "off"  # start, body, off
        self._pending = ""  # prose that may still turn into a block start
        self._fence_tail = ""  # a possible closing fence
        self._block: str | None = None  # a call block, buffered to the end
        self._stop_tail = ""  # prose that may still turn into a stop sequence
        self.calls: list[ToolCall] = []
        self.stop_sequence: str | None = None

    @property
    def stopped(self) -> bool:
        """Return whether a stop sequence ended the answer."""
        return self.stop_sequence is not None

    def feed(self, piece: str) -> str:
        """Take the next piece of the answer; return the prose that can be relayed now."""
        if self.stopped:
            return ""
        if self._fence_state != "off":
            piece = self._strip_fence(piece)
            if not piece:
                return ""
        if not self._watch:
            return self._cut(piece)
        if self._block is not None:
            self._block += piece
            return self._check_block_end()
        return self._prose(self._pending + piece)

    def close(self) -> str:
        """End the answer; return the prose still held. ``calls`` holds the calls made."""
        if self.stopped:
            return ""
        text = self._pending
        self._pending = ""
        if self._fence_state == "start":
            text = self._fence_tail + text  # only blank space came: no fence
        # In the body, a held tail is blank space and backticks: the closing fence.
        if self._block is not None:
            block, self._block = self._block, None
            text += self._end_block(block)
        return self._cut(text) + self._release_stop_tail()

    # --- call blocks

    def _prose(self, text: str) -> str:
        start = _block_start(text)
        if start >= 0:
            self._pending = ""
            self._block = text[start:]
            prose = self._cut(text[:start])  # a stop sequence there drops the block
            return prose + (self._check_block_end() if self._block is not None else "")
        if "<" not in text and "{" not in text and "`" not in text:
            self._pending = ""  # the usual piece of prose: nothing to hold
            return self._cut(text) if self._stops else text
        keep = _held_tail(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return self._cut(text[: len(text) - keep])

    def _check_block_end(self) -> str:
        """Flush ``<tool_call>`` blocks that turn out not to end the answer."""
        block = self._block
        assert block is not None
        if not block.startswith(TOOL_CALL_OPEN):
            return ""  # the JSON object form is judged when the answer ends
        end = block.rfind(TOOL_CALL_CLOSE)
        if end < 0:
            return ""
        after = block[end + len(TOOL_CALL_CLOSE) :]
        rest = after.lstrip()
        if not rest or rest.startswith(TOOL_CALL_OPEN) or TOOL_CALL_OPEN.startswith(rest):
            return ""
        self._block = None
        self._rejected(Rejected("followed_by_text", "text follows the call blocks"))
        flushed = self._cut(block[: len(block) - len(after)])
        return flushed + (self._prose(after) if not self.stopped else "")

    def _end_block(self, block: str) -> str:
        if block.startswith(TOOL_CALL_OPEN):
            self.calls, text = self._calls.tags(block)
            return text
        calls = self._calls.json_object(block)
        if calls is None:
            return block
        self.calls = calls
        return ""

    # --- stop sequences

    def _cut(self, text: str) -> str:
        """Relay prose up to a stop sequence; hold back a tail that may start one."""
        if not self._stops or not text:
            return text
        text = self._stop_tail + text
        found = -1
        for stop in self._stops:
            index = text.find(stop)
            if index >= 0 and (found < 0 or index < found):
                found, self.stop_sequence = index, stop
        if found >= 0:
            self._stop_tail = ""
            self._pending = ""
            self._block = None  # call blocks after a stop sequence go with it
            return text[:found]
        keep = 0
        for stop in self._stops:
            keep = max(keep, _partial_stop(text, stop))
        self._stop_tail = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _release_stop_tail(self) -> str:
        tail, self._stop_tail = self._stop_tail, ""
        return tail

    # --- a code fence around a JSON answer

    def _strip_fence(self, piece: str) -> str:
        if self._fence_state == "start":
            text = self._fence_tail + piece
            head = text.lstrip()
            if not head or (len(head) < 3 and "```".startswith(head)):
                self._fence_tail = text
                return ""
            if not head.startswith("```"):
                self._fence_state, self._fence_tail = "off", ""
                return text
            newline = head.find("\n")
            if newline < 0:
                self._fence_tail = text
                return ""
            self._fence_state, self._fence_tail = "body", ""
            piece = head[newline + 1 :]
        # In the body: hold back a tail that may be the closing fence.
        text = self._fence_tail + piece
        stripped = text.rstrip(" \t\r\n`")
        tail = text[len(stripped) :]
        if "`" in tail:
            self._fence_tail = tail
            return stripped
        self._fence_tail = ""
        return text


async def output_problem(text: str, output: OutputFormat, checker: SchemaChecker) -> str | None:
    """Return why ``text`` is not the JSON the client asked for, or None when it is.

    Judged off the event loop (a long answer's fence, parse and schema check
    all take time): a judgement that does not come in time counts as passed
    (and is logged).
    """
    return await checker.problem(text, output.schema)


# The process's schema checker. Declared here, not in schemacheck.py: its child
# process runs that module and imports no aiohttp.
SCHEMA_CHECKER: Final = web.AppKey("schema_checker", SchemaChecker)
