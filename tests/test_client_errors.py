"""Bad input gets a clear 4xx OpenAI error, request IDs are right on every response."""

from __future__ import annotations

import re
from typing import Any

import pytest

from .conftest import FakeSai, MakeProxy, chat

URL = "/v1/chat/completions"


async def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"{}", "'messages' is required"),
        (b'{"messages": []}', "at least one"),
        (b'{"messages": "hi"}', "must be an array"),
        (b'{"messages": {"role": "user"}}', "must be an array"),
        (b'{"messages": ["hi"]}', "messages[0] must be an object"),
        (b'{"messages": [{"content": "hi"}]}', "messages[0].role"),
        (b'{"messages": [{"role": 7, "content": "hi"}]}', "messages[0].role"),
        (b'{"messages": [{"role": "user"}]}', "messages[0].content is required"),
        (b'{"messages": [{"role": "user", "content": 42}]}', "messages[0].content must be"),
        (b'{"messages": [{"role": "user", "content": {"a": 1}}]}', "messages[0].content must"),
        (b'{"messages": [{"role": "user", "content": ["x"]}]}', "must be an object"),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
            "text must be a string",
        ),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "image_url",'
            b' "image_url": {"url": "http://x/y.png"}}]}]}',
            "SAI templates accept text only",
        ),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "input_audio",'
            b' "input_audio": {"data": "", "format": "wav"}}]}]}',
            "SAI templates accept text only",
        ),
        (b'{"messages": [{"role": "user", "content": "a"}], "n": 2}', "n=1"),
        (b'{"messages": [{"role": "user", "content": "a"}], "n": "1"}', "'n'"),
        (b'{"messages": [{"role": "user", "content": "a"}], "model": 5}', "'model'"),
        (b'{"messages": [{"role": "user", "content": "a"}], "stream": "yes"}', "'stream'"),
        (
            b'{"messages": [{"role": "user", "content": "a"}], "stream_options": 1}',
            "stream_options",
        ),
    ],
)
async def test_bad_input_is_a_400(
    make_proxy: MakeProxy, sai: FakeSai, body: bytes, fragment: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.post(URL, data=body, headers={"Content-Type": "application/json"})
    error = await _error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]
    assert response.headers["X-Request-ID"]
    assert sai.received == []


async def test_oversize_body_is_a_413(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(MAX_BODY_BYTES="2048")
    body = chat(("user", "x" * 4096))
    error = await _error(await proxy.post(URL, json=body), 413)
    assert "2048" in error["message"]
    assert sai.received == []
    # Just under the limit still goes through.
    ok = await proxy.post(URL, json=chat(("user", "x" * 1900)))
    assert ok.status == 200


async def test_sampling_parameters_are_accepted_and_ignored(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    body = chat(
        ("user", "a"),
        temperature=1.5,
        top_p=0.1,
        max_tokens=3,
        stop=["x"],
        n=1,
        presence_penalty=1,
        user="u1",
        tools=[],
        seed=4,
    )
    response = await proxy.post(URL, json=body)
    assert response.status == 200
    assert set(sai.received[0].json) == {"inputs", "chatMessages"}


async def test_generated_request_id(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    first = await proxy.post(URL, json=chat(("user", "a")))
    second = await proxy.post(URL, json=chat(("user", "a")))
    ids = [first.headers["X-Request-ID"], second.headers["X-Request-ID"]]
    assert all(re.fullmatch(r"[0-9a-f]{8}", request_id) for request_id in ids)
    assert ids[0] != ids[1]
    assert [r.headers["X-Request-ID"] for r in sai.received] == ids


@pytest.mark.parametrize("client_id", ["abc-123_X.y", "a", "Z" * 64])
async def test_valid_client_request_id_is_reused(
    make_proxy: MakeProxy, sai: FakeSai, client_id: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.post(URL, json=chat(("user", "a")), headers={"X-Request-ID": client_id})
    assert response.headers["X-Request-ID"] == client_id
    assert sai.received[0].headers["X-Request-ID"] == client_id
    assert (await response.json())["id"].startswith(f"chatcmpl-{client_id}-")


@pytest.mark.parametrize("client_id", ["", "has space", "semi;colon", "Z" * 65, "ünï", "a/b"])
async def test_invalid_client_request_id_is_replaced(
    make_proxy: MakeProxy, sai: FakeSai, client_id: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.post(URL, json=chat(("user", "a")), headers={"X-Request-ID": client_id})
    assert re.fullmatch(r"[0-9a-f]{8}", response.headers["X-Request-ID"])
    assert sai.received[0].headers["X-Request-ID"] == response.headers["X-Request-ID"]


async def test_request_id_on_error_responses(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    for response in (
        await proxy.post(URL, data=b"nope"),
        await proxy.get("/nowhere", headers={"X-Request-ID": "trace-me"}),
        await proxy.delete("/v1/models"),
    ):
        assert response.status >= 400
        assert response.headers["X-Request-ID"]
    assert response.headers["X-Request-ID"]
