"""The MCP endpoint's edges, without Docker: real router and Redis, loopback sandboxes that
play a session's executions API. What must never become a 500, and what must stay scoped."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from router.app import create_app
from router.identifiers import session_key
from router.mcp_tools import MAX_UNUSED_ENVIRONMENTS
from router.pools import parse_pool
from router.settings import Settings
from router.store import Store
from tests.helpers import FakeSandbox, add_ready, make_pool, wait_until

RUN_SH = "runShellCommandInRemoteEnvironment"


class ShellSandbox:
    """Answers `POST /executions` like the shell image: the command echoed, exit code 0."""

    def __init__(self) -> None:
        self.name = f"sh-{uuid.uuid4().hex[:8]}"
        self.bodies: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_post("/executions", self.execute)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def execute(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        result = {"stdout": body["shellCommand"] + "\n", "stderr": ""}
        return web.json_response({"status": "0", "exitCode": 0, "result": result})


def shell_pool(name: str, *, max_sessions: int = 10, **props: Any) -> Any:
    body = {
        "properties": {
            "containerType": "Shell",
            "scaleConfiguration": {"maxConcurrentSessions": max_sessions},
            "mcpServerSettings": {"isMCPServerEnabled": True},
            **props,
        }
    }
    return parse_pool(name, body)


@pytest.fixture
async def router(settings: Settings) -> AsyncIterator[str]:
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


@pytest.fixture
async def shells() -> AsyncIterator[list[ShellSandbox]]:
    started: list[ShellSandbox] = []
    yield started
    for sandbox in started:
        await sandbox.server.close()


async def ready_shell(store: Store, pool: Any, shells: list[ShellSandbox]) -> ShellSandbox:
    sandbox = ShellSandbox()
    await sandbox.server.start_server()
    shells.append(sandbox)
    await add_ready(store, pool, sandbox)  # type: ignore[arg-type]
    return sandbox


class Mcp:
    def __init__(self, http: aiohttp.ClientSession, url: str, key: str) -> None:
        self.http, self.url, self.key = http, url, key

    async def post(self, message: Any) -> tuple[int, Any]:
        headers = {"x-ms-apikey": self.key}
        async with self.http.post(self.url, json=message, headers=headers) as r:
            raw = await r.read()
            return r.status, (await r.json() if raw else None)

    async def call(self, name: str, arguments: dict[str, Any]) -> Any:
        message = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments},
        }
        status, body = await self.post(message)
        assert status == 200, body
        return body

    async def launch(self) -> str:
        body = await self.call("launchShell", {})
        return str(body["result"]["structuredContent"]["environmentId"])


async def open_mcp(http: aiohttp.ClientSession, router: str, store: Store, pool: Any) -> Mcp:
    await store.put_pool(pool)
    async with http.post(f"{router}/admin/pools/{pool.name}/fetchMcpServerCredentials") as r:
        assert r.status == 200
        key = (await r.json())["apiKey"]
    return Mcp(http, f"{router}/pools/{pool.name}/mcp", key)


async def test_pool_at_its_limit_and_unreachable_sessions_are_json_rpc_errors(
    http: aiohttp.ClientSession, router: str, store: Store, shells: list[ShellSandbox]
) -> None:
    pool = shell_pool("mcplimit", max_sessions=1)
    mcp = await open_mcp(http, router, store, pool)
    sandbox = await ready_shell(store, pool, shells)
    first, second = await mcp.launch(), await mcp.launch()
    ok = await mcp.call(RUN_SH, {"environmentId": first, "shellCommand": "echo one"})
    assert ok["result"]["structuredContent"]["stdout"] == "echo one\n"
    full = await mcp.call(RUN_SH, {"environmentId": second, "shellCommand": "ls"})
    assert "maximum of 1" in full["error"]["message"]
    await sandbox.server.close()  # the first environment's sandbox stops answering
    gone = await mcp.call(RUN_SH, {"environmentId": first, "shellCommand": "ls"})
    assert gone["error"]["code"] == -32002
    assert "127.0.0.1" not in gone["error"]["message"]  # no sandbox address leaks


async def test_environments_are_bound_to_the_key_holder_on_tenant_bound_pools(
    http: aiohttp.ClientSession, router: str, store: Store, shells: list[ShellSandbox]
) -> None:
    pool = shell_pool("mcpbound", tenantBinding=True)
    mcp = await open_mcp(http, router, store, pool)
    sandbox = await ready_shell(store, pool, shells)
    env = await mcp.launch()
    await mcp.call(RUN_SH, {"environmentId": env, "shellCommand": "id"})
    assert sandbox.bodies == [{"shellCommand": "id"}]
    # Stored under the key holder's scope: a data-plane caller naming the same identifier
    # does not reach it, nor learn it exists.
    assert await store.get_session(pool.name, session_key(env, f"mcp:{pool.name}")) is not None
    assert await store.get_session(pool.name, env) is None
    async with http.get(
        f"{router}/pools/{pool.name}/.management/getSession", params={"identifier": env}
    ) as r:
        assert r.status == 404


async def test_batches_notifications_and_keys_before_the_first_fetch(
    http: aiohttp.ClientSession, router: str, store: Store
) -> None:
    pool = shell_pool("mcpbatch")
    await store.put_pool(pool)
    url = f"{router}/pools/{pool.name}/mcp"
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with http.post(url, json=ping, headers={"x-ms-apikey": "guess"}) as r:
        assert r.status == 401  # no key made yet: nothing opens it
    mcp = await open_mcp(http, router, store, pool)
    status, answers = await mcp.post(
        [
            {"jsonrpc": "2.0", "id": "a", "method": "initialize"},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": "b", "method": "ping"},
            {"jsonrpc": "2.0", "id": "c", "result": {}},  # a client's response: ignored
        ]
    )
    assert status == 200
    assert [a["id"] for a in answers] == ["a", "b"]
    assert (await mcp.post([]))[0] == 400
    assert (await mcp.post([ping] * 33))[0] == 400
    status, body = await mcp.post({"jsonrpc": "2.0", "id": 1.5, "method": "ping"})
    assert body["error"]["code"] == -32600
    status, body = await mcp.post({"jsonrpc": "2.0", "id": 2, "method": "tools/call"})
    assert body["error"]["code"] == -32602


async def test_custom_container_pools_keep_their_own_mcp_path(
    http: aiohttp.ClientSession, router: str, store: Store
) -> None:
    pool = make_pool("ownmcp", ready=1)
    await store.put_pool(pool)
    sandbox = await FakeSandbox().start()
    try:
        await add_ready(store, pool, sandbox)
        async with http.post(
            f"{router}/pools/ownmcp/mcp?identifier=someone", json={"jsonrpc": "2.0"}
        ) as r:
            assert r.status == 200
            assert (await r.json())["raw_path"] == "/mcp?identifier=someone"
        async with http.post(f"{router}/admin/pools/ownmcp/fetchMcpServerCredentials") as r:
            assert r.status == 400
    finally:
        await sandbox.close()


async def test_a_deleted_pool_takes_its_key_along(
    http: aiohttp.ClientSession, router: str, store: Store
) -> None:
    pool = shell_pool("mcpgone")
    mcp = await open_mcp(http, router, store, pool)
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    assert (await mcp.post(ping))[0] == 200
    async with http.delete(f"{router}/admin/pools/{pool.name}") as r:
        assert r.status == 204
    async with http.post(mcp.url, json=ping, headers={"x-ms-apikey": mcp.key}) as r:
        # Gone: its /mcp is an ordinary (missing) pool path now, not an MCP endpoint.
        assert r.status in (400, 401, 404)
    # A pool made again under the same name gets a new key; the old one opens nothing.
    again = await open_mcp(http, router, store, pool)
    assert again.key != mcp.key
    assert (await mcp.post(ping))[0] == 401
    assert (await again.post(ping))[0] == 200


async def test_a_key_header_that_is_not_utf8_is_a_401(
    http: aiohttp.ClientSession, router: str, store: Store
) -> None:
    pool = shell_pool("mcpbytes")
    await open_mcp(http, router, store, pool)
    host, port = router.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
    writer.write(
        b"POST /pools/mcpbytes/mcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"x-ms-apikey: \xff\xfe\x80key\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert status_line.split()[1] == b"401"


class HostileSandbox(ShellSandbox):
    """A session whose server answers executions with whatever the command asks for."""

    async def execute(self, request: web.Request) -> web.StreamResponse:
        command = (await request.json())["shellCommand"]
        if command == "flood":  # far more than any honest answer
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            chunk = b"x" * (1 << 20)
            for _ in range(80):
                await resp.write(chunk)
            return resp
        shapes: dict[str, bytes] = {
            "not-json": b"<html>",
            "a-list": b"[1, 2]",
            "odd-result": b'{"result": [1], "exitCode": "zero"}',
            "refused": b'{"error": {"code": "X", "message": "no"}}',
        }
        status = 400 if command == "refused" else 200
        return web.Response(body=shapes[command], status=status, content_type="application/json")


async def test_a_hostile_session_answer_is_a_json_rpc_error_or_a_plain_result(
    http: aiohttp.ClientSession, router: str, store: Store, shells: list[ShellSandbox]
) -> None:
    pool = shell_pool("mcphostile")
    mcp = await open_mcp(http, router, store, pool)
    sandbox = HostileSandbox()
    await sandbox.server.start_server()
    shells.append(sandbox)
    await add_ready(store, pool, sandbox)  # type: ignore[arg-type]
    env = await mcp.launch()
    for command in ("flood", "not-json", "a-list", "refused"):
        body = await mcp.call(RUN_SH, {"environmentId": env, "shellCommand": command})
        assert "error" in body, (command, body)
    odd = await mcp.call(RUN_SH, {"environmentId": env, "shellCommand": "odd-result"})
    assert odd["result"]["structuredContent"] == {"stdout": "", "stderr": "", "exitCode": None}


async def test_launches_past_the_unused_cap_are_refused_until_one_is_used_or_expires(
    http: aiohttp.ClientSession, router: str, store: Store, shells: list[ShellSandbox]
) -> None:
    """A caller looping on launchShell (each launch is a Redis record for one cooldown) is
    refused past MAX_UNUSED_ENVIRONMENTS, while using an environment and waiting out the
    cooldown each make room again."""
    life = {"lifecycleConfiguration": {"lifecycleType": "Timed", "cooldownPeriodInSeconds": 2}}
    pool = shell_pool("mcpflood", max_sessions=1, dynamicPoolConfiguration=life)
    mcp = await open_mcp(http, router, store, pool)
    await ready_shell(store, pool, shells)
    launch = {
        "jsonrpc": "2.0",
        "method": "tools/call",
        "params": {"name": "launchShell", "arguments": {}},
    }
    envs: list[str] = []
    while len(envs) < MAX_UNUSED_ENVIRONMENTS:  # in batches: 32 calls a request
        n = min(32, MAX_UNUSED_ENVIRONMENTS - len(envs))
        status, answers = await mcp.post([{**launch, "id": i} for i in range(n)])
        assert status == 200
        envs += [a["result"]["structuredContent"]["environmentId"] for a in answers]
    assert len(set(envs)) == MAX_UNUSED_ENVIRONMENTS

    refused = await mcp.call("launchShell", {})
    assert refused["error"]["code"] == -32002
    assert (
        f"{MAX_UNUSED_ENVIRONMENTS} environments launched and not used"
        in (refused["error"]["message"])
    )
    assert await store.redis.zcard(store.pk(pool.name).mcp_unused) == MAX_UNUSED_ENVIRONMENTS

    # Using one makes room for one more; the next is refused again.
    ran = await mcp.call(RUN_SH, {"environmentId": envs[0], "shellCommand": "true"})
    assert ran["result"]["structuredContent"]["exitCode"] == 0
    assert "result" in await mcp.call("launchShell", {})
    assert "error" in await mcp.call("launchShell", {})

    # Unused ones expire with the cooldown, and take their room along.
    async def room() -> bool:
        return "result" in await mcp.call("launchShell", {})

    await wait_until(room, timeout=10, interval=0.2)
    assert await store.mcp_env(pool.name, envs[1]) is None  # expired, not just uncounted
