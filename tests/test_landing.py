"""The landing page at / (read in a real headless Chromium) and /openapi.json."""

from __future__ import annotations

import asyncio
import os
import shutil
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from saiproxy.web.openapi import openapi_document

from .conftest import SYSTEM_COOKIE, SYSTEM_KEY, MakeProxy

Client = TestClient[web.Request, web.Application]
PROXY_KEY = "proxy-key-5c1d7e"
SECRETS = (SYSTEM_KEY, SYSTEM_COOKIE, PROXY_KEY)


VOID = frozenset({"meta", "link", "br", "hr", "img", "input", "source", "wbr"})


class _Text(HTMLParser):
    """The page as a reader sees it: text by element id, and each code block."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.blocks: list[str] = []
        self.links: list[str] = []
        self.title = ""
        self._open: list[tuple[str, str | None]] = []
        self._parts: dict[int, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        ident = dict(attrs).get("id")
        if tag == "a":
            self.links.append(dict(attrs).get("href") or "")
        if tag in VOID:
            return
        self._open.append((tag, ident))
        self._parts[len(self._open)] = []

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        depth = len(self._open)
        opened, ident = self._open.pop()
        text = "".join(self._parts.pop(depth))
        if ident:
            self.by_id[ident] = " ".join(text.split())
        if opened == "pre":
            self.blocks.append(text)
        if opened == "title":
            self.title = text
        if self._open:
            self._parts[len(self._open)].append(text)

    def handle_data(self, data: str) -> None:
        if self._open:
            self._parts[len(self._open)].append(data)


def parse(page: str) -> _Text:
    reader = _Text()
    reader.feed(page)
    return reader


def block(reader: _Text, starts: str) -> str:
    found = [text for text in reader.blocks if text.startswith(starts)]
    assert len(found) == 1, (starts, reader.blocks)
    return found[0]


def base_of(client: Client) -> str:
    return str(client.make_url("")).rstrip("/")


async def dump_dom(url: str, tmp_path: Path) -> str:
    """Return the DOM Chromium renders for ``url`` (the page has no script: see the CSP test)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    process = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=90)
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def test_chromium_shows_how_to_connect(make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = await make_proxy()
    base = base_of(proxy)
    page = parse(await dump_dom(f"{base}/", tmp_path))
    assert page.title == f"saiproxy at {base.removeprefix('http://')}"
    assert page.by_id["health"].startswith("ready")
    assert page.by_id["base-url"] == f"{base}/v1"
    assert page.by_id["anthropic-base-url"] == base
    assert page.by_id["access"].startswith("not needed")
    assert "SAI_KEY" in page.by_id["credential"]
    assert page.by_id["models"].startswith("Models sai-model (default)")
    assert block(page, "export OPENAI_BASE_URL") == (
        f'export OPENAI_BASE_URL="{base}/v1"\nexport OPENAI_API_KEY="unused"'
    )
    anthropic = block(page, "export ANTHROPIC_BASE_URL")
    assert f'export ANTHROPIC_BASE_URL="{base}"\n' in anthropic
    assert 'export ANTHROPIC_AUTH_TOKEN="unused"' in anthropic
    codex = tomllib.loads(block(page, 'model = "'))
    assert codex["model"] == "sai-model"
    assert codex["model_provider"] == "saiproxy"
    assert codex["model_providers"]["saiproxy"] == {
        "name": "saiproxy",
        "base_url": f"{base}/v1",
        "wire_api": "responses",
    }
    assert "openapi.json" in page.links
    assert "No key is needed: leave env_key out." in page.by_id["codex"]
    assert f'curl {base}/v1/chat/completions \\\n  -H "Content-Type' in block(page, "curl ")


async def test_chromium_with_proxy_keys_says_a_key_is_needed_and_shows_none(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    proxy = await make_proxy(PROXY_API_KEYS=PROXY_KEY, SAI_COOKIE=SYSTEM_COOKIE)
    base = base_of(proxy)
    dom = await dump_dom(f"{base}/", tmp_path)
    for secret in SECRETS:
        assert secret not in dom
    page = parse(dom)
    assert page.by_id["access"].startswith("required: send Authorization: Bearer <key>")
    assert "SAI_KEY then SAI_COOKIE" in page.by_id["credential"]
    assert 'export OPENAI_API_KEY="<your saiproxy key>"' in block(page, "export OPENAI_BASE_URL")
    codex = tomllib.loads(block(page, 'model = "'))
    assert codex["model_providers"]["saiproxy"]["env_key"] == "SAIPROXY_API_KEY"
    assert '-H "Authorization: Bearer <your saiproxy key>"' in block(page, "curl ")
    # The OpenAPI document is open too; the API itself is not.
    assert (await proxy.get("/openapi.json")).status == 200
    assert (await proxy.get("/v1/models")).status == 401


async def test_page_is_plain_html_with_strict_headers(proxy: Client) -> None:
    response = await proxy.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert response.charset == "utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "X-Request-ID" in response.headers
    text = await response.text()
    assert "<script" not in text
    head = await proxy.head("/")
    assert head.status == 200


async def test_forwarded_scheme_and_host_are_honoured(proxy: Client) -> None:
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "llm.example.com"}
    page = parse(await (await proxy.get("/", headers=headers)).text())
    assert page.by_id["base-url"] == "https://llm.example.com/v1"
    # The first of a chain of proxies' values counts.
    headers = {"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "a.example:8443, b"}
    page = parse(await (await proxy.get("/", headers=headers)).text())
    assert page.by_id["base-url"] == "https://a.example:8443/v1"


async def test_hostile_forwarded_values_are_not_echoed(proxy: Client) -> None:
    headers = {
        "X-Forwarded-Proto": "javascript",
        "X-Forwarded-Host": 'evil.example"><script>alert(1)</script>',
    }
    response = await proxy.get("/", headers=headers)
    text = await response.text()
    assert "<script" not in text and "evil.example" not in text
    page = parse(text)
    base = base_of(proxy)
    assert page.by_id["base-url"] == f"{base}/v1"  # the request's own scheme and Host


async def test_shutting_down_and_strict_models(make_proxy: MakeProxy) -> None:
    from saiproxy.base.keys import STATE

    proxy = await make_proxy(STRICT_MODELS="true", ERROR_MODE="http")
    proxy.app[STATE].ready = False  # type: ignore[index]
    page = parse(await (await proxy.get("/")).text())
    assert page.by_id["health"] == "shutting down"
    assert "refused (404)" in page.by_id["models"]
    assert page.by_id["error-mode"].startswith("returned as HTTP errors")


async def test_bearer_chain_asks_for_the_users_own_sai_key(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(AUTH_CHAIN="bearer,system_key")
    page = parse(await (await proxy.get("/")).text())
    assert "your own SAI key" in page.by_id["access"]
    assert 'export OPENAI_API_KEY="<your SAI key>"' in block(page, "export OPENAI_BASE_URL")
    codex = tomllib.loads(block(page, 'model = "'))
    assert codex["model_providers"]["saiproxy"]["env_key"] == "SAIPROXY_API_KEY"


# --- /openapi.json

EXPECTED_PATHS = {
    "/v1/chat/completions": "post",
    "/v1/completions": "post",
    "/v1/responses": "post",
    "/v1/responses/input_tokens": "post",
    "/v1/responses/compact": "post",
    "/v1/responses/{response_id}": "parameters",
    "/v1/responses/{response_id}/cancel": "parameters",
    "/v1/responses/{response_id}/input_items": "parameters",
    "/v1/conversations": "post",
    "/v1/conversations/{conversation_id}": "parameters",
    "/v1/conversations/{conversation_id}/items": "parameters",
    "/v1/conversations/{conversation_id}/items/{item_id}": "parameters",
    "/v1/messages": "post",
    "/v1/messages/count_tokens": "post",
    "/v1/models": "get",
    "/v1/models/{model}": "get",
    "/health": "get",
    "/health/readiness": "get",
    "/metrics": "get",
    "/limits/usage": "get",
}


async def test_openapi_document_is_valid_and_names_this_server(proxy: Client) -> None:
    response = await proxy.get("/openapi.json", headers={"X-Forwarded-Proto": "https"})
    assert response.status == 200
    document: dict[str, Any] = await response.json()
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    assert document["openapi"] == "3.1.0"
    host = base_of(proxy).removeprefix("http://")
    assert document["servers"] == [{"url": f"https://{host}"}]
    assert {path: next(iter(item)) for path, item in document["paths"].items()} == EXPECTED_PATHS
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    # Health checks and metrics need no key; the APIs may.
    for path in ("/health", "/health/readiness", "/metrics"):
        assert document["paths"][path]["get"]["security"] == []
    assert "security" not in document["paths"]["/v1/chat/completions"]["post"]


def test_every_routed_api_path_is_documented() -> None:
    """A route added without describing it fails here (aliases without /v1 excepted)."""
    from saiproxy.base.settings import load_settings
    from saiproxy.web.app import create_app

    settings = load_settings(
        {"SAI_URL": "http://sai.invalid", "SAI_KEY": "k", "SAI_TEMPLATE_ID": "t"}
    )
    documented = openapi_document()["paths"]
    for route in create_app(settings).router.routes():
        info = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or info in ("/", "/openapi.json"):
            continue
        if not info.startswith(("/v1/", "/health", "/metrics", "/limits/")):
            assert f"/v1{info}" in documented, info  # an alias of a /v1 path
            continue
        path = info.replace("{id}", "{model}")
        assert path in documented, info
        assert route.method.lower() in documented[path], (route.method, info)


async def test_documented_open_get_endpoints_answer_as_described(proxy: Client) -> None:
    document = openapi_document()
    for path, item in document["paths"].items():
        operation = item.get("get")
        if operation is None or "{" in path:
            continue
        response = await proxy.get(path)
        assert str(response.status) in operation["responses"], path
        declared = operation["responses"][str(response.status)]["content"]
        assert response.content_type in declared, (path, response.content_type)
