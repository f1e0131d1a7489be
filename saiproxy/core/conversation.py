"""The neutral conversation every protocol adapter parses into, and the answer it renders."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = [
    "AUTO",
    "MAX_CONTENT_PARTS",
    "MAX_MESSAGES",
    "PLUGIN_MARKER",
    "PLUGIN_PREFIX",
    "Answer",
    "Conversation",
    "Finish",
    "OutputFormat",
    "Role",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolKind",
    "Turn",
    "Usage",
    "check_count",
    "new_call_id",
    "unwrap_plugin",
]

Role = Literal["system", "user", "assistant", "tool"]
ToolKind = Literal["function", "custom"]
Finish = Literal["stop", "length", "tool_calls", "stop_sequence"]

PLUGIN_PREFIX: Final = (
    "Determine if the following context is required to solve the task "
    "in the user's input in the chat session: \""
)
PLUGIN_MARKER: Final = '"\nContext:'
# What one request may carry: far above any real conversation, far below what
# fills memory (300,000 tiny messages in an 8 MiB body took ~70 MB to hold).
MAX_MESSAGES: Final = 10_000
MAX_CONTENT_PARTS: Final = 1_000


def check_count(items: list[Any], limit: int, param: str, what: str) -> None:
    """Refuse a list longer than ``limit`` with a 400 that names the limit."""
    if len(items) > limit:
        from ..base.errors import InvalidRequest

        raise InvalidRequest(
            f"'{param}' has {len(items)} {what}; saiproxy takes at most {limit}", param=param
        )


def unwrap_plugin(content: str) -> str | None:
    """Return the user's own words from an IDE-plugin wrapper, or None if not wrapped."""
    if not content.startswith(PLUGIN_PREFIX):
        return None
    end = content.find(PLUGIN_MARKER, len(PLUGIN_PREFIX))
    if end < 0:
        return None
    return content[len(PLUGIN_PREFIX) : end]


def new_call_id() -> str:
    """Return a fresh tool-call ID suffix; adapters add their protocol's prefix."""
    return secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model made: a function call with JSON arguments, or free-form input."""

    id: str
    name: str
    kind: ToolKind = "function"
    arguments: str = "{}"  # JSON text of an object (function tools)
    input: str = ""  # raw text (custom tools)
    # (namespace, name) of a tool the client offered inside a namespace (the
    # Responses API's namespace tools); ``name`` is then the flat name SAI sees.
    wire: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of the history, reduced to what SAI can be told."""

    role: Role
    text: str
    calls: tuple[ToolCall, ...] = ()  # assistant turns that called tools
    call_id: str | None = None  # tool results: the call they answer
    name: str | None = None  # tool results: the tool's name, when the client says it


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool the client offers: a function with a JSON schema, or a free-form tool."""

    name: str
    description: str = ""
    kind: ToolKind = "function"
    parameters: dict[str, Any] | None = None  # JSON schema (function tools)
    format: dict[str, Any] | None = None  # grammar or text format (custom tools)
    wire: tuple[str, str] | None = None  # (namespace, name) when offered in a namespace


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """``auto``, ``none``, ``required``, or one named tool."""

    mode: Literal["auto", "none", "required", "named"] = "auto"
    name: str | None = None


# The usual choice, made once (a ToolChoice is frozen): most requests take it.
AUTO: Final = ToolChoice()


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """Structured output: any JSON object, or one that follows a schema."""

    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool = False


@dataclass(slots=True)
class Conversation:
    """What a client asked for, in no protocol's shape."""

    turns: list[Turn]
    system: str = ""
    model: str | None = None
    stream: bool = False
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = AUTO
    parallel_tool_calls: bool = True
    output: OutputFormat | None = None
    stop: tuple[str, ...] = ()
    unwrapped: int = 0
    unwrapped_chars_before: int = 0
    unwrapped_chars_after: int = 0

    def __post_init__(self) -> None:
        # IDE plugins wrap the user's words in an instruction of their own; SAI
        # gets the words. Done before anything is counted.
        for index, turn in enumerate(self.turns):
            original = unwrap_plugin(turn.text)
            if original is not None:
                self.unwrapped += 1
                self.unwrapped_chars_before += len(turn.text)
                self.unwrapped_chars_after += len(original)
                self.turns[index] = Turn(turn.role, original, turn.calls, turn.call_id, turn.name)

    @property
    def offered_tools(self) -> tuple[Tool, ...]:
        """Return the tools SAI is told about: none for ``none``, one for a named choice."""
        choice = self.tool_choice
        if choice.mode == "none":
            return ()
        if choice.mode == "named":
            return tuple(tool for tool in self.tools if tool.name == choice.name)
        return self.tools

    def role_counts(self) -> dict[str, int]:
        """Return how many turns each role has."""
        counts: dict[str, int] = {}
        for turn in self.turns:
            counts[turn.role] = counts.get(turn.role, 0) + 1
        return counts


@dataclass(slots=True)
class Usage:
    """Token counts of one answer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Return prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Answer:
    """A finished answer in no protocol's shape.

    ``outcome`` is ``ok`` or the error code of an upstream failure explained
    in ``text`` (``message`` error mode).
    """

    text: str
    model: str
    finish: Finish = "stop"
    calls: list[ToolCall] = field(default_factory=list)
    stop_sequence: str | None = None
    usage: Usage = field(default_factory=Usage)
    outcome: str = "ok"
