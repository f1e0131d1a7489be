"""OpenAI legacy Completions: ``POST /v1/completions``, one choice per prompt, streamed or not.

A prompt is sent to SAI as the user text of a conversation of its own. Several
prompts are answered concurrently (:func:`~saiproxy.core.fanout.respond_all`);
streamed, their chunks interleave, each with its ``index``. ``suffix`` asks for
the middle between prompt and suffix (fill-in-the-middle) by instruction,
since SAI templates only take text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from ..base.errors import InvalidRequest, UpstreamError
from ..core.bodies import read_json
from ..core.conversation import Answer, Conversation, ToolCall, Turn, Usage
from ..core.exchange import Exchange
from ..core.fanout import respond_all
from ..core.sse import COMMENT_PING
from . import openai

__all__ = [
    "DONE",
    "FILL_INSTRUCTION",
    "FILL_MARKER",
    "MAX_PROMPTS",
    "USED_FIELDS",
    "ChoiceRenderer",
    "CompletionChoices",
    "CompletionRenderer",
    "Parsed",
    "completions",
    "parse",
]

DONE: Final = b"data: [DONE]\n\n"
USED_FIELDS: Final = frozenset(
    {"model", "prompt", "stream", "stream_options", "n", "best_of", "logprobs", "suffix", "echo",
     "stop", "metadata", "user"}
)  # fmt: skip
MAX_PROMPTS: Final = 16  # each prompt is a SAI call of its own, all at once
FILL_MARKER: Final = "{{FILL_HERE}}"
FILL_INSTRUCTION: Final = (
    "You fill in a gap in a text (fill-in-the-middle). The user's message is the "
    f"text with one gap, marked {FILL_MARKER}. Answer with only the text that "
    "replaces the marker, exactly as it should be inserted: do not repeat the text "
    "before or after the gap, do not explain, and do not wrap it in quotes or a "
    "code fence. If nothing belongs in the gap, answer with nothing."
)


async def completions(request: web.Request) -> web.StreamResponse:
    """Answer an OpenAI legacy completion: one SAI template execution per prompt."""
    body = await read_json(request)
    parsed = parse(body)
    openai.fields_ignored(body, USED_FIELDS)
    exchanges = [
        Exchange(request, body, conversation, protocol="completions")
        for conversation in parsed.conversations
    ]
    del body  # the exchanges let it go once parsed; a long stream need not keep it
    first = exchanges[0]
    echoes = parsed.prompts if parsed.echo else [""] * len(parsed.prompts)
    if len(exchanges) == 1:
        single = CompletionRenderer(
            f"cmpl-{first.ids}", first.created, echo=echoes[0], include_usage=parsed.include_usage
        )
        return await first.respond(single)
    several = CompletionChoices(
        f"cmpl-{first.ids}", first.created, echoes, include_usage=parsed.include_usage
    )
    return await respond_all(exchanges, several)


@dataclass(frozen=True, slots=True)
class Parsed:
    """A legacy completion request: a conversation per prompt, and how to render the answers."""

    prompts: list[str]
    conversations: list[Conversation]
    echo: bool
    include_usage: bool


def _prompts(value: Any) -> list[str]:
    if value is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            if len(value) > MAX_PROMPTS:
                raise InvalidRequest(
                    f"'prompt' takes at most {MAX_PROMPTS} prompts in one request", param="prompt"
                )
            return value
        if all(isinstance(item, (int, list)) and not isinstance(item, bool) for item in value):
            raise InvalidRequest(
                "'prompt' as token IDs is not supported: SAI templates take text; "
                "send the prompt as a string or an array of strings",
                param="prompt",
            )
    raise InvalidRequest(
        "'prompt' must be a string or a non-empty array of strings", param="prompt"
    )


def parse(body: Any) -> Parsed:
    """Validate a legacy completion body; return a conversation per prompt."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    prompts = _prompts(body.get("prompt"))
    for name in ("n", "best_of"):
        # Each would multiply the SAI calls of every prompt; SAI gives one answer a call.
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"'{name}' must be a positive integer", param=name)
        if value > 1:
            raise InvalidRequest(
                f"Only {name}=1 is supported: SAI returns one answer per prompt", param=name
            )
    if body.get("logprobs") is not None:
        raise InvalidRequest(
            "'logprobs' is not supported: SAI returns text without token probabilities",
            param="logprobs",
        )
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise InvalidRequest("'suffix' must be a string", param="suffix")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    include_usage = bool(options.get("include_usage")) if options else False
    model = openai.model_name(body)
    stream = openai.flag(body, "stream")
    stop = openai.stop_sequences(body.get("stop"))
    echo = openai.flag(body, "echo")
    conversations = [
        Conversation(
            [Turn("user", prompt if suffix is None else f"{prompt}{FILL_MARKER}{suffix}")],
            system="" if suffix is None else FILL_INSTRUCTION,
            model=model,
            stream=stream,
            stop=stop,
        )
        for prompt in prompts
    ]
    return Parsed(prompts, conversations, echo, include_usage)


def _choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}


class ChoiceRenderer:
    """Renders one choice's ``text_completion`` chunks; its finish ends the choice only."""

    eager = False

    def __init__(self, completion_id: str, created: int, *, index: int = 0, echo: str = "") -> None:
        self._id = completion_id
        self._created = created
        self._index = index
        self._echo = echo
        self._prefix = b""
        self._tail = b',"index":' + str(index).encode() + b',"logprobs":null,"finish_reason":'

    def body(self, answer: Answer) -> dict[str, Any]:
        return _completion(self._id, self._created, [answer], [self._echo])

    # Every chunk is the same object with a different text: the constant head is
    # serialised once per stream and spliced, instead of once per piece.
    def _frame(self, text: str, finish: str | None) -> bytes:
        return (
            self._prefix
            + b'[{"text":'
            + orjson.dumps(text)
            + self._tail
            + orjson.dumps(finish)
            + b"}]}\n\n"
        )

    def head(self, model: str) -> bytes:
        self._prefix = openai.stream_prefix(self._id, "text_completion", self._created, model)
        # Legacy completions have no opening chunk; with echo the first one is the prompt.
        return self._frame(self._echo, None) if self._echo else b""

    def ping(self) -> bytes:
        return COMMENT_PING

    def text(self, piece: str) -> bytes:
        return self._frame(piece, None)

    def calls(self, calls: Sequence[ToolCall]) -> bytes:
        return b""  # no tools are offered to a legacy completion

    def finish(self, answer: Answer) -> bytes:
        return self._frame("", openai.FINISH_REASONS[answer.finish])

    def failure(self, error: UpstreamError) -> bytes:
        return b"data: " + orjson.dumps(error.body()) + b"\n\n" + DONE


class CompletionRenderer(ChoiceRenderer):
    """Renders a one-prompt completion: the choice, then usage and ``[DONE]``."""

    def __init__(
        self, completion_id: str, created: int, *, echo: str = "", include_usage: bool = False
    ) -> None:
        super().__init__(completion_id, created, echo=echo)
        self._include_usage = include_usage

    def finish(self, answer: Answer) -> bytes:
        frames = super().finish(answer)
        if self._include_usage:
            frames += _usage_frame(self._id, self._created, answer.model, answer.usage)
        return frames + DONE


class CompletionChoices:
    """Renders the completions of several prompts as one object or one stream."""

    def __init__(
        self, completion_id: str, created: int, echoes: Sequence[str], *, include_usage: bool
    ) -> None:
        self._id = completion_id
        self._created = created
        self._echoes = echoes
        self._include_usage = include_usage

    def choice(self, index: int) -> ChoiceRenderer:
        return ChoiceRenderer(self._id, self._created, index=index, echo=self._echoes[index])

    def body(self, answers: Sequence[Answer]) -> dict[str, Any]:
        return _completion(self._id, self._created, answers, self._echoes)

    def finish(self, answers: Sequence[Answer]) -> bytes:
        if not self._include_usage:
            return DONE
        model = answers[0].model if answers else ""
        return _usage_frame(self._id, self._created, model, _total(answers)) + DONE


def _total(answers: Sequence[Answer]) -> Usage:
    return Usage(
        sum(answer.usage.prompt_tokens for answer in answers),
        sum(answer.usage.completion_tokens for answer in answers),
    )


def _completion(
    completion_id: str, created: int, answers: Sequence[Answer], echoes: Sequence[str]
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": answers[0].model,
        "choices": [
            _choice(index, echo + answer.text, openai.FINISH_REASONS[answer.finish])
            for index, (answer, echo) in enumerate(zip(answers, echoes, strict=True))
        ],
        "usage": openai.usage(_total(answers)),
    }


def _usage_frame(completion_id: str, created: int, model: str, usage: Usage) -> bytes:
    chunk = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": openai.usage(usage),
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
