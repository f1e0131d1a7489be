"""OpenAI Responses: ``POST /v1/responses``, streamed or not, with function and custom tools.

What Codex CLI, the OpenAI Agents SDK and the SDKs' ``client.responses`` speak.
What is stored and continued (``store``, ``previous_response_id``,
``conversation``, ``item_reference`` to a stored item) is :mod:`.stored`'s;
compaction (a ``compaction_trigger`` item, a ``compaction`` item sent back)
is :mod:`.compaction`'s;
``background`` is :mod:`.background`'s; stored prompts are refused with a
400 that names them;
hosted tools are left out of the prompt (logged), tools offered inside a
namespace become tools of their own, and an ``item_reference`` found neither
in the request nor in the store is skipped. The stream opens at once
(``response.created``, ``response.in_progress``) and then follows SAI: each
output item gets its own increasing ``output_index``; the answer ends with
``response.completed`` carrying the whole Response, or ``response.failed``
with an error code Codex maps (``context_length_exceeded``,
``rate_limit_exceeded`` with "try again in N s", ``server_error``).
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Final

import orjson
from aiohttp import web

from ..base.errors import ContextTooLong, InvalidRequest, UpstreamError, UpstreamRateLimited
from ..core.conversation import (
    MAX_MESSAGES,
    Answer,
    Conversation,
    ToolCall,
    Turn,
    Usage,
    check_count,
)
from ..core.exchange import Exchange
from ..core.prompt import estimate_tokens, sai_payload
from ..core.sse import COMMENT_PING
from ..state.store import new_id
from ..web.bodies import json_response, read_json
from . import compaction, openai
from .stored import Continuation, continuation

__all__ = [
    "ECHOED",
    "STATEFUL_FIELDS",
    "SYSTEM_ROLES",
    "USED_FIELDS",
    "ResponsesRenderer",
    "error_object",
    "input_tokens",
    "parse",
    "responses",
    "usage",
]

log = logging.getLogger("saiproxy.protocols")
SYSTEM_ROLES: Final = frozenset({"system", "developer"})
# Present and not null, these need state saiproxy does not keep.
STATEFUL_FIELDS: Final = {
    "prompt": "stored prompt templates are not supported: send 'instructions' and 'input'",
}
# Settings echoed in the Response object as the client sent them (or these defaults).
ECHOED: Final[dict[str, Any]] = {
    "max_output_tokens": None,
    "max_tool_calls": None,
    "prompt_cache_key": None,
    "safety_identifier": None,
    "service_tier": "default",
    "temperature": 1.0,
    "top_logprobs": 0,
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
}
# The top-level fields saiproxy reads, or echoes in the Response.
USED_FIELDS: Final = frozenset(
    {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
     "stream", "metadata", "store", "reasoning", "background", "previous_response_id",
     "conversation", *STATEFUL_FIELDS, *ECHOED}
)  # fmt: skip


async def responses(request: web.Request) -> web.StreamResponse:
    """Answer an OpenAI Responses call from a SAI template execution."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    found = await continuation(request, body)
    whole = await compaction.expand(request, body, found.input)
    if compaction.triggered(whole):
        return await compaction.respond(request, body, whole)
    conversation, echo = parse(
        {**body, "input": whole} if found.state or whole is not found.input else body
    )
    echo["previous_response_id"] = found.previous
    echo["conversation"] = {"id": found.conversation} if found.conversation else None
    openai.fields_ignored(body, USED_FIELDS, request.headers.get("OpenAI-Beta"))
    if body.get("background") is True:
        from . import background  # it imports this module

        return await background.start(request, body, found, conversation, echo)
    exchange = Exchange(request, body, conversation, protocol="responses")
    del body  # the exchange lets it go once parsed; a long stream need not keep it
    kept = found if found.keeps else None
    renderer = ResponsesRenderer(exchange.ids, exchange.created, echo, kept)
    response = await exchange.respond(renderer)
    if renderer.completed is not None:  # not streamed: kept before the answer goes out
        await found.keep(renderer.completed)
    return response


# --- the request


def _text(value: Any, param: str) -> str:
    """Return a tool output or message content: a string or an array of text parts."""
    return openai.content_text(value, param)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}.{key} is required and must be a string", param=where)
    return value


def _with_call(turns: list[Turn], call: ToolCall) -> None:
    """Attach a call to the assistant turn just before it, or open one."""
    if turns and turns[-1].role == "assistant":
        last = turns[-1]
        turns[-1] = Turn("assistant", last.text, (*last.calls, call))
    else:
        turns.append(Turn("assistant", "", (call,)))


def _call_name(item: dict[str, Any], where: str) -> str:
    """Return a call's tool name as SAI knows it: flat, when the tool sits in a namespace."""
    name = _string(item, "name", where)
    namespace = item.get("namespace")
    return openai.flat_name(namespace, name) if isinstance(namespace, str) else name


def _item_turn(turns: list[Turn], item: dict[str, Any], where: str) -> None:
    """Add one input item to ``turns``; an item SAI could not use is left out."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise InvalidRequest(
                f"{where}.role must be user, assistant, system or developer",
                param=f"{where}.role",
            )
        text = _text(item.get("content"), f"{where}.content")
        turns.append(Turn("system" if role in SYSTEM_ROLES else role, text))
    elif kind == "function_call":
        arguments = item.get("arguments")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments if arguments is not None else {}).decode()
        call_id, name = _string(item, "call_id", where), _call_name(item, where)
        _with_call(turns, ToolCall(call_id, name, "function", arguments))
    elif kind == "custom_tool_call":
        call_id = _string(item, "call_id", where)
        raw_input = item.get("input")
        _with_call(
            turns,
            ToolCall(call_id, _call_name(item, where), "custom",
                     input=raw_input if isinstance(raw_input, str) else ""),
        )  # fmt: skip
    elif kind == "additional_tools":
        pass  # offered tools (see _offered_tools), not a turn
    elif kind in ("function_call_output", "custom_tool_call_output"):
        output = _text(item.get("output"), f"{where}.output")
        turns.append(Turn("tool", output, call_id=_string(item, "call_id", where)))
    else:
        # Reasoning, the calls and results of hosted tools, and types saiproxy
        # does not know: nothing SAI could act on.
        openai.ignored(where, kind)


def _turns(raw: Any) -> list[Turn]:
    if isinstance(raw, str):
        return [Turn("user", raw)]
    if not isinstance(raw, list):
        raise InvalidRequest("'input' must be a string or an array of input items", param="input")
    check_count(raw, MAX_MESSAGES, "input", "items")
    turns: list[Turn] = []
    by_id: dict[str, dict[str, Any]] | None = None
    for index, item in enumerate(raw):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        if item.get("type") == "item_reference":
            if by_id is None:
                by_id = {
                    entry["id"]: entry
                    for entry in raw
                    if isinstance(entry, dict)
                    and isinstance(entry.get("id"), str)
                    and entry.get("type") != "item_reference"
                }
            ref = item.get("id")
            found = by_id.get(ref) if isinstance(ref, str) else None
            if found is None:
                # It points at a stored item (saiproxy stores none): left out.
                log.info(
                    "item reference not in the request, skipped",
                    extra={"where": where, "id": ref[:80] if isinstance(ref, str) else None},
                )
                continue
            item = found
        _item_turn(turns, item, where)
    return turns


def _offered_tools(tools: Any, raw_input: Any) -> Any:
    """Return the offered tools: ``tools``, then those of ``additional_tools`` input items.

    Codex's default configuration (its "responses lite" requests) sends no
    top-level ``tools``: they ride in an ``additional_tools`` item of ``input``.
    """
    extra: list[Any] = []
    if isinstance(raw_input, list):
        for item in raw_input:
            if isinstance(item, dict) and item.get("type") == "additional_tools":
                more = item.get("tools")
                if isinstance(more, list):
                    extra += more
    if not extra or (tools is not None and not isinstance(tools, list)):
        return tools  # (a malformed ``tools`` is refused as such)
    return [*(tools or []), *extra]


def _object(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise InvalidRequest(f"'{name}' must be an object", param=name)
    return value


def parse(body: Any) -> tuple[Conversation, dict[str, Any]]:
    """Validate a Responses body; return the conversation and the settings the Response echoes."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    for name, why in STATEFUL_FIELDS.items():
        if body.get(name) is not None:
            raise InvalidRequest(f"'{name}' is not supported: {why}", param=name)
    raw_input = body.get("input")
    if raw_input is None or raw_input == [] or raw_input == "":
        raise InvalidRequest("'input' is required: a string or an array of items", param="input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("'instructions' must be a string", param="instructions")
    turns = _turns(raw_input)
    # Leading developer/system messages join the instructions as SAI's system
    # text, as long as something follows them; later ones stay system turns.
    system = [instructions] if instructions else []
    leading = 0
    while leading < len(turns) - 1 and turns[leading].role == "system":
        leading += 1
    system += [turn.text for turn in turns[:leading] if turn.text]
    del turns[:leading]

    text = _object(body, "text") or {}
    tools = openai.tools(_offered_tools(body.get("tools"), raw_input), flat=True)
    conversation = Conversation(
        turns,
        system="\n\n".join(system),
        model=openai.model_name(body),
        stream=openai.flag(body, "stream"),
        tools=tools,
        tool_choice=openai.tool_choice(body.get("tool_choice"), tools, flat=True),
        parallel_tool_calls=openai.flag(body, "parallel_tool_calls", True),
        output=openai.json_format(text.get("format"), "text.format", flat=True),
    )
    metadata = _object(body, "metadata") or {}
    echo: dict[str, Any] = {
        "instructions": instructions,
        # The user's SAI key may ride in metadata (the auth chain's metadata handler);
        # it is not echoed back.
        "metadata": {k: v for k, v in metadata.items() if k != "user_api_key"},
        "parallel_tool_calls": conversation.parallel_tool_calls,
        "reasoning": _object(body, "reasoning") or {"effort": None, "summary": None},
        "store": openai.flag(body, "store", True),
        "text": {"format": {"type": "text"}, "verbosity": "medium", **text},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        **{name: body.get(name, default) for name, default in ECHOED.items()},
    }
    return conversation, echo


# --- the answer


def usage(usage_: Usage) -> dict[str, Any]:
    """Return a Responses usage object, detail objects included."""
    return {
        "input_tokens": usage_.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage_.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage_.total_tokens,
    }


def _retry_seconds(retry_after: str | None) -> int | None:
    """Return SAI's ``Retry-After`` (seconds or an HTTP date) in whole seconds."""
    if not retry_after:
        return None
    try:
        return max(0, math.ceil(float(retry_after)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return None
    return max(0, math.ceil(when.timestamp() - time.time()))


def error_object(error: UpstreamError) -> dict[str, Any]:
    """Return a failed Response's ``error``, with a code Codex maps to its own handling.

    Codex reads ``context_length_exceeded`` (stop, the conversation must shrink)
    and ``rate_limit_exceeded`` (retry after the "try again in N s" of the
    message); anything else is a server error it retries.
    """
    message = error.message
    if isinstance(error, ContextTooLong):
        code = "context_length_exceeded"
    elif isinstance(error, UpstreamRateLimited):
        code = "rate_limit_exceeded"
        seconds = _retry_seconds(error.retry_after)
        if seconds is not None:
            message = f"{message} Please try again in {seconds}s."
    else:
        code = "server_error"
    return {"code": code, "message": message, "type": error.type, "param": None}


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
    }


def _call_item(call: ToolCall, *, done: bool) -> dict[str, Any]:
    # A tool offered inside a namespace goes back under its own name with its
    # namespace, as Codex dispatches it (``ToolName::new(namespace, name)``).
    named: dict[str, str] = (
        {"name": call.wire[1], "namespace": call.wire[0]} if call.wire else {"name": call.name}
    )
    if call.kind == "custom":
        return {"id": f"ctc_{call.id}", "type": "custom_tool_call", "call_id": f"call_{call.id}",
                **named, "input": call.input if done else ""}  # fmt: skip
    return {"id": f"fc_{call.id}", "type": "function_call", "call_id": f"call_{call.id}",
            **named, "arguments": call.arguments if done else "",
            "status": "completed" if done else "in_progress"}  # fmt: skip


class ResponsesRenderer:
    """Renders Response objects and their event streams; one per request.

    The stream is a small state machine: the message item opens with the first
    piece of prose and closes before the first call item or at the end; every
    item gets the next ``output_index``, every event the next ``sequence_number``.
    """

    # Codex and the SDK helpers expect response.created at once, whatever SAI does.
    eager = True

    def __init__(
        self, ids: str, created: int, echo: dict[str, Any], kept: Continuation | None = None
    ) -> None:
        # A stored response's ids are unguessable; others carry the request ID, for the logs.
        self._id = new_id("resp") if kept else f"resp_{ids}"
        self._message_id = new_id("msg") if kept else f"msg_{ids}"
        self._kept = kept
        self.completed: dict[str, Any] | None = None  # the Response to keep, not streamed
        self._final: dict[str, Any] | None = None  # the streamed Response, once kept
        self._created = created
        self._echo = echo
        self._model = ""
        self._sequence = 0
        # Finished items, in output_index order (a message's already serialised).
        self._output: list[dict[str, Any] | orjson.Fragment] = []
        self._pieces: list[str] | None = None  # the open message's text, while it is open
        self._delta_head = b""

    # --- the Response object

    @property
    def response_id(self) -> str:
        return self._id

    def pending(self, status: str, model: str, **extra: Any) -> dict[str, Any]:
        """Return the Response before its answer (a background response's ``queued``...)."""
        return self._response(status, model, [], **extra)

    def _response(
        self,
        status: str,
        model: str,
        output: Sequence[dict[str, Any] | orjson.Fragment],
        **extra: Any,
    ) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "response",
            "created_at": self._created,
            "status": status,
            "background": False,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "model": model,
            "output": output,
            "previous_response_id": None,
            "usage": None,
            **self._echo,
            **extra,
        }

    def body(self, answer: Answer) -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        if answer.text or not answer.calls:
            output.append(_message(self._message_id, answer.text, "completed"))
        output += [_call_item(call, done=True) for call in answer.calls]
        response = self._response(
            "completed", answer.model, output,
            completed_at=int(time.time()), usage=usage(answer.usage),
        )  # fmt: skip
        if self._kept is not None and answer.outcome == "ok":  # SAI answered: kept
            self.completed = response
        return response

    # --- the stream

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        return self._frame(kind.encode(), orjson.dumps(fields)[1:-1])

    def _frame(self, kind: bytes, fields: bytes) -> bytes:
        """Return one event: ``event: <type>`` and its JSON, fields spliced in as serialised."""
        sequence = self._sequence
        self._sequence += 1
        return b'event: %s\ndata: {"type":"%s","sequence_number":%d,%s}\n\n' % (
            kind,
            kind,
            sequence,
            fields,
        )

    def head(self, model: str) -> bytes:
        self._model = model
        # One serialisation for both events: they carry the same Response.
        response = b'"response":' + orjson.dumps(self._response("in_progress", model, []))
        return self._frame(b"response.created", response) + self._frame(
            b"response.in_progress", response
        )

    def ping(self) -> bytes:
        return COMMENT_PING

    def _open_message(self) -> bytes:
        self._pieces = []
        index = len(self._output)
        located = {"item_id": self._message_id, "output_index": index}
        frames = self._event(
            "response.output_item.added",
            {"output_index": index, "item": {**_message(self._message_id, "", "in_progress"),
                                             "content": []}},
        )  # fmt: skip
        frames += self._event(
            "response.content_part.added",
            {**located, "content_index": 0,
             "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}},
        )  # fmt: skip
        # Every delta is the same object but for its sequence number and text: the
        # constant part is serialised once per message, not once per piece.
        self._delta_head = (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            + orjson.dumps({**located, "content_index": 0, "logprobs": []})[1:-1]
            + b',"sequence_number":'
        )
        return frames

    def _close_message(self, status: str = "completed") -> bytes:
        if self._pieces is None:
            return b""
        text = orjson.dumps("".join(self._pieces))  # the whole text, serialised once
        self._pieces = None
        index = len(self._output)
        part = b'{"type":"output_text","annotations":[],"logprobs":[],"text":%s}' % text
        item = orjson.dumps(
            {**_message(self._message_id, "", status), "content": [orjson.Fragment(part)]}
        )
        self._output.append(orjson.Fragment(item))  # spliced into the final Response as is
        located = b'"item_id":%s,"output_index":%d,"content_index":0' % (
            orjson.dumps(self._message_id),
            index,
        )
        return (
            self._frame(
                b"response.output_text.done", b'%s,"text":%s,"logprobs":[]' % (located, text)
            )
            + self._frame(b"response.content_part.done", b'%s,"part":%s' % (located, part))
            + self._frame(
                b"response.output_item.done", b'"output_index":%d,"item":%s' % (index, item)
            )
        )

    def text(self, piece: str) -> bytes:
        if self._pieces is None:
            return self._open_message() + self.text(piece)
        self._pieces.append(piece)
        sequence = self._sequence
        self._sequence += 1
        return b'%s%d,"delta":%s}\n\n' % (self._delta_head, sequence, orjson.dumps(piece))

    def calls(self, calls: Sequence[ToolCall]) -> bytes:
        frames = [self._close_message()]
        for call in calls:
            index = len(self._output)
            item = _call_item(call, done=True)
            located = {"item_id": item["id"], "output_index": index}
            frames.append(
                self._event(
                    "response.output_item.added",
                    {"output_index": index, "item": _call_item(call, done=False)},
                )
            )
            if call.kind == "custom":
                frames.append(
                    self._event("response.custom_tool_call_input.delta",
                                {**located, "delta": call.input})
                )  # fmt: skip
                frames.append(
                    self._event("response.custom_tool_call_input.done",
                                {**located, "input": call.input})
                )  # fmt: skip
            else:
                frames.append(
                    self._event("response.function_call_arguments.delta",
                                {**located, "delta": call.arguments})
                )  # fmt: skip
                frames.append(
                    self._event("response.function_call_arguments.done",
                                {**located, "arguments": call.arguments})
                )  # fmt: skip
            self._output.append(item)
            frames.append(
                self._event("response.output_item.done", {"output_index": index, "item": item})
            )
        return b"".join(frames)

    async def keep(self, answer: Answer) -> bytes:
        """Keep the finished answer before its last frames go out; return the frames it closed.

        The relay awaits this just before :meth:`finish`: a client that reads
        ``response.completed`` finds the response stored, on any replica.
        """
        if self._kept is None or answer.outcome != "ok":
            return b""
        frames = self._close_items()
        self._final = self._completed(answer)
        # The message item is a serialised fragment: one round trip makes it a dict again.
        await self._kept.keep(orjson.loads(orjson.dumps(self._final)))
        return frames

    def _close_items(self) -> bytes:
        frames = b""
        if self._pieces is None and not self._output:
            frames = self._open_message()  # an empty answer is still one (empty) message
        return frames + self._close_message()

    def _completed(self, answer: Answer) -> dict[str, Any]:
        return self._response(
            "completed", answer.model or self._model, self._output,
            completed_at=int(time.time()), usage=usage(answer.usage),
        )  # fmt: skip

    def finish(self, answer: Answer) -> bytes:
        # A message-mode explanation ends as response.completed too, "length" included:
        # Codex treats any other ending (response.incomplete) as a broken stream and
        # retries it, so the user would never read the explanation.
        if self._final is not None:
            return self._event("response.completed", {"response": self._final})
        frames = self._close_items()
        return frames + self._event("response.completed", {"response": self._completed(answer)})

    def failure(self, error: UpstreamError) -> bytes:
        frames = self._close_message("incomplete")
        response = self._response(
            "failed", self._model, self._output, error=error_object(error), usage=usage(Usage())
        )
        return frames + self._event("response.failed", {"response": response})


async def input_tokens(request: web.Request) -> web.Response:
    """``POST /v1/responses/input_tokens``: the estimate of what SAI would be sent.

    The same count as the context check: the chain, the input, the
    instructions and the tool definitions, characters / 4.
    """
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    # Counting stores nothing.
    found = await continuation(request, {**body, "store": False})
    whole = await compaction.expand(request, body, found.input)  # a summary counts as sent
    conversation, _ = parse({**body, "store": False, "input": whole})
    _, chars = sai_payload(conversation, 0)
    tokens = estimate_tokens(chars)
    return json_response({"object": "response.input_tokens", "input_tokens": tokens})
