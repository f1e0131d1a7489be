"""The Responses API under load: its request body and how its event stream is judged.

A Responses stream is whole when it ends with ``response.completed`` (there is
no ``[DONE]``); its content is the ``response.output_text.delta`` events.
"""

from __future__ import annotations

from typing import Final

import orjson

PATH: Final = "/v1/responses"
DELTA: Final = b'data: {"type":"response.output_text.delta"'
COMPLETED: Final = b'data: {"type":"response.completed"'


def body(stream: bool, text: str = "Say something about load testing.") -> bytes:
    """Return a Responses body equivalent to the chat benchmark's."""
    return orjson.dumps(
        {"model": "sai-model", "stream": stream, "instructions": "You are a benchmark.",
         "input": text}
    )  # fmt: skip
