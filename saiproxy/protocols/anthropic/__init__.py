"""Anthropic Messages: ``POST /v1/messages`` (streamed or not, with tools) and ``count_tokens``.

What Claude Code and the Anthropic SDKs send is parsed into the neutral
conversation; the answer comes back as a Message object, or as Anthropic's
named SSE events; errors in Anthropic's ``{"type": "error", "error": {...}}``
shape with its statuses.

- ``parse``: a Messages body into a ``Conversation`` (and the fields read);
- ``render``: the ``MessagesRenderer`` (Message object, SSE events, usage);
- ``errors``: Anthropic's error body and statuses (``AnthropicErrors``);
- ``handlers``: the two routes, parse → exchange → render.
"""

from __future__ import annotations

from .errors import ERROR_TYPES, STATUS_MAP, AnthropicErrors, error_body
from .handlers import count_tokens, messages
from .parse import CLIENT_TOOL_TYPES, MEDIA_BLOCKS, USED_FIELDS, parse
from .render import MESSAGE_STOP, PING, STOP_REASONS, MessagesRenderer, usage

__all__ = [
    "CLIENT_TOOL_TYPES",
    "ERROR_TYPES",
    "MEDIA_BLOCKS",
    "MESSAGE_STOP",
    "PING",
    "STATUS_MAP",
    "STOP_REASONS",
    "USED_FIELDS",
    "AnthropicErrors",
    "MessagesRenderer",
    "count_tokens",
    "error_body",
    "messages",
    "parse",
    "usage",
]
