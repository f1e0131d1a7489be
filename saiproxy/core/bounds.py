"""What a request may carry beyond counts: nesting depth, stop sequences, the output schema.

Each bound is checked while parsing, so a hostile body is a 400 before any
work is spent on it (docs/configuration.md, "Limits").
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from ..base.errors import InvalidRequest

__all__ = [
    "ANTHROPIC_MAX_STOPS",
    "MAX_ARGUMENT_DEPTH",
    "MAX_STOP_CHARS",
    "OPENAI_MAX_STOPS",
    "check_depth",
    "check_output_schema",
    "depth_exceeds",
    "external_ref",
    "stop_sequences",
]

# Stop sequences, as the providers bound them: OpenAI takes 4; Anthropic
# documents no count, so saiproxy takes 64 (Claude Code sends none or a few).
# Every piece of the answer is searched for each stop, so count and length
# bound the work per piece.
OPENAI_MAX_STOPS: Final = 4
ANTHROPIC_MAX_STOPS: Final = 64
MAX_STOP_CHARS: Final = 1_000

# Tool arguments SAI writes: deeper than this, the call is left as text (a
# client would have to send them back, and no real tool nests that far).
MAX_ARGUMENT_DEPTH: Final = 32

# Keywords that name another schema by URI. Only fragments ("#...") stay in
# the client's own document; anything else would be fetched or looked up.
_REF_KEYWORDS: Final = ("$ref", "$dynamicRef", "$recursiveRef")


def depth_exceeds(value: Any, limit: int) -> bool:
    """Return whether ``value`` nests arrays and objects more than ``limit`` levels deep."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for node in level:
            items = node.values() if isinstance(node, dict) else node
            below.extend(item for item in items if isinstance(item, (dict, list)))
        level = below
    return False


def check_depth(value: Any, limit: int, what: str = "The request body") -> None:
    """Refuse ``value`` nested deeper than ``limit`` with a 400 naming MAX_JSON_DEPTH."""
    if depth_exceeds(value, limit):
        raise InvalidRequest(
            f"{what} nests arrays and objects more than {limit} levels deep (MAX_JSON_DEPTH)"
        )


def stop_sequences(stops: list[str], param: str, max_count: int) -> tuple[str, ...]:
    """Check a list of stop sequences against the count and length bounds; drop empty ones."""
    if len(stops) > max_count:
        raise InvalidRequest(
            f"'{param}' has {len(stops)} sequences; saiproxy takes at most {max_count}",
            param=param,
        )
    for stop in stops:
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidRequest(
                f"'{param}' has a sequence of {len(stop)} characters; "
                f"saiproxy takes at most {MAX_STOP_CHARS} characters per sequence",
                param=param,
            )
    return tuple(stop for stop in stops if stop)


def external_ref(schema: Any) -> str | None:
    """Return the first reference in ``schema`` that points outside it, or None.

    Only a fragment (``#``, ``#/$defs/x``, ``#anchor``) resolves within the
    document; a URL, a file or a relative name would need a fetch.
    """
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for keyword in _REF_KEYWORDS:
                ref = node.get(keyword)
                if isinstance(ref, str) and not ref.startswith("#"):
                    return ref
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def check_output_schema(schema: dict[str, Any], max_bytes: int, param: str) -> None:
    """Refuse an output schema saiproxy will not validate against: too large, or external refs."""
    size = len(orjson.dumps(schema))
    if size > max_bytes:
        raise InvalidRequest(
            f"The JSON schema in '{param}' is {size} bytes; saiproxy takes at most "
            f"{max_bytes} (MAX_SCHEMA_BYTES)",
            param=param,
        )
    ref = external_ref(schema)
    if ref is not None:
        shown = ref if len(ref) <= 200 else ref[:200] + "..."
        raise InvalidRequest(
            f"The JSON schema in '{param}' refers to {shown!r}: saiproxy resolves "
            "references within the schema only ('#/$defs/...'); include the definition",
            param=param,
        )
