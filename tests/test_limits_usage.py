"""Usage as an admin surface (docs/limits.md, Usage): who reads what, pages bounded at any
number of clients, and the command that reads them. In the process and in a real Valkey."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.valkey import ValkeyServer
from saiproxy.limits.identity import digest
from saiproxy.limits.usage import dates

from .conftest import CONFIG, FakeSai, MakeProxy, Reply, chat

HI = chat(("user", "Hi"))
TOKENS = {"prompttokens": "10", "completiontokens": "5"}
ADMIN = "admin-key-5e1f"


def key_id(key: str) -> str:
    return f"key-{digest(key)}"


async def read_pages(proxy: Any, headers: dict[str, str], **query: str) -> list[dict[str, Any]]:
    """GET /limits/usage page after page until next_cursor is null; return the pages."""
    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {**query, **({"cursor": cursor} if cursor else {})}
        response = await proxy.get("/limits/usage", params=params, headers=headers)
        assert response.status == 200, await response.text()
        page = await response.json()
        pages.append(page)
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 10_000


async def test_a_loopback_caller_without_an_admin_key_gets_404(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    # Behind a reverse proxy on the same host every caller comes from loopback: the peer's
    # address must grant nothing.
    proxy = await make_proxy(LIMITS_CLIENT_RPM="10", ADMIN_API_KEYS=ADMIN, **store)
    assert (await proxy.post("/v1/chat/completions", json=HI)).status == 200
    for headers in (
        {},
        {"X-Forwarded-For": "127.0.0.1"},
        {"Authorization": "Bearer not-the-admin-key"},
        {"x-api-key": ADMIN[:-1]},
    ):
        response = await proxy.get("/limits/usage", headers=headers)
        assert response.status == 404, headers
        body = await response.json()
        assert body["error"]["code"] == "not_found"
        assert "rows" not in body
    assert (await proxy.get("/limits/usage", headers={"x-api-key": ADMIN})).status == 200


async def test_a_proxy_key_reads_only_its_own_rows(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.default = Reply(headers=TOKENS)
    proxy = await make_proxy(
        LIMITS_CLIENT_RPM="10", PROXY_API_KEYS="team-a-key,team-b-key", **store
    )
    for key, times in (("team-a-key", 1), ("team-b-key", 2)):
        for _ in range(times):
            answer = await proxy.post("/v1/chat/completions", json=HI, headers={"x-api-key": key})
            assert answer.status == 200
    await asyncio.sleep(0.1)
    for key, requests in (("team-a-key", 1), ("team-b-key", 2)):
        for headers in ({"x-api-key": key}, {"Authorization": f"Bearer {key}"}):
            (page,) = await read_pages(proxy, headers, days="3")
            assert page["rows"] == [
                {"date": dates(1)[0], "client": key_id(key), "requests": requests,
                 "input_tokens": 10 * requests, "output_tokens": 5 * requests, "limited": 0}
            ]  # fmt: skip
    # Without a key the access check refuses it, as any path (nothing says usage is there).
    assert (await proxy.get("/limits/usage")).status == 401


async def test_an_admin_key_reads_every_client(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    sai.default = Reply(headers=TOKENS)
    proxy = await make_proxy(
        LIMITS_CLIENT_RPM="10", PROXY_API_KEYS="team-a-key,team-b-key",
        ADMIN_API_KEYS=f"{ADMIN},second-admin-key", **store,
    )  # fmt: skip
    for key in ("team-a-key", "team-b-key"):
        headers = {"x-api-key": key}
        assert (await proxy.post("/v1/chat/completions", json=HI, headers=headers)).status == 200
    await asyncio.sleep(0.1)
    for headers in ({"Authorization": f"Bearer {ADMIN}"}, {"x-api-key": "second-admin-key"}):
        (page,) = await read_pages(proxy, headers)
        assert sorted(row["client"] for row in page["rows"]) == sorted(
            [key_id("team-a-key"), key_id("team-b-key")]
        )
        assert page["mode"] == ("shared" if store else "local")
    # An admin key is no proxy key: it opens this route only.
    refused = await proxy.post(
        "/v1/chat/completions", json=HI, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert refused.status == 401
    models = await proxy.get("/v1/models", headers={"x-api-key": ADMIN})
    assert models.status == 401


async def test_pages_hold_each_client_once_and_a_bad_cursor_is_400(
    make_proxy: MakeProxy, sai: FakeSai, store: dict[str, str]
) -> None:
    keys = [f"client-key-{index}" for index in range(7)]
    proxy = await make_proxy(
        LIMITS_CLIENT_RPM="10", PROXY_API_KEYS=",".join(keys), ADMIN_API_KEYS=ADMIN, **store
    )
    for key in keys:
        headers = {"x-api-key": key}
        assert (await proxy.post("/v1/chat/completions", json=HI, headers=headers)).status == 200
    await asyncio.sleep(0.1)
    pages = await read_pages(proxy, {"x-api-key": ADMIN}, limit="2", days="2")
    assert all(len(page["rows"]) <= 2 for page in pages)
    seen = [row["client"] for page in pages for row in page["rows"]]
    assert sorted(seen) == sorted(key_id(key) for key in keys)
    admin = {"x-api-key": ADMIN}
    for query in ({"cursor": "not-a-cursor"}, {"limit": "1001"}, {"limit": "0"}, {"days": "41"}):
        response = await proxy.get("/limits/usage", params=query, headers=admin)
        assert response.status == 400, query
        assert (await response.json())["error"]["param"] == next(iter(query))


async def test_20000_clients_in_valkey_answered_page_by_page(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    # Today's usage hash of 20,000 clients, written directly (as the settle script writes it:
    # <client>:<counter> fields), some clients refused only.
    today = dates(1)[0]
    clients = [f"key-{index:016x}" for index in range(20_000)]
    store = redis.Redis.from_url(valkey.url, socket_timeout=30)
    pipe = store.pipeline(transaction=False)
    for start in range(0, len(clients), 500):
        fields: dict[str, int] = {}
        for index in range(start, start + 500):
            client = clients[index]
            if index % 10 == 0:
                fields[f"{client}:limited"] = 1
            else:
                fields |= {f"{client}:requests": index, f"{client}:input": 3, f"{client}:output": 4}
        pipe.hset(f"saiproxy:usage:{today}", mapping=fields)  # type: ignore[arg-type]
    pipe.execute()
    proxy = await make_proxy(LIMITS_URL=valkey.url, ADMIN_API_KEYS=ADMIN)
    admin = {"x-api-key": ADMIN}
    seen: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    pages = 0
    while True:
        store.config_resetstat()
        params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
        response = await proxy.get("/limits/usage", params=params, headers=admin)
        assert response.status == 200
        page = await response.json()
        pages += 1
        # Each page's work in the store is bounded: a few HSCAN batches of at most
        # `limit` fields and the HMGET of their clients; never the whole hash.
        stats = store.info("commandstats")
        assert "cmdstat_hgetall" not in stats
        assert stats["cmdstat_hscan"]["calls"] <= 16
        assert stats.get("cmdstat_hmget", {"calls": 0})["calls"] <= 16
        assert len(page["rows"]) <= 1000
        for row in page["rows"]:
            assert row["client"] not in seen, "a client seen twice"
            seen[row["client"]] = row
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 200
    assert sorted(seen) == clients
    assert seen[clients[0]] == {"date": today, "client": clients[0], "requests": 0,
                                "input_tokens": 0, "output_tokens": 0, "limited": 1}  # fmt: skip
    assert seen[clients[7]] == {"date": today, "client": clients[7], "requests": 7,
                                "input_tokens": 3, "output_tokens": 4, "limited": 0}  # fmt: skip
    # The default page is 100 rows.
    first = await (await proxy.get("/limits/usage", headers=admin)).json()
    assert len(first["rows"]) <= 100 and first["next_cursor"] is not None
    store.close()


class UsageServer:
    """A stand-in for the proxy's usage endpoint: two pages; records every Authorization."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        self.app = web.Application()
        self.app.router.add_get("/limits/usage", self.usage)

    async def usage(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization"))
        row = {"date": dates(1)[0], "requests": 1, "input_tokens": 2, "output_tokens": 3,
               "limited": 0}  # fmt: skip
        if request.query.get("cursor") != "page-2":
            client, following = "key-first", "page-2"
        else:
            client, following = "key-second", None
        rows = [{**row, "client": client}]
        return web.json_response({"mode": "local", "rows": rows, "next_cursor": following})


async def _usage_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LIMITS_", "ADMIN_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "saiproxy", "usage", *args,
        env={**clean, "SAIPROXY_CONFIG": CONFIG, **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def usage_server() -> Any:
    fake = UsageServer()
    server = TestServer(fake.app, host="127.0.0.1")
    await server.start_server()
    fake.port = server.port  # type: ignore[attr-defined]
    yield fake
    await server.close()


async def test_the_cli_sends_the_admin_key_not_a_proxy_key(usage_server: Any) -> None:
    env = {"PORT": str(usage_server.port), "PROXY_API_KEYS": "a-proxy-key",
           "ADMIN_API_KEYS": f"{ADMIN},another-admin-key"}  # fmt: skip
    code, out, err = await _usage_cli(env, "--json")
    assert code == 0, err
    assert usage_server.authorizations == [f"Bearer {ADMIN}", f"Bearer {ADMIN}"]  # both pages
    assert [row["client"] for row in json.loads(out)["rows"]] == ["key-first", "key-second"]
    assert ADMIN not in out + err


async def test_the_cli_without_an_admin_key_says_what_to_set(usage_server: Any) -> None:
    env = {"PORT": str(usage_server.port), "PROXY_API_KEYS": "a-proxy-key"}
    code, _, err = await _usage_cli(env)
    assert code == 2
    assert "ADMIN_API_KEYS" in err and "LIMITS_URL" in err
    assert usage_server.authorizations == []  # nothing sent, least of all the proxy key


async def test_pages_go_day_by_day_newest_first_in_valkey(
    make_proxy: MakeProxy, sai: FakeSai, valkey: ValkeyServer
) -> None:
    today, yesterday, before = dates(3)
    own = key_id("team-a-key")
    store = redis.Redis.from_url(valkey.url, socket_timeout=5)
    for date, clients in ((today, 4), (yesterday, 0), (before, 5)):
        for index in range(clients):
            store.hset(f"saiproxy:usage:{date}", f"key-{index:016x}:requests", 1)
        store.hset(f"saiproxy:usage:{date}", f"{own}:requests", 2)
    proxy = await make_proxy(
        LIMITS_URL=valkey.url, PROXY_API_KEYS="team-a-key", ADMIN_API_KEYS=ADMIN
    )
    pages = await read_pages(proxy, {"x-api-key": ADMIN}, days="3", limit="3")
    assert all(len(page["rows"]) <= 3 for page in pages)
    seen = [(row["date"], row["client"]) for page in pages for row in page["rows"]]
    assert len(seen) == len(set(seen)) == 4 + 1 + 1 + 5 + 1
    assert [date for date, _ in seen] == sorted((date for date, _ in seen), reverse=True)
    # A proxy key's own rows, one a day, a page at a time.
    pages = await read_pages(proxy, {"x-api-key": "team-a-key"}, days="3", limit="1")
    assert [row["date"] for page in pages for row in page["rows"]] == [today, yesterday, before]
    store.close()
