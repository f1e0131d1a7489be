"""The credential chain (docs/auth.md): sources, placeholders, 401 stops, 429 falls back."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import SYSTEM_COOKIE, SYSTEM_KEY, FakeSai, MakeProxy, Reply, chat

URL = "/v1/chat/completions"
USER_KEY = "user-key-91b7e0d3"
USER_COOKIE = "sid=user-cookie-2c5a; Cookies=accepted"


async def _auths(
    make_proxy: MakeProxy,
    sai: FakeSai,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    **env: str | None,
) -> list[tuple[str, str | None]]:
    proxy = await make_proxy(**env)
    response = await proxy.post(URL, json=body or chat(("user", "hi")), headers=headers or {})
    assert response.status == 200, await response.text()
    return [received.auth for received in sai.received]


async def test_system_key_by_default(make_proxy: MakeProxy, sai: FakeSai) -> None:
    assert await _auths(make_proxy, sai) == [("X-Api-Key", SYSTEM_KEY)]


async def test_litellm_metadata_beats_metadata(make_proxy: MakeProxy, sai: FakeSai) -> None:
    body = chat(
        ("user", "hi"),
        litellm_params={"metadata": {"user_api_key": USER_KEY}},
        metadata={"user_api_key": "other-key-000"},
    )
    assert await _auths(make_proxy, sai, body) == [("X-Api-Key", USER_KEY)]


async def test_metadata_user_api_key(make_proxy: MakeProxy, sai: FakeSai) -> None:
    body = chat(("user", "hi"), metadata={"user_api_key": f"  {USER_KEY}\n"})
    assert await _auths(make_proxy, sai, body) == [("X-Api-Key", USER_KEY)]


@pytest.mark.parametrize("header", ["user_api_key", "user-api-key", "User-Api-Key"])
async def test_header_both_spellings(make_proxy: MakeProxy, sai: FakeSai, header: str) -> None:
    auths = await _auths(make_proxy, sai, headers={header: USER_KEY})
    assert auths == [("X-Api-Key", USER_KEY)]


async def test_metadata_comes_before_header_by_default(make_proxy: MakeProxy, sai: FakeSai) -> None:
    body = chat(("user", "hi"), metadata={"user_api_key": USER_KEY})
    auths = await _auths(make_proxy, sai, body, headers={"user-api-key": "header-key-55"})
    assert auths == [("X-Api-Key", USER_KEY)]


async def test_auth_chain_order_is_configurable(make_proxy: MakeProxy, sai: FakeSai) -> None:
    body = chat(("user", "hi"), metadata={"user_api_key": USER_KEY})
    auths = await _auths(
        make_proxy,
        sai,
        body,
        headers={"user-api-key": "header-key-55"},
        AUTH_CHAIN="header,metadata,system_key",
    )
    assert auths == [("X-Api-Key", "header-key-55")]


@pytest.mark.parametrize("value", ["raspberry", " RaspBerry ", "RASPBERRY", "", "   "])
async def test_placeholders_and_empty_values_fall_through(
    make_proxy: MakeProxy, sai: FakeSai, value: str
) -> None:
    body = chat(("user", "hi"), metadata={"user_api_key": value})
    auths = await _auths(make_proxy, sai, body, headers={"user_api_key": value})
    assert auths == [("X-Api-Key", SYSTEM_KEY)]


async def test_placeholder_list_is_configurable(make_proxy: MakeProxy, sai: FakeSai) -> None:
    auths = await _auths(
        make_proxy,
        sai,
        headers={"user-api-key": "ChangeMe"},
        USER_KEY_PLACEHOLDERS="changeme,xxx",
    )
    assert auths == [("X-Api-Key", SYSTEM_KEY)]
    sai.received.clear()
    # raspberry is no longer a placeholder once the list is replaced.
    auths = await _auths(
        make_proxy,
        sai,
        headers={"user-api-key": "raspberry"},
        USER_KEY_PLACEHOLDERS="changeme,xxx",
    )
    assert auths == [("X-Api-Key", "raspberry")]


async def test_user_cookie_is_sent_as_cookie(make_proxy: MakeProxy, sai: FakeSai) -> None:
    auths = await _auths(make_proxy, sai, headers={"user-api-key": USER_COOKIE})
    assert auths == [("Cookie", USER_COOKIE)]


async def test_cookie_marker_is_case_sensitive(make_proxy: MakeProxy, sai: FakeSai) -> None:
    auths = await _auths(make_proxy, sai, headers={"user-api-key": "my-cookies-key"})
    assert auths == [("X-Api-Key", "my-cookies-key")]


async def test_bearer_is_opt_in(make_proxy: MakeProxy, sai: FakeSai) -> None:
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    assert await _auths(make_proxy, sai, headers=headers) == [("X-Api-Key", SYSTEM_KEY)]
    sai.received.clear()
    auths = await _auths(make_proxy, sai, headers=headers, AUTH_CHAIN="bearer,system_key")
    assert auths == [("X-Api-Key", USER_KEY)]


async def test_cookie_only_deployment(make_proxy: MakeProxy, sai: FakeSai) -> None:
    auths = await _auths(make_proxy, sai, SAI_KEY=None, SAI_COOKIE=SYSTEM_COOKIE)
    assert auths == [("Cookie", SYSTEM_COOKIE)]


async def test_no_credential_at_all_is_401(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(AUTH_CHAIN="header")
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == 401
    error = (await response.json())["error"]
    assert error["type"] == "authentication_error"
    assert "user_api_key" in error["message"]
    assert sai.received == []


# --- what happens after SAI answers ---------------------------------------------------


async def test_user_key_401_stops_with_one_attempt(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE)
    sai.script(Reply(status=401, body="bad key"))
    response = await proxy.post(URL, json=chat(("user", "hi")), headers={"user_api_key": USER_KEY})
    assert response.status == 200
    data = await response.json()
    assert [r.auth for r in sai.received] == [("X-Api-Key", USER_KEY)]
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert response.headers["X-Saiproxy-Error"] == "invalid_api_key"
    assert "user key" in choice["message"]["content"]
    assert "401" in choice["message"]["content"]
    assert data["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


async def test_user_cookie_401_names_the_cookie(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(ERROR_MODE="http", SAI_COOKIE=SYSTEM_COOKIE)
    sai.script(Reply(status=401))
    response = await proxy.post(
        URL, json=chat(("user", "hi")), headers={"user-api-key": USER_COOKIE}
    )
    assert response.status == 401
    error = (await response.json())["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert "user cookie" in error["message"]
    assert len(sai.received) == 1


async def test_user_key_429_falls_back_to_cookie(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE)
    sai.script(Reply(status=429, body="Test template usage limit exceeded"), Reply(body="ok!"))
    response = await proxy.post(URL, json=chat(("user", "hi")), headers={"user_api_key": USER_KEY})
    data = await response.json()
    assert data["choices"][0]["message"]["content"] == "ok!"
    assert [r.auth for r in sai.received] == [("X-Api-Key", USER_KEY), ("Cookie", SYSTEM_COOKIE)]
    # The fallback carries the same request and request ID.
    assert sai.received[0].json == sai.received[1].json
    first, second = (r.headers["X-Request-ID"] for r in sai.received)
    assert first == second == response.headers["X-Request-ID"]


async def test_system_key_429_falls_back_to_cookie(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE)
    sai.script(Reply(status=429))
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == 200
    assert [r.auth for r in sai.received] == [("X-Api-Key", SYSTEM_KEY), ("Cookie", SYSTEM_COOKIE)]


async def test_429_without_cookie_is_rate_limited(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(ERROR_MODE="http")
    sai.script(Reply(status=429, headers={"Retry-After": "17"}))
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == 429
    assert response.headers["Retry-After"] == "17"
    error = (await response.json())["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert len(sai.received) == 1


async def test_cookie_429_does_not_fall_back_again(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE)
    sai.script(Reply(status=429), Reply(status=429))
    response = await proxy.post(URL, json=chat(("user", "hi")), headers={"user_api_key": USER_KEY})
    data = await response.json()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert "429" in data["choices"][0]["message"]["content"]
    assert [r.auth for r in sai.received] == [("X-Api-Key", USER_KEY), ("Cookie", SYSTEM_COOKIE)]


async def test_cookie_only_deployment_429_has_no_fallback(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy(SAI_KEY=None, SAI_COOKIE=SYSTEM_COOKIE, ERROR_MODE="http")
    sai.script(Reply(status=429))
    response = await proxy.post(URL, json=chat(("user", "hi")))
    assert response.status == 429
    assert len(sai.received) == 1


async def test_401_after_fallback_names_the_cookie(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(SAI_COOKIE=SYSTEM_COOKIE)
    sai.script(Reply(status=429), Reply(status=401))
    response = await proxy.post(URL, json=chat(("user", "hi")))
    text = (await response.json())["choices"][0]["message"]["content"]
    assert "SAI_COOKIE" in text
    assert len(sai.received) == 2


# --- proxy access keys -----------------------------------------------------------------


async def test_proxy_access_keys(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy(PROXY_API_KEYS="pk-alpha-111, pk-beta-222")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "pk-alpha-111"}):
        for method, path in (("POST", URL), ("POST", "/chat/completions"), ("GET", "/models")):
            response = await proxy.request(method, path, json=chat(("user", "hi")), headers=headers)
            assert response.status == 401, (headers, path)
            error = (await response.json())["error"]
            assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
            assert response.headers["X-Request-ID"]
    assert sai.received == []

    ok = await proxy.post(
        URL, json=chat(("user", "hi")), headers={"Authorization": "Bearer pk-beta-222"}
    )
    assert ok.status == 200
    models = await proxy.get("/v1/models", headers={"Authorization": "Bearer pk-alpha-111"})
    assert models.status == 200
    assert (await proxy.get("/health")).status == 200
    assert (await proxy.get("/health/readiness")).status == 200
    # The proxy key is not a SAI credential: SAI still gets the system key.
    assert sai.received[0].auth == ("X-Api-Key", SYSTEM_KEY)


async def test_no_proxy_keys_means_open(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    assert (await proxy.post(URL, json=chat(("user", "hi")))).status == 200
