"""OpenAI Responses answers: the Response object and its event stream, a small state machine.

The stream opens at once (``response.created``, ``response.in_progress``) and
then follows SAI: each output item gets its own increasing ``output_index``;
the answer ends with ``response.completed`` carrying the whole Response, or
``response.failed`` with an error code Codex maps (``context_length_exceeded``,
``rate_limit_exceeded`` with "try again in N s", ``server_error``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from ...base.errors import UpstreamError
from ...core.conversation import Answer, ToolCall, Usage
from ...core.sse import COMMENT_PING
from ...state.store import new_id
from .common import Continuation, error_object, event, message_item, response_object, usage

__all__ = ["ResponsesRenderer"]


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
        return response_object(self._id, self._created, status, model, output, self._echo, **extra)

    def body(self, answer: Answer) -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        if answer.text or not answer.calls:
            output.append(message_item(self._message_id, answer.text, "completed"))
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
        sequence = self._sequence
        self._sequence += 1
        return event(kind, sequence, fields)

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
            {"output_index": index, "item": {**message_item(self._message_id, "", "in_progress"),
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
            {**message_item(self._message_id, "", status), "content": [orjson.Fragment(part)]}
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
            # A custom tool's call streams its input, a function's its arguments.
            event, field, value = (
                ("response.custom_tool_call_input", "input", call.input)
                if call.kind == "custom"
                else ("response.function_call_arguments", "arguments", call.arguments)
            )
            frames.append(self._event(f"{event}.delta", {**located, "delta": value}))
            frames.append(self._event(f"{event}.done", {**located, field: value}))
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
