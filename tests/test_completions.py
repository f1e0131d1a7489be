"""Non-streaming chat completions end to end: what SAI receives, what the client gets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from saiproxy.core.conversation import PLUGIN_MARKER, PLUGIN_PREFIX

from .conftest import SYSTEM_KEY, TEMPLATE, FakeSai, MakeProxy, Reply, chat


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
async def test_maps_messages_exactly_as_sai_expects(
    make_proxy: MakeProxy, sai: FakeSai, path: str
) -> None:
    proxy = await make_proxy()
    before = int(time.time() * 1000)
    body = chat(
        ("system", "You are terse."),
        ("user", "What is 2+2?"),
        ("assistant", "4"),
        ("user", [{"type": "text", "text": "And 3+3?"}, {"type": "text", "text": "Thanks"}]),
        model="sai-model",
        temperature=0.2,
        max_tokens=50,
    )
    response = await proxy.post(path, json=body)
    after = int(time.time() * 1000)
    assert response.status == 200

    [received] = sai.received
    assert received.path == f"/api/templates/{TEMPLATE}/execute"
    assert received.query == {}
    ids = [m["id"] for m in received.json["chatMessages"]]
    base = ids[0]
    assert before <= base <= after
    assert ids == [base, base + 1, base + 2]
    assert received.json == {
        "inputs": {"system": "You are terse.", "user": "And 3+3?\nThanks"},
        "chatMessages": [
            {"content": "What is 2+2?", "role": "user", "id": base},
            {"content": "4", "role": "assistant", "id": base + 1},
            {"content": "And 3+3?\nThanks", "role": "user", "id": base + 2},
        ],
    }
    assert received.headers["X-Api-Key"] == SYSTEM_KEY
    assert "Cookie" not in received.headers
    assert received.headers["X-Request-ID"] == response.headers["X-Request-ID"]


async def test_lone_system_message_is_sent_as_user_text(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    response = await proxy.post("/v1/chat/completions", json=chat(("system", "Only me")))
    assert response.status == 200
    [received] = sai.received
    assert received.json["inputs"] == {"system": "", "user": "Only me"}
    assert [m["content"] for m in received.json["chatMessages"]] == ["Only me"]


async def test_developer_role_counts_as_system_and_null_content_is_empty(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    response = await proxy.post(
        "/v1/chat/completions",
        json=chat(("developer", "Be brief"), ("assistant", None), ("user", "Hi")),
    )
    assert response.status == 200
    [received] = sai.received
    assert received.json["inputs"] == {"system": "Be brief", "user": "Hi"}
    assert [(m["role"], m["content"]) for m in received.json["chatMessages"]] == [
        ("assistant", ""),
        ("user", "Hi"),
    ]


async def test_ide_plugin_wrapper_is_unwrapped(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    wrapped = PLUGIN_PREFIX + "Refactor this function" + PLUGIN_MARKER + " def f(): pass\n..."
    not_wrapped = PLUGIN_PREFIX + "no marker here"
    response = await proxy.post(
        "/v1/chat/completions", json=chat(("user", not_wrapped), ("user", wrapped))
    )
    assert response.status == 200
    [received] = sai.received
    assert received.json["inputs"]["user"] == "Refactor this function"
    assert [m["content"] for m in received.json["chatMessages"]] == [
        not_wrapped,
        "Refactor this function",
    ]


async def test_completion_object_uses_sai_headers(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(
        Reply(
            body=["Four", " and six."],
            headers={"prompttokens": "12", "completiontokens": "3", "model": "gpt-sai-9"},
        )
    )
    before = int(time.time())
    response = await proxy.post("/v1/chat/completions", json=chat(("user", "2+2 and 3+3?")))
    after = time.time()
    assert response.status == 200
    assert response.content_type == "application/json"
    data = await response.json()
    request_id = response.headers["X-Request-ID"]
    assert data["id"].startswith(f"chatcmpl-{request_id}-")
    assert data["object"] == "chat.completion"
    assert before <= data["created"] <= after  # made while the request was served
    assert data["model"] == "gpt-sai-9"
    assert data["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Four and six."},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert data["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


async def test_usage_is_estimated_when_headers_are_absent_or_invalid(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body="x" * 10, headers={"prompttokens": "many"}))
    response = await proxy.post(
        "/v1/chat/completions", json=chat(("user", "12345"), model="whatever")
    )
    data = await response.json()
    # ceil(5 / 4) = 2 prompt tokens, ceil(10 / 4) = 3 completion tokens.
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    # No model header: the name the client asked for is reported (docs/sai.md).
    assert data["model"] == "whatever"


async def test_content_is_set_whatever_the_user_agent(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    for agent in ("GitKraken/10.0", "Go-http-client/1.1", "vscode-continue", "curl/8"):
        response = await proxy.post(
            "/chat/completions", json=chat(("user", "hi")), headers={"User-Agent": agent}
        )
        data = await response.json()
        assert data["choices"][0]["message"]["content"] == "Hello from SAI"


async def test_model_override_and_per_model_template(
    make_proxy: MakeProxy, sai: FakeSai, tmp_path: Path
) -> None:
    config = tmp_path / "models.toml"
    config.write_text(
        'default_model = "fast"\n'
        '[models.fast]\ntemplate_id = "tpl-fast"\n'
        '[models.smart]\ntemplate_id = "tpl-smart"\nmodel_override = "claude 4/opus&x"\n'
    )
    proxy = await make_proxy(SAIPROXY_CONFIG=str(config), SAI_TEMPLATE_ID=None)
    await proxy.post("/v1/chat/completions", json=chat(("user", "a"), model="smart"))
    await proxy.post("/v1/chat/completions", json=chat(("user", "b")))
    smart, fast = sai.received
    assert smart.path == "/api/templates/tpl-smart/execute"
    assert smart.query == {"modelOverride": "claude 4/opus&x"}
    assert fast.path == "/api/templates/tpl-fast/execute"
    assert fast.query == {}

    models = await (await proxy.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["fast", "smart"]


async def test_strict_models_rejects_unknown_names(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(STRICT_MODELS="true")
    response = await proxy.post("/v1/chat/completions", json=chat(("user", "a"), model="gpt-4"))
    assert response.status == 404
    error = (await response.json())["error"]
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert sai.received == []
    ok = await proxy.post("/v1/chat/completions", json=chat(("user", "a"), model="sai-model"))
    assert ok.status == 200


async def test_cookie_is_used_when_no_system_key(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(SAI_KEY=None, SAI_COOKIE="session=abc123; Cookies=yes")
    response = await proxy.post("/v1/chat/completions", json=chat(("user", "a")))
    assert response.status == 200
    [received] = sai.received
    assert received.headers["Cookie"] == "session=abc123; Cookies=yes"
    assert "X-Api-Key" not in received.headers


@pytest.mark.parametrize("path", ["/models", "/v1/models"])
async def test_models_list(make_proxy: MakeProxy, path: str) -> None:
    proxy = await make_proxy()
    response = await proxy.get(path)
    assert response.status == 200
    data = await response.json()
    assert data["object"] == "list"
    assert [(m["id"], m["object"]) for m in data["data"]] == [("sai-model", "model")]


async def test_health_does_not_call_sai(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    response = await proxy.get("/health")
    assert response.status == 200
    data = await response.json()
    assert data["status"] == "ok"
    assert data["version"]
    ready = await proxy.get("/health/readiness")
    assert ready.status == 200
    assert sai.received == []


async def test_unknown_path_and_wrong_method_are_openai_errors(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    missing = await proxy.post("/v1/engines/davinci/completions", json={})
    assert missing.status == 404
    assert (await missing.json())["error"]["type"] == "invalid_request_error"
    assert len(missing.headers["X-Request-ID"]) == 8

    wrong = await proxy.get("/v1/chat/completions")
    assert wrong.status == 405
    error = (await wrong.json())["error"]
    assert error["code"] == "method_not_allowed"
    assert set(error) == {"message", "type", "param", "code"}
    assert wrong.headers["Allow"] == "POST"
    assert wrong.headers["X-Request-ID"]


async def test_non_200_from_sai_is_an_openai_error_in_http_mode(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(ERROR_MODE="http")
    sai.script(Reply(status=418, body="teapot"))
    response = await proxy.post("/v1/chat/completions", json=chat(("user", "a")))
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["type"] == "api_error"
    assert error["code"] == "upstream_error"
    assert "418" in error["message"]
