"""The platform MCP endpoint and Shell pools, end to end: router in process, a real worker, real
code-interpreter and shell containers, driven by the real MCP Python SDK client over streamable
HTTP, by bare JSON-RPC POSTs (the sequence of ACA's tutorial), and by LangChain's tools.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from router.keys import Keys
from router.settings import Settings
from router.store import Store, open_redis
from sessionpool.testing import builtin_pool_body, serving_router
from tests.conftest import RedisServer
from tests.helpers import PNG_MAGIC, assert_png, docker_worker, engine_fixture, wait_until

# One router, worker and pair of pools for the whole module (starting them is most of the cost).
pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="module"),
]

IMAGES = {"code-interpreter": "sessionpool/code-interpreter:dev", "shell": "sessionpool/shell:dev"}
PY, SH = "mcppy", "mcpsh"
RUN_PY = "runPythonCodeInRemoteEnvironment"
RUN_SH = "runShellCommandInRemoteEnvironment"


def _pool(container_type: str, mcp: bool = True) -> dict[str, Any]:
    return builtin_pool_body(
        container_type, max_sessions=8, mcpServerSettings={"isMCPServerEnabled": mcp}
    )


engine = engine_fixture(*IMAGES.values())  # built when missing


@dataclass
class Env:
    url: str
    store: Store
    http: aiohttp.ClientSession

    def mcp_url(self, pool: str) -> str:
        return f"{self.url}/pools/{pool}/mcp"

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, f"{self.url}/admin/pools/{path}", json=body) as r:
            return r.status, await r.json(content_type=None)

    async def key(self, pool: str) -> str:
        status, body = await self.admin("POST", f"{pool}/fetchMcpServerCredentials")
        assert status == 200, body
        return str(body["apiKey"])

    async def rpc(
        self, pool: str, key: str | None, message: Any, accept: str = "application/json"
    ) -> tuple[int, Any, Any]:
        """One bare POST, as curl sends it: no session header, no SDK."""
        headers = {"Content-Type": "application/json", "Accept": accept}
        if key is not None:
            headers["x-ms-apikey"] = key
        async with self.http.post(self.mcp_url(pool), json=message, headers=headers) as r:
            raw = await r.read()
            if r.content_type == "text/event-stream":
                events = [
                    line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")
                ]
                assert len(events) == 1, raw
                return r.status, r.headers, _loads(events[0])
            return r.status, r.headers, _loads(raw) if raw else None


def _loads(raw: str | bytes) -> Any:
    return json.loads(raw)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(engine: Any, redis_server: RedisServer) -> AsyncIterator[Env]:
    settings = Settings(
        redis_url=redis_server.url,
        key_prefix=f"t{uuid.uuid4().hex[:10]}",
        activity_flush_s=0.1,
        auth="none",
    )
    redis = open_redis(settings.redis_url)
    store = Store(redis, Keys(settings.key_prefix))
    worker = settings.replace(reconcile_interval_s=1, orphan_grace_s=2, warm_timeout_s=60)
    try:
        async with (
            docker_worker(engine, worker),
            serving_router(settings.replace(allocation_wait_s=60.0)) as base,
            aiohttp.ClientSession() as http,
        ):
            e = Env(base, store, http)
            for name, ctype in ((PY, "PythonLTS"), (SH, "Shell")):
                status, body = await e.admin("PUT", name, _pool(ctype))
                assert status == 201, body
            await wait_until(_all_ready(store), timeout=90, interval=0.05)
            yield e
    finally:
        await redis.aclose()


def _all_ready(store: Store) -> Any:
    async def check() -> bool:
        return all([(await store.counts(p))["ready"] >= 1 for p in (PY, SH)])

    return check


# --- the official MCP Python SDK client ----------------------------------------------------


async def test_sdk_client_against_python_and_shell_pools(env: Env) -> None:
    from mcp import Client, ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client
    from mcp.shared.exceptions import MCPError

    async def connect(pool: str, key: str) -> Any:
        http = create_mcp_http_client(headers={"x-ms-apikey": key})
        return http, streamable_http_client(env.mcp_url(pool), http_client=http)

    # Python pool: launch, state kept between calls, shell too, a figure, errors.
    http, transport = await connect(PY, await env.key(PY))
    async with http, transport as (read, write), ClientSession(read, write) as session:
        init = await session.initialize()
        assert init.protocol_version in ("2025-03-26", "2025-06-18", "2025-11-25")
        assert init.capabilities.tools is not None
        await session.send_ping()
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert set(tools) == {"launchShell", RUN_PY, RUN_SH}
        assert tools[RUN_PY].input_schema["required"] == ["environmentId", "pythonCode"]
        launched = await session.call_tool("launchShell", {})
        env_id = launched.structured_content["environmentId"]
        first = await session.call_tool(RUN_PY, {"environmentId": env_id, "pythonCode": "x = 41"})
        assert not first.is_error, first
        second = await session.call_tool(
            RUN_PY, {"environmentId": env_id, "pythonCode": "print('out'); x + 1"}
        )
        assert second.structured_content["result"] == 42  # the kernel kept x
        assert second.structured_content["stdout"] == "out\n"
        shell = await session.call_tool(
            RUN_SH, {"environmentId": env_id, "shellCommand": "cat /etc/hostname; exit 4"}
        )
        assert shell.structured_content["exitCode"] == 4
        plot = await session.call_tool(
            RUN_PY,
            {
                "environmentId": env_id,
                "pythonCode": "import matplotlib\nmatplotlib.use('Agg')\n"
                "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()",
            },
        )
        images = [c for c in plot.content if c.type == "image"]
        assert len(images) == 1
        assert base64.b64decode(images[0].data).startswith(PNG_MAGIC)
        with pytest.raises(MCPError, match="Unknown tool"):
            await session.call_tool("deleteEverything", {})
        with pytest.raises(MCPError, match="Unknown environment"):
            await session.call_tool(
                RUN_SH, {"environmentId": "never-launched", "shellCommand": "ls"}
            )

    # Shell pool: shell only.
    http, transport = await connect(SH, await env.key(SH))
    async with http, transport as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {t.name for t in (await session.list_tools()).tools}
        assert tools == {"launchShell", RUN_SH}
        env_id = (await session.call_tool("launchShell", {})).structured_content["environmentId"]
        await session.call_tool(RUN_SH, {"environmentId": env_id, "shellCommand": "echo 7 > n"})
        out = await session.call_tool(
            RUN_SH, {"environmentId": env_id, "shellCommand": 'jq -n "$(cat n) * 6"'}
        )
        assert out.structured_content == {"stdout": "42\n", "stderr": "", "exitCode": 0}
        with pytest.raises(MCPError, match="Unknown tool"):
            await session.call_tool(RUN_PY, {"environmentId": env_id, "pythonCode": "1"})

    # The SDK's high-level Client (mode "auto"): it probes `server/discover` (2026-07-28),
    # which we do not speak, then falls back to the initialize handshake.
    http, transport = await connect(SH, await env.key(SH))
    async with http, Client(transport) as client:
        assert client.protocol_version == "2025-11-25"
        launched = await client.call_tool("launchShell", {})
        assert launched.structured_content["environmentId"]

    # A wrong key: the SDK's initialize fails (its task groups wrap the error).
    http, transport = await connect(SH, "not-the-key")
    with pytest.raises(ExceptionGroup) as failed:
        async with http, transport as (read, write), ClientSession(read, write) as session:
            await asyncio.wait_for(session.initialize(), 30)
    assert failed.group_contains(MCPError)


# --- bare JSON-RPC, as ACA's tutorial sends it with curl -----------------------------------


def _call(name: str, arguments: dict[str, Any], rid: Any = "2") -> dict[str, Any]:
    params = {"name": name, "arguments": arguments}
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}


async def test_bare_json_rpc_sequence_on_a_shell_pool(env: Env) -> None:
    key = await env.key(SH)
    status, headers, init = await env.rpc(
        SH, key, {"jsonrpc": "2.0", "id": "1", "method": "initialize"}
    )
    assert status == 200
    assert init["id"] == "1"
    assert init["result"]["protocolVersion"] == "2025-03-26"
    assert init["result"]["serverInfo"]["name"]
    assert "tools" in init["result"]["capabilities"]
    assert headers["Mcp-Session-Id"]  # issued, never required below
    # A client that asks for a newer version it and we both speak gets it.
    newer = {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "c", "version": "1"},
    }
    _, _, init2 = await env.rpc(
        SH, key, {"jsonrpc": "2.0", "id": 9, "method": "initialize", "params": newer}
    )
    assert init2["result"]["protocolVersion"] == "2025-06-18"
    assert init2["id"] == 9
    status, _, body = await env.rpc(
        SH, key, {"jsonrpc": "2.0", "method": "notifications/initialized"}
    )
    assert (status, body) == (202, None)

    _, _, launched = await env.rpc(SH, key, _call("launchShell", {}))
    env_id = launched["result"]["structuredContent"]["environmentId"]
    _, _, ran = await env.rpc(
        SH, key, _call(RUN_SH, {"environmentId": env_id, "shellCommand": "echo hi; exit 3"})
    )
    assert ran["result"]["structuredContent"] == {"stdout": "hi\n", "stderr": "", "exitCode": 3}
    assert ran["result"]["content"][0]["type"] == "text"

    # The same answer as one SSE event for a caller that accepts only a stream.
    status, headers, streamed = await env.rpc(
        SH,
        key,
        _call(RUN_SH, {"environmentId": env_id, "shellCommand": "pwd"}),
        accept="text/event-stream",
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert streamed["result"]["structuredContent"]["stdout"] == "/mnt/data\n"

    # ping, tools/list, and what is refused: JSON-RPC errors, never a 500.
    _, _, pong = await env.rpc(SH, key, {"jsonrpc": "2.0", "id": 3, "method": "ping"})
    assert pong == {"jsonrpc": "2.0", "id": 3, "result": {}}
    _, _, listed = await env.rpc(SH, key, {"jsonrpc": "2.0", "id": 4, "method": "tools/list"})
    schemas = {t["name"]: t["inputSchema"] for t in listed["result"]["tools"]}
    assert schemas[RUN_SH]["required"] == ["environmentId", "shellCommand"]
    assert RUN_PY not in schemas
    refused = {
        "unknown tool": _call(RUN_PY, {"environmentId": env_id, "pythonCode": "1"}),
        "unknown method": {"jsonrpc": "2.0", "id": 5, "method": "resources/list"},
        "missing argument": _call(RUN_SH, {"environmentId": env_id}),
        "extra argument": _call(RUN_SH, {"environmentId": env_id, "shellCommand": "ls", "x": 1}),
        "wrong type": _call(RUN_SH, {"environmentId": env_id, "shellCommand": ["ls"]}),
        "bad params": {
            "jsonrpc": "2.0",
            "id": 6,
            "method": "tools/call",
            "params": {"arguments": {}},
        },
        "unknown environment": _call(
            RUN_SH, {"environmentId": "nobody-launched-this", "shellCommand": "ls"}
        ),
        "malformed environment": _call(RUN_SH, {"environmentId": "a b", "shellCommand": "ls"}),
    }
    codes = {}
    for why, message in refused.items():
        status, _, body = await env.rpc(SH, key, message)
        assert status == 200, (why, body)
        assert "result" not in body, why
        codes[why] = body["error"]["code"]
        assert body["error"]["message"], why
    assert codes["unknown method"] == -32601
    assert codes["unknown tool"] == codes["missing argument"] == codes["bad params"] == -32602
    status, _, body = await env.rpc(SH, key, "not json-rpc")
    assert status == 400
    assert body["error"]["code"] == -32600
    async with env.http.post(env.mcp_url(SH), data=b"{nope", headers={"x-ms-apikey": key}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == -32700
    async with env.http.get(env.mcp_url(SH), headers={"x-ms-apikey": key}) as r:
        assert r.status == 405


async def test_keys_wrong_rotated_and_a_stopped_environment(env: Env) -> None:
    key = await env.key(PY)
    assert await env.key(PY) == key  # the same key every fetch, as ACA
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    for wrong in (None, "", "not-the-key", key + "x"):
        status, _, body = await env.rpc(PY, wrong, ping)
        assert status == 401, wrong
        assert body["error"]["code"] == "Unauthorized"
        assert key not in str(body)
    # Another pool's key opens nothing here.
    status, _, _ = await env.rpc(PY, await env.key(SH), ping)
    assert status == 401

    _, _, launched = await env.rpc(PY, key, _call("launchShell", {}))
    env_id = launched["result"]["structuredContent"]["environmentId"]
    _, _, ran = await env.rpc(
        PY, key, _call(RUN_PY, {"environmentId": env_id, "pythonCode": "y = 5\ny * 2"})
    )
    assert ran["result"]["structuredContent"]["result"] == 10

    # Rotation: the old key is refused at once (no cache), the new one works, state survives.
    status, rotated = await env.admin("POST", f"{PY}/ROTATEmcpSERVERcredentials")
    assert status == 200
    new_key = rotated["apiKey"]
    assert new_key != key
    assert (await env.rpc(PY, key, ping))[0] == 401
    _, _, again = await env.rpc(
        PY, new_key, _call(RUN_PY, {"environmentId": env_id, "pythonCode": "y"})
    )
    assert again["result"]["structuredContent"]["result"] == 5
    assert await env.key(PY) == new_key

    # The environment is the pool's session of that identifier: stopping it ends it.
    async with env.http.post(
        f"{env.url}/pools/{PY}/.management/stopSession", params={"identifier": env_id}
    ) as r:
        assert r.status == 200
    status, _, gone = await env.rpc(
        PY, new_key, _call(RUN_PY, {"environmentId": env_id, "pythonCode": "y"})
    )
    assert status == 200
    assert "ended" in gone["error"]["message"]
    assert await env.store.get_session(PY, env_id) is None  # no fresh session behind its back


async def test_admin_mcp_settings(env: Env) -> None:
    status, view = await env.admin("GET", PY)
    assert status == 200
    assert view["properties"]["mcpServerSettings"] == {
        "isMCPServerEnabled": True,
        "mcpServerEndpoint": f"{env.url}/pools/{PY}/mcp",
    }
    key = await env.key(PY)
    assert key not in str(view)
    # GET output can be PUT back as it is (the endpoint is read-only and dropped).
    assert (await env.admin("PUT", PY, view))[0] == 200
    # Both spellings, any case.
    for path in ("fetchMCPServerCredentials", "FETCHMCPSERVERCREDENTIALS"):
        status, body = await env.admin("POST", f"{PY}/{path}")
        assert (status, body) == (200, {"apiKey": key})
    status, body = await env.admin("POST", f"{PY}/fetchSomethingElse")
    assert status == 404
    status, body = await env.admin("POST", "nosuchpool/fetchMcpServerCredentials")
    assert status == 404
    custom = _pool("CustomContainer")
    custom["properties"]["customContainerTemplate"] = {
        "containers": [{"name": "main", "image": "sessionpool/echo:dev"}],
        "ingress": {"targetPort": 8080},
    }
    status, body = await env.admin("PUT", "mcpcustom", custom)
    assert status == 400
    assert "mcpServerSettings.isMCPServerEnabled" in body["error"]["message"]
    assert "PythonLTS or Shell" in body["error"]["message"]
    # A pool without the endpoint has no credentials, and its /mcp is its sessions' own path.
    status, body = await env.admin(
        "PATCH", SH, {"properties": {"mcpServerSettings": {"isMCPServerEnabled": False}}}
    )
    assert status == 200
    assert "mcpServerEndpoint" not in str(body)
    status, body = await env.admin("POST", f"{SH}/fetchMcpServerCredentials")
    assert status == 400
    assert "isMCPServerEnabled" in body["error"]["message"]
    try:
        async with env.http.post(
            env.mcp_url(SH),
            params={"identifier": "plain-session"},
            json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        ) as r:
            assert r.status == 404  # the shell session's own server: no /mcp there
    finally:  # the other tests use the Shell pool's endpoint
        enable = {"properties": {"mcpServerSettings": {"isMCPServerEnabled": True}}}
        assert (await env.admin("PATCH", SH, enable))[0] == 200


# --- Shell pools through the router, and LangChain's tools -----------------------------------


async def test_shell_pool_executions_and_python_refused(env: Env) -> None:
    base = f"{env.url}/pools/{SH}"
    params = {"api-version": "2025-02-02-preview", "identifier": "shell-one"}
    async with env.http.post(
        f"{base}/executions", params=params, json={"shellCommand": "echo a; exit 2"}
    ) as r:
        assert r.status == 200
        body = await r.json()
    assert body["status"] == "2"
    assert body["result"]["stdout"] == "a\n"
    async with env.http.post(f"{base}/executions", params=params, json={"code": "print(1)"}) as r:
        assert r.status == 400
        assert "'code'" in (await r.json())["error"]["message"]
    async with env.http.delete(f"{base}/session", params=params) as r:
        assert r.status == 204  # the ACA session-delete path LangChain uses
    async with env.http.get(f"{base}/metadata") as r:
        assert [rt["name"] for rt in (await r.json())["runtimes"]] == ["bash"]


async def test_langchain_tools_against_shell_and_python_pools(env: Env) -> None:
    with warnings.catch_warnings():  # "deprecated: use langchain-azure-compute" (same code)
        warnings.simplefilter("ignore", DeprecationWarning)
        from langchain_azure_dynamic_sessions import SessionsBashTool, SessionsPythonREPLTool

    def token() -> str:
        return "dummy-token"  # the router runs with auth none; the tools insist on one

    def run_bash() -> tuple[Any, ...]:
        tool = SessionsBashTool(
            pool_management_endpoint=f"{env.url}/pools/{SH}", access_token_provider=token
        )
        first = tool.invoke("echo hello > greeting.txt && cat greeting.txt")
        second = tool.invoke("cat greeting.txt; ls /nonexistent")
        files = [f.filename for f in tool.list_files()]
        content = tool.download_file(remote_file_path="greeting.txt").read()
        return first, second, files, content

    first, second, files, content = await asyncio.to_thread(run_bash)
    assert _loads(first) == {"stdout": "hello\n", "stderr": "", "exitCode": 0}
    second = _loads(second)
    assert second["stdout"] == "hello\n"
    assert second["exitCode"] == 2
    assert "greeting.txt" in files
    assert content == b"hello\n"

    def run_python() -> Any:
        tool = SessionsPythonREPLTool(
            pool_management_endpoint=f"{env.url}/pools/{PY}", access_token_provider=token
        )
        code = (
            "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "plt.plot([3, 1, 2])\nplt.show()"
        )
        return tool.execute(code)

    props = await asyncio.to_thread(run_python)
    assert props["status"] == "Success"
    assert_png(props["result"])
