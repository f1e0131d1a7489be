"""/openapi.json against the parsers, field by field: each request body names every top-level
field its endpoint's parser reads or declares, and nothing a parser neither reads nor declares.

What a parser reads is taken two ways: its declaration (``USED_FIELDS``, the fields
``fields_ignored`` leaves out of its log line) and its behaviour (every key the parser
looks up in a body that records its lookups). The limits read the answer's bound on
every protocol (``OUTPUT_FIELDS``): those may be documented too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from saiproxy.base.errors import ClientError
from saiproxy.limits.rules import OUTPUT_FIELDS
from saiproxy.protocols import anthropic, chat, completions, responses
from saiproxy.web.openapi import openapi_document

Client = TestClient[web.Request, web.Application]


class _Reads(dict[str, Any]):
    """A JSON object that remembers every top-level key looked up in it."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return super().__contains__(key)


Parse = Callable[[Any], object]
_USER = [{"role": "user", "content": "hi"}]

# Each endpoint with a request body: its parser, what it declares, and a body it accepts.
PARSERS: dict[str, tuple[Parse, frozenset[str], dict[str, Any]]] = {
    "/v1/chat/completions": (chat.parse, chat.USED_FIELDS, {"messages": _USER}),
    "/v1/completions": (completions.parse, completions.USED_FIELDS, {"prompt": "hi"}),
    "/v1/responses": (responses.parse, responses.USED_FIELDS, {"input": "hi"}),
    "/v1/responses/input_tokens": (responses.parse, responses.USED_FIELDS, {"input": "hi"}),
    "/v1/responses/compact": (responses.parse, responses.USED_FIELDS, {"input": "hi"}),
    "/v1/messages": (
        anthropic.parse, anthropic.USED_FIELDS, {"messages": _USER, "max_tokens": 8}
    ),
    "/v1/messages/count_tokens": (
        lambda body: anthropic.parse(body, counting=True), anthropic.USED_FIELDS,
        {"messages": _USER},
    ),
}  # fmt: skip
# The Conversations API declares no list: each documented field is shown read by a
# request that gets it wrong (a 400 naming it).
CONVERSATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/conversations", "post"): {"metadata": 5, "items": 5},
    ("/v1/conversations/{conversation_id}", "post"): {"metadata": 5},
    ("/v1/conversations/{conversation_id}/items", "post"): {"items": 5},
}


def _request_bodies() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield each operation that takes a body: path, method, the body's schema."""
    document = openapi_document()
    schemas = document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if isinstance(operation, dict) and "requestBody" in operation:
                reference = operation["requestBody"]["content"]["application/json"]["schema"]
                yield path, method, schemas[reference["$ref"].rsplit("/", 1)[1]]


def _reads(parse: Parse, accepted: dict[str, Any], documented: set[str]) -> set[str]:
    """Return the keys ``parse`` looks up: in a body it accepts, and in one naming every
    documented field (null where the body has none), which may be refused part way."""
    body = _Reads(accepted)
    parse(body)
    full = _Reads({**dict.fromkeys(documented), **accepted})
    with contextlib.suppress(ClientError):
        parse(full)
    return body.read | full.read


def test_every_request_body_is_checked() -> None:
    operations = {(path, method) for path, method, _ in _request_bodies()}
    assert operations == {(path, "post") for path in PARSERS} | set(CONVERSATIONS)


@pytest.mark.parametrize("path", sorted(PARSERS))
def test_each_field_a_parser_uses_is_documented(path: str) -> None:
    parse, declared, accepted = PARSERS[path]
    [schema] = [schema for where, _, schema in _request_bodies() if where == path]
    documented = set(schema["properties"])
    read = _reads(parse, accepted, documented)
    assert sorted(declared - documented) == [], "declared in USED_FIELDS, not documented"
    assert sorted(read - documented) == [], "read by the parser, not documented"
    assert set(schema.get("required", ())) <= documented


@pytest.mark.parametrize("path", sorted(PARSERS))
def test_each_documented_field_is_one_a_parser_uses(path: str) -> None:
    parse, declared, accepted = PARSERS[path]
    [schema] = [schema for where, _, schema in _request_bodies() if where == path]
    documented = set(schema["properties"])
    read = _reads(parse, accepted, documented)
    assert sorted(documented - declared - read - set(OUTPUT_FIELDS)) == []


@pytest.mark.parametrize(("path", "method"), sorted(CONVERSATIONS))
async def test_each_documented_conversation_field_is_read(
    proxy: Client, path: str, method: str
) -> None:
    [schema] = [s for where, how, s in _request_bodies() if (where, how) == (path, method)]
    wrong = CONVERSATIONS[path, method]
    assert set(wrong) <= set(schema["properties"])
    url = path
    if "{conversation_id}" in path:
        created = await proxy.post("/v1/conversations", json={})
        assert created.status == 200
        url = path.replace("{conversation_id}", (await created.json())["id"])
    for field, value in wrong.items():
        response = await proxy.post(url, json={field: value})
        assert response.status == 400, field
        assert (await response.json())["error"]["param"] == field
