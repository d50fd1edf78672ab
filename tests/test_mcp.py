"""The platform MCP endpoint and Shell pools, end to end: router in process, a real worker, real
code-interpreter and shell containers, driven by the real MCP Python SDK client over streamable
HTTP, by bare JSON-RPC POSTs (the sequence of ACA's tutorial), and by LangChain's tools.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import docker
import docker.errors
import pytest
from aiohttp.test_utils import TestServer

from router.app import create_app
from router.settings import Settings
from router.store import Store
from tests.helpers import wait_until
from workers.runtime import LABEL_SCOPE

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {"code-interpreter": "sessionpool/code-interpreter:dev", "shell": "sessionpool/shell:dev"}
PY, SH = "mcppy", "mcpsh"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_PY = "runPythonCodeInRemoteEnvironment"
RUN_SH = "runShellCommandInRemoteEnvironment"


def _pool(container_type: str, mcp: bool = True) -> dict[str, Any]:
    return {
        "properties": {
            "containerType": container_type,
            "scaleConfiguration": {"maxConcurrentSessions": 4, "readySessionInstances": 1},
            "dynamicPoolConfiguration": {
                "lifecycleConfiguration": {"lifecycleType": "Timed", "cooldownPeriodInSeconds": 300}
            },
            "mcpServerSettings": {"isMCPServerEnabled": mcp},
        }
    }


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    client = docker.from_env()
    client.ping()  # no engine: the tests fail here, they never skip
    for name, image in IMAGES.items():
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            subprocess.run(["bash", str(ROOT / "deploy/images/build.sh"), name], check=True)
    yield client
    client.close()


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
                events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
                assert len(events) == 1, raw
                return r.status, r.headers, _loads(events[0])
            return r.status, r.headers, _loads(raw) if raw else None


def _loads(raw: str | bytes) -> Any:
    import json

    return json.loads(raw)


@pytest.fixture
async def env(engine: Any, settings: Settings, store: Store) -> AsyncIterator[Env]:
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sessionpool.cli",
        "worker",
        "--runtime",
        "docker",
        cwd=ROOT,
        env={
            **os.environ,
            "SESSIONPOOL_REDIS_URL": settings.redis_url,
            "SESSIONPOOL_KEY_PREFIX": settings.key_prefix,
            "SESSIONPOOL_WORKER_ID": "w0",
            "SESSIONPOOL_RECONCILE_INTERVAL_S": "1",
            "SESSIONPOOL_ORPHAN_GRACE_S": "2",
            "SESSIONPOOL_WARM_TIMEOUT_S": "60",
        },
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    server = TestServer(
        create_app(settings.replace(allocation_wait_s=60.0)),
        host="127.0.0.1",
        handler_cancellation=True,
    )
    try:
        await server.start_server()
        async with aiohttp.ClientSession() as http:
            e = Env(f"http://127.0.0.1:{server.port}", store, http)
            for name, ctype in ((PY, "PythonLTS"), (SH, "Shell")):
                status, body = await e.admin("PUT", name, _pool(ctype))
                assert status == 201, body
            await wait_until(_all_ready(store), timeout=90, interval=0.05)
            yield e
    finally:
        await server.close()
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(worker.wait(), 30)
        finally:
            if worker.returncode is None:
                worker.kill()
            raw = engine.api.containers(
                all=True, filters={"label": f"{LABEL_SCOPE}={settings.key_prefix}"}
            )
            for c in raw:  # whatever the worker did not tear down
                engine.api.remove_container(c["Id"], force=True)


def _all_ready(store: Store) -> Any:
    async def check() -> bool:
        return all([(await store.counts(p))["ready"] >= 1 for p in (PY, SH)])

    return check


# --- the official MCP Python SDK client ----------------------------------------------------


async def test_sdk_client_against_python_and_shell_pools(env: Env) -> None:
    from mcp import ClientSession
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
            await session.call_tool(RUN_SH, {"environmentId": "never-launched", "shellCommand": "ls"})

    # Shell pool: shell only.
    http, transport = await connect(SH, await env.key(SH))
    async with http, transport as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {t.name for t in (await session.list_tools()).tools}
        assert tools == {"launchShell", RUN_SH}
        env_id = (await session.call_tool("launchShell", {})).structured_content["environmentId"]
        await session.call_tool(RUN_SH, {"environmentId": env_id, "shellCommand": "echo 7 > n"})
        out = await session.call_tool(
            RUN_SH, {"environmentId": env_id, "shellCommand": "jq -n \"$(cat n) * 6\""}
        )
        assert out.structured_content == {"stdout": "42\n", "stderr": "", "exitCode": 0}
        with pytest.raises(MCPError, match="Unknown tool"):
            await session.call_tool(RUN_PY, {"environmentId": env_id, "pythonCode": "1"})

    # A wrong key: the SDK's initialize fails (its task groups wrap the error).
    http, transport = await connect(SH, "not-the-key")
    with pytest.raises(ExceptionGroup) as failed:
        async with http, transport as (read, write), ClientSession(read, write) as session:
            await asyncio.wait_for(session.initialize(), 30)
    assert failed.group_contains(MCPError)
