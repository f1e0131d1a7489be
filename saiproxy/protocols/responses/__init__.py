"""OpenAI Responses: ``POST /v1/responses``, streamed or not, with function and custom tools.

What Codex CLI, the OpenAI Agents SDK and the SDKs' ``client.responses`` speak.
Its modules, each importing only those listed before it:

- ``common``: what they all share: a request's ``Continuation``, the Response,
  usage, message and error objects, the stream's event frame;
- ``parse``: a Responses body into a ``Conversation`` and the settings echoed;
- ``render``: the ``ResponsesRenderer`` (the Response object, its event stream);
- ``background``: ``background: true``, its status from any replica, cancel, replay;
- ``stored``: what a request continues and keeps; ``GET``/``DELETE`` a stored response;
- ``compaction``: a long session summarised into one ``compaction`` item;
- ``handlers``: ``POST /v1/responses`` and ``POST /v1/responses/input_tokens``.
"""

from __future__ import annotations

from . import background, compaction, stored
from .common import Continuation, error_object, usage
from .handlers import input_tokens, responses
from .parse import ECHOED, STATEFUL_FIELDS, SYSTEM_ROLES, USED_FIELDS, parse
from .render import ResponsesRenderer

__all__ = [
    "ECHOED",
    "STATEFUL_FIELDS",
    "SYSTEM_ROLES",
    "USED_FIELDS",
    "Continuation",
    "ResponsesRenderer",
    "background",
    "compaction",
    "error_object",
    "input_tokens",
    "parse",
    "responses",
    "stored",
    "usage",
]
