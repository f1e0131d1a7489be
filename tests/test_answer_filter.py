"""The incremental answer filter (docs/sai.md): every split point of an answer gives one result."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from saiproxy.core import schemacheck
from saiproxy.core.answer import AnswerFilter, Rejected, output_problem, strip_fence
from saiproxy.core.conversation import Conversation, OutputFormat, Tool, ToolChoice, Turn
from saiproxy.core.schemacheck import SchemaChecker

from .conftest import MakeProxy, chat
from .paced import Paced, PacedSai, paced_sai

WEATHER = Tool("get_weather", "Weather of a city", "function", {"type": "object"})
PATCH = Tool("apply_patch", "Apply a patch", "custom")


def _conversation(**extra: Any) -> Conversation:
    extra.setdefault("tools", (WEATHER, PATCH))
    return Conversation([Turn("user", "hi")], **extra)


def _run(pieces: list[str], **extra: Any) -> tuple[str, list[Any], list[str], AnswerFilter]:
    rejected: list[Rejected] = []
    answer_filter = AnswerFilter(_conversation(**extra), rejected.append)
    out = []
    for piece in pieces:
        out.append(answer_filter.feed(piece))
        if answer_filter.stopped:
            break
    out.append(answer_filter.close())
    calls = [(c.name, c.kind, orjson.loads(c.arguments) if c.kind == "function" else c.input)
             for c in answer_filter.calls]  # fmt: skip
    return "".join(out), calls, [r.reason for r in rejected], answer_filter


def _splits(text: str, parts: int) -> list[list[str]]:
    """Every way to cut ``text`` into ``parts`` pieces (parts 2: every byte; 3: a sample)."""
    points = range(1, len(text))
    combos = itertools.combinations(points, parts - 1)
    if parts > 2:
        combos = itertools.islice(combos, 0, None, 7)  # a spread sample keeps this fast
    result = []
    for cut in combos:
        bounds = [0, *cut, len(text)]
        result.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return result


TAGGED = (
    'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Quito"}}</tool_call>'
    '\n<tool_call>{"name": "apply_patch", "input": "*** Begin Patch\\n"}</tool_call>\n'
)
FORK_FENCED = (
    'Checking.\n```json\n{"tool_calls": [{"type": "function", "function": '
    '{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}}]}\n```'
)
FORK_BARE = '{"tool_calls": [{"type": "function_call", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}'  # noqa: E501
EXAMPLE_IN_PROSE = (
    'Use JSON like this:\n```json\n{"tool_calls": []}\n```\nand then <b>bold</b> text '
    "with {braces} and `ticks`."
)


@pytest.mark.parametrize(
    ("answer", "prose", "calls", "rejected"),
    [
        (TAGGED, "Let me check. ",
         [("get_weather", "function", {"city": "Quito"}),
          ("apply_patch", "custom", "*** Begin Patch\n")], []),
        (FORK_FENCED, "Checking.\n", [("get_weather", "function", {"city": "Lima"})], []),
        (FORK_BARE, "", [("get_weather", "function", {"city": "Oslo"})], []),
        (EXAMPLE_IN_PROSE, EXAMPLE_IN_PROSE, [], ["bad_json"]),
    ],
)  # fmt: skip
def test_every_split_point_gives_the_same_answer(
    answer: str, prose: str, calls: list[Any], rejected: list[str]
) -> None:
    assert _run([answer])[:3] == (prose, calls, rejected)
    for parts in (2, 3):
        for pieces in _splits(answer, parts):
            assert _run(pieces)[:3] == (prose, calls, rejected), pieces


def test_prose_is_relayed_at_once_and_only_a_possible_block_start_is_held() -> None:
    answer_filter = AnswerFilter(_conversation(), lambda r: None)
    assert answer_filter.feed("Hello ") == "Hello "
    assert answer_filter.feed("a < b and {x} ") == "a < b and {x} "
    assert answer_filter.feed("now <tool") == "now "  # could be a block: held
    assert answer_filter.feed("tip>") == "<tooltip>"  # was not
    assert answer_filter.feed(' {"tool_') == " "
    assert answer_filter.feed('names": 1}') == '{"tool_names": 1}'
    assert answer_filter.close() == ""


def test_a_block_followed_by_prose_is_flushed_without_waiting_for_the_end() -> None:
    rejected: list[Rejected] = []
    answer_filter = AnswerFilter(_conversation(), rejected.append)
    block = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert answer_filter.feed("See " + block) == "See "
    assert answer_filter.feed(" as an example.") == block + " as an example."
    assert [r.reason for r in rejected] == ["followed_by_text"]
    assert answer_filter.close() == "" and answer_filter.calls == []


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "unknown_tool"),
        ('<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', "bad_arguments"),
        ('<tool_call>{"name": "get_weather", "arguments": "{oops"}</tool_call>', "bad_arguments"),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', "bad_json"),
        ('<tool_call>{"name": "get_weather", "arguments": {}}', "unterminated"),
        ('{"tool_calls": [{"function": {"name": "nope", "arguments": {}}}]}', "unknown_tool"),
        ('{"tool_calls": "soon"}', "bad_shape"),
    ],
)
def test_unrecognised_blocks_stay_text_with_a_reason(block: str, reason: str) -> None:
    prose, calls, rejected, _ = _run(["Sure. ", block])
    assert calls == [] and rejected == [reason]
    assert prose == "Sure. " + block


def test_a_valid_and_an_invalid_block_keep_the_valid_call() -> None:
    good = '<tool_call>{"name": "get_weather", "arguments": {"city": "Quito"}}</tool_call>'
    bad = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    prose, calls, rejected, _ = _run([good + "\n" + bad])
    assert calls == [("get_weather", "function", {"city": "Quito"})]
    assert prose == bad and rejected == ["unknown_tool"]


def test_parallel_false_keeps_the_first_call() -> None:
    two = '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>' * 2
    prose, calls, rejected, _ = _run([two], parallel_tool_calls=False)
    assert calls == [("get_weather", "function", {"city": "A"})]
    assert rejected == ["parallel_not_allowed"] and "get_weather" in prose


def test_a_named_tool_choice_offers_that_tool_alone() -> None:
    block = '<tool_call>{"name": "apply_patch", "input": "x"}</tool_call>'
    _, calls, rejected, _ = _run([block], tool_choice=ToolChoice("named", "get_weather"))
    assert calls == [] and rejected == ["unknown_tool"]


def test_no_tools_offered_means_no_blocks_are_parsed() -> None:
    prose, calls, _, _ = _run([TAGGED], tool_choice=ToolChoice("none"))
    assert prose == TAGGED and calls == []


@pytest.mark.parametrize("answer", ["Hello. STOP here", "Hello. ST", "Hello."])
def test_stop_sequences_cut_at_every_split_point(answer: str) -> None:
    expected = "Hello. " if "STOP" in answer else answer
    for pieces in [[answer], *_splits(answer, 2), *_splits(answer, 3)]:
        prose, _, _, answer_filter = _run(pieces, tools=(), stop=("STOP", "never"))
        assert prose == expected, pieces
        assert answer_filter.stop_sequence == ("STOP" if "STOP" in answer else None)


def test_a_stop_sequence_before_a_call_drops_the_call() -> None:
    answer = "Done.\n\n<tool_call>" + '{"name": "get_weather", "arguments": {}}</tool_call>'
    prose, calls, _, answer_filter = _run([answer], stop=("\n\n",))
    assert prose == "Done." and calls == [] and answer_filter.stop_sequence == "\n\n"


def test_stop_sequences_inside_a_call_block_do_not_count() -> None:
    answer = 'Ok <tool_call>{"name": "get_weather", "arguments": {"city": "END"}}</tool_call>'
    prose, calls, _, answer_filter = _run([answer], stop=("END",))
    assert prose == "Ok " and len(calls) == 1 and answer_filter.stop_sequence is None


@pytest.mark.parametrize(
    "answer", ['```json\n{"a": 1}\n```', '  ```\n{"a": 1}\n```\n', '{"a": 1}', '\n{"a": "`x`"}']
)
def test_a_json_answer_loses_its_code_fence_at_every_split_point(answer: str) -> None:
    expected = strip_fence(answer)
    for pieces in [[answer], *_splits(answer, 2)]:
        prose, _, _, _ = _run(pieces, tools=(), output=OutputFormat())
        assert prose.strip() == expected, pieces


async def test_check_json_against_a_schema() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    output = OutputFormat(schema, "count")
    checker = SchemaChecker(timeout=20)
    try:
        assert await output_problem('```json\n{"n": 3}\n```', output, checker) is None
        assert "not valid JSON" in (await output_problem("three", output, checker) or "")
        assert "schema at n" in (await output_problem('{"n": "3"}', output, checker) or "")
        assert await output_problem("[1]", OutputFormat(), checker) == (
            "the answer is not a JSON object"
        )
        assert await output_problem('{"n": 1}', OutputFormat(), checker) is None
    finally:
        await checker.close()


@pytest.mark.parametrize(
    ("schema", "value", "valid"),
    [
        ({"$ref": "#/$defs/n", "$defs": {"n": {"type": "integer"}}}, 3, True),
        ({"$ref": "#/$defs/n", "$defs": {"n": {"type": "integer"}}}, "3", False),
        ({"$ref": "http://127.0.0.1:9/x"}, 3, None),  # never fetched: not checked
        ({"$ref": "#/nowhere"}, 3, None),
        ({"type": "object", "properties": {"a": {"$ref": "#"}}}, {"a": {"a": {}}}, True),
        ({"type": "string", "pattern": "^a+$"}, "aaa", True),
        ({"type": "array", "uniqueItems": True}, [1, 1], False),
        ({"enum": list(range(5_000))}, 4_999, True),
        ({"type": 5}, 1, None),  # not a schema: not checked
    ],
)
def test_schema_checks_resolve_inside_the_schema_only(
    schema: dict[str, Any], value: Any, valid: bool | None
) -> None:
    reply = schemacheck.check(schema, value)
    if valid is None:
        assert isinstance(reply, dict) and "unchecked" in reply
    else:
        assert (reply is None) is valid, reply


@pytest.fixture
async def paced() -> AsyncIterator[PacedSai]:
    async with paced_sai() as sai:
        yield sai


async def _first_content(response: Any) -> tuple[str, bytes]:
    """Read a chat stream up to its first frame with text; return the text and all read."""
    read = b""
    while True:
        block = await response.content.readuntil(b"\n\n")
        read += block
        if block.startswith(b"data: {"):
            choices = orjson.loads(block[len(b"data: ") :])["choices"]
            text = choices[0]["delta"].get("content") if choices else None
            if text:
                return text, read


def _contents(raw: bytes) -> str:
    frames = [orjson.loads(b[6:]) for b in raw.split(b"\n\n") if b.startswith(b"data: {")]
    return "".join(f["choices"][0]["delta"].get("content") or "" for f in frames if f["choices"])


async def test_a_piece_is_held_back_only_where_it_may_begin_a_stop(
    make_proxy: MakeProxy, paced: PacedSai
) -> None:
    """While SAI holds its next piece, the client has all of this one but its longest end
    that begins a stop sequence (the end is searched for fast; it must find what a naive
    search finds)."""

    def naive(text: str, stop: str) -> int:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                return size
        return 0

    proxy = await make_proxy(SAI_URL=paced.url)
    for text in ("", "a", "xab", "abab", "aaaa", "ab" * 50 + "a"):
        for stop in ("ab", "aab", "abab", "aaaab", "ba", "x" * 3, "ab" * 30 + "c"):
            if stop in text:
                continue  # cut there: what might begin it later does not matter
            # "Z" and "!" are in no stop: the first frame is never empty, the end breaks
            # every partial stop.
            seen = paced.gate(f"{text!r} seen with {stop!r}")
            paced.default = Paced(("Z" + text, seen, "!"))
            body = chat(("user", "hi"), stop=[stop], stream=True)
            response = await proxy.post("/v1/chat/completions", json=body)
            first, read = await _first_content(response)
            seen.open()
            raw = read + await response.read()
            assert first == "Z" + text[: len(text) - naive(text, stop)], (text, stop)
            assert _contents(raw) == "Z" + text + "!", (text, stop)
    assert not any(event[0] == "gave up" for event in paced.events)
