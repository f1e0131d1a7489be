"""``GET /v1/models/{id}``: one configured model, in the caller's shape, or 404 in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from .conftest import MakeProxy, openai_url

SLASHED = "org/model-x"
PROXY_KEY = "pk-lookup-0b7e"


@pytest.fixture
async def proxy(make_proxy: MakeProxy, tmp_path: Path) -> Any:
    config = tmp_path / "saiproxy.toml"
    config.write_text(
        'default_model = "sai-model"\n'
        "[models.sai-model]\n"
        f'[models."{SLASHED}"]\n'
        'template_id = "tpl-x"\n',
        encoding="utf-8",
    )
    return await make_proxy(SAIPROXY_CONFIG=str(config))


@pytest.mark.parametrize("path", ["/v1/models/sai-model", "/models/sai-model"])
async def test_openai_shape(proxy: Any, path: str) -> None:
    response = await proxy.get(path)
    assert response.status == 200
    assert response.headers["X-Request-ID"]
    body = await response.json()
    assert body == {"id": "sai-model", "object": "model", "created": body["created"],
                    "owned_by": "sai"}  # fmt: skip
    assert isinstance(body["created"], int)


@pytest.mark.parametrize("path", [f"/v1/models/{SLASHED}", "/v1/models/org%2Fmodel-x"])
async def test_ids_with_a_slash(proxy: Any, path: str) -> None:
    response = await proxy.get(path)
    assert response.status == 200
    assert (await response.json())["id"] == SLASHED


async def test_openai_not_found(proxy: Any) -> None:
    response = await proxy.get("/v1/models/gpt-4o")
    assert response.status == 404
    assert await response.json() == {
        "error": {
            "message": "The model 'gpt-4o' does not exist; see GET /v1/models",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


async def test_sdk_retrieve(proxy: Any) -> None:
    async with openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused") as client:
        found = await client.models.retrieve("sai-model")
        slashed = await client.models.retrieve(SLASHED)
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("gpt-4o")
    assert (found.id, found.object, found.owned_by) == ("sai-model", "model", "sai")
    assert slashed.id == SLASHED
    assert caught.value.code == "model_not_found"


async def test_anthropic_shape(proxy: Any) -> None:
    headers = {"anthropic-version": "2023-06-01"}
    response = await proxy.get("/v1/models/sai-model", headers=headers)
    assert response.status == 200
    body = await response.json()
    assert body == {"type": "model", "id": "sai-model", "display_name": "sai-model",
                    "created_at": body["created_at"]}  # fmt: skip
    assert body["created_at"].endswith("Z")
    missing = await proxy.get("/v1/models/claude-sonnet-4-5", headers=headers)
    assert missing.status == 404
    assert await missing.json() == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "The model 'claude-sonnet-4-5' does not exist; see GET /v1/models",
        },
    }


async def test_anthropic_sdk_retrieve(proxy: Any) -> None:
    base_url = str(proxy.make_url(""))
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="unused") as client:
        found = await client.models.retrieve("sai-model")
        with pytest.raises(anthropic.NotFoundError) as caught:
            await client.models.retrieve("claude-sonnet-4-5")
    assert (found.id, found.type, found.display_name) == ("sai-model", "model", "sai-model")
    assert found.created_at.year >= 2024
    assert caught.value.status_code == 404
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "not_found_error"


async def test_strict_or_not_only_configured_models(make_proxy: MakeProxy) -> None:
    # Completions map unknown names to the default model; a lookup does not.
    proxy = await make_proxy(STRICT_MODELS="false")
    assert (await proxy.get("/v1/models/unknown")).status == 404


async def test_guarded_by_proxy_api_keys(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(PROXY_API_KEYS=PROXY_KEY)
    refused = await proxy.get("/v1/models/sai-model")
    assert refused.status == 401
    assert (await refused.json())["error"]["code"] == "invalid_api_key"
    allowed = await proxy.get(
        "/v1/models/sai-model", headers={"Authorization": f"Bearer {PROXY_KEY}"}
    )
    assert allowed.status == 200


async def test_wrong_method(proxy: Any) -> None:
    response = await proxy.post("/v1/models/sai-model", json={})
    assert response.status == 405
    assert (await response.json())["error"]["code"] == "method_not_allowed"
