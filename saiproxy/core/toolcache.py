"""Caches of what offering tools costs per request, bounded by bytes and keyed by content.

An agent sends the same tools with every call (Claude Code: 20 and more,
every turn). Parsing them and building their instructions once per distinct
tool list saves most of that work; but a cache must never hold what a
hostile or unlucky client sends: each cache keeps at most TOOL_CACHE_BYTES
(estimated), least recently used first out, and a tool list larger than a
quarter of that is never kept at all. The caches are the application's
(:class:`ToolCaches`), never the process's.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import orjson
from aiohttp import web

from .conversation import Tool

__all__ = [
    "PARSED_WEIGHT",
    "TOOL_CACHES",
    "TOOL_CACHE_BYTES",
    "ByteBoundedCache",
    "ToolCaches",
    "parsed_tools",
]

TOOL_CACHE_BYTES: Final = 16 * 1024 * 1024
# Parsed JSON takes several times its text: what an entry is charged per byte of it.
PARSED_WEIGHT: Final = 4

_V = TypeVar("_V")


class ByteBoundedCache(Generic[_V]):
    """A least-recently-used mapping that holds at most ``limit`` bytes (as its entries say)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._entries: OrderedDict[Any, tuple[_V, int]] = OrderedDict()

    def get(self, key: Any) -> _V | None:
        """Return the value kept for ``key`` (now the most recently used), or None."""
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: Any, value: _V, size: int) -> None:
        """Keep ``value`` unless it is too large; drop the least recently used to make room."""
        if size > self.limit // 4:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= old[1]
        while self._entries and self.size + size > self.limit:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.size -= dropped
        self._entries[key] = (value, size)
        self.size += size


class ToolCaches:
    """The application's two tool caches: parsed tool lists, and their instructions.

    Owned by the application (created in ``create_app``, reached through
    ``request.app[TOOL_CACHES]``): two applications in one process share
    nothing.
    """

    __slots__ = ("parts", "tools")

    def __init__(self, limit: int = TOOL_CACHE_BYTES) -> None:
        self.tools: ByteBoundedCache[tuple[Tool, ...]] = ByteBoundedCache(limit)
        # By the tools tuple's identity and the choice: (tools, instructions, inputs.tools).
        self.parts: ByteBoundedCache[tuple[tuple[Tool, ...], str, str]] = ByteBoundedCache(limit)

    def parsed_tools(
        self, value: list[Any], kind: str, parse: Callable[[list[Any]], tuple[Tool, ...]]
    ) -> tuple[Tool, ...]:
        """Return ``parse(value)``, the same tuple for the same tools (``kind``: the protocol's
        shape).

        The key is a digest of the tools' JSON, so the cache holds no copy of
        it; the prompt builder keeps its instructions by the tuple's identity.
        """
        text = orjson.dumps(value)
        key = (hashlib.blake2b(text, digest_size=16).digest(), kind)
        found = self.tools.get(key)
        if found is None:
            found = parse(value)
            self.tools.put(key, found, len(text) * PARSED_WEIGHT)
        return found

    def sizes(self) -> tuple[int, int]:
        """Return the bytes the tools cache and the instructions cache are charged with."""
        return self.tools.size, self.parts.size


def parsed_tools(
    value: list[Any],
    kind: str,
    parse: Callable[[list[Any]], tuple[Tool, ...]],
    caches: ToolCaches | None,
) -> tuple[Tool, ...]:
    """Return ``parse(value)``: kept in ``caches`` when there are some (a request's app)."""
    return parse(value) if caches is None else caches.parsed_tools(value, kind, parse)


TOOL_CACHES: Final = web.AppKey("tool_caches", ToolCaches)
