"""A PythonLTS pool end to end: router in process, a real worker, real code-interpreter containers.

Every request goes through the router with the shapes the ACA client libraries send
(reference/aca-dynamic-sessions.md §2.7), at `/pools/ci` and at the ACA path shape.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from yarl import URL

from router.pools import parse_pool
from router.settings import Settings
from router.store import Store
from sessionpool.testing import builtin_pool_body, serving_router
from tests.helpers import docker_worker, engine_fixture, multipart, wait_until
from workers.runtime import LABEL_SCOPE

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

IMAGE = "sessionpool/code-interpreter:dev"
POOL = "cipool"  # pool names are 3-63 characters (POOL_NAME)
POOL_PATH = f"/pools/{POOL}"
ACA_PATH = f"/subscriptions/s/resourceGroups/rg/sessionPools/{POOL}"
LEGACY_API = "2024-02-02-preview"  # LangChain, LlamaIndex, SK Python, AutoGen
NEW_API = "2025-02-02-preview"  # LangChain SessionsBashTool
DELETE_API = "2025-10-02-preview"  # LangChain's session delete
LANGCHAIN_HEADERS = {
    "Content-Type": "application/json",
    "User-Agent": "langchain-azure-dynamic-sessions/0.2.0 (Language=Python)",
}
BINARY = bytes(range(256)) * 8 + b"\r\n\x00end"


engine = engine_fixture(IMAGE)


@dataclass
class Env:
    url: str
    store: Store
    engine: Any
    scope: str

    def containers(self) -> set[str]:
        """Short ids (the containers' hostnames) of this test's containers."""
        raw = self.engine.api.containers(all=True, filters={"label": f"{LABEL_SCOPE}={self.scope}"})
        return {r["Id"][:12] for r in raw}


async def _ready(store: Store, n: int) -> bool:
    return (await store.counts(POOL))["ready"] >= n


@pytest.fixture
async def env(engine: Any, settings: Settings, store: Store) -> AsyncIterator[Env]:
    await store.put_pool(parse_pool(POOL, builtin_pool_body(max_sessions=5)))
    worker = settings.replace(
        reconcile_interval_s=1, orphan_grace_s=2, warm_timeout_s=60, claim_idle_ms=2000
    )
    async with (
        docker_worker(engine, worker),
        serving_router(settings.replace(allocation_wait_s=60.0)) as base,
    ):
        await wait_until(lambda: _ready(store, 1), timeout=90, interval=0.05)
        yield Env(base, store, engine, settings.key_prefix)


# --- helpers -------------------------------------------------------------------------------


def ident(stem: str) -> str:
    return f"{stem}-{uuid.uuid4()}"


def legacy_body(code: str, **extra: Any) -> dict[str, Any]:
    return {
        "properties": {
            "codeInputType": "inline",
            "executionType": "synchronous",
            "code": code,
            **extra,
        }
    }


async def legacy_exec(
    http: aiohttp.ClientSession, base: str, identifier: str, code: str, **extra: Any
) -> tuple[dict[str, Any], str]:
    """LangChain's call; returns `properties` and the session guid (the container's hostname)."""
    url = f"{base}/code/execute?api-version={LEGACY_API}&identifier={identifier}"
    async with http.post(url, json=legacy_body(code, **extra), headers=LANGCHAIN_HEADERS) as r:
        assert r.status == 200, await r.text()
        props: dict[str, Any] = (await r.json())["properties"]
        guid = r.headers["x-ms-session-guid"]
    for key in ("status", "result", "stdout", "stderr", "executionResult"):
        assert key in props, props  # Semantic Kernel raises KeyError without any of them
    return props, guid


async def submit(
    http: aiohttp.ClientSession, url: str | URL, body: dict[str, Any], status: int = 200
) -> tuple[dict[str, Any], str]:
    """POST an execution (answered `status`): its body and its `Operation-Location`."""
    async with http.post(url, json=body) as r:
        assert r.status == status, await r.text()
        return await r.json(), r.headers["Operation-Location"]


async def new_exec(
    http: aiohttp.ClientSession, base: str, identifier: str, body: dict[str, Any]
) -> dict[str, Any]:
    url = f"{base}/executions?api-version={NEW_API}&identifier={identifier}"
    execution, _ = await submit(http, url, body)
    return execution


async def legacy_filenames(http: aiohttp.ClientSession, base: str, identifier: str) -> set[str]:
    async with http.get(f"{base}/files?api-version={LEGACY_API}&identifier={identifier}") as r:
        assert r.status == 200, await r.text()
        return {v["properties"]["filename"] for v in (await r.json())["value"]}


# --- code execution ------------------------------------------------------------------------


async def test_legacy_execute_is_stateful_on_both_endpoint_shapes(
    env: Env, http: aiohttp.ClientSession
) -> None:
    user = ident("legacy")
    props, guid = await legacy_exec(http, env.url + POOL_PATH, user, "x = 41\nprint('set')")
    assert props["status"] == "Success"
    assert props["stdout"] == "set\n"
    assert props["stderr"] == ""
    assert guid in env.containers()
    # The same identifier at the ACA path shape reaches the same kernel.
    props, again = await legacy_exec(http, env.url + ACA_PATH, user, "x + 1")
    assert again == guid
    assert props["status"] == "Success"
    assert props["result"] == 42
    assert props["executionResult"] == 42
    assert isinstance(props["executionTimeInMilliseconds"], int)
    session = await env.store.get_session(POOL, user)
    assert session is not None and session.container.startswith(guid)
    # A different identifier is a different container with its own kernel.
    props, other = await legacy_exec(http, env.url + POOL_PATH, ident("other"), "'x' in dir()")
    assert other != guid
    assert props["result"] is False


async def _follow(http: aiohttp.ClientSession, request_url: URL, location: str) -> dict[str, Any]:
    """Poll `Operation-Location` as a client would: resolved against the request's URL."""
    target = request_url.join(URL(location))
    deadline = time.monotonic() + 30
    while True:
        async with http.get(target) as r:
            assert r.status == 200, (target, await r.text())
            polled: dict[str, Any] = await r.json()
        if polled["status"] not in ("NotStarted", "Running"):
            return polled
        assert time.monotonic() < deadline, polled
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("prefix", [POOL_PATH, ACA_PATH])
async def test_new_contract_sync_and_async_operation_location(
    env: Env, http: aiohttp.ClientSession, prefix: str
) -> None:
    user = ident("new")
    url = URL(f"{env.url}{prefix}/executions?api-version={NEW_API}&identifier={user}")
    # Semantic Kernel .NET: flat body, PascalCase enums.
    body = {
        "codeInputType": "Inline",
        "executionType": "Synchronous",
        "timeoutInSeconds": 100,
        "code": "print('sync')\n6 * 7",
    }
    sync, sync_location = await submit(http, url, body)
    assert sync["status"] == "Succeeded"
    assert sync["identifier"] == user
    assert sync["result"]["stdout"] == "sync\n"
    assert sync["result"]["stderr"] == ""
    assert sync["result"]["executionResult"] == 42
    assert (await _follow(http, url, sync_location))["id"] == sync["id"]

    body = {
        "codeInputType": "inline",
        "executionType": "Asynchronous",
        "timeoutInSeconds": 60,
        "code": "import time\ntime.sleep(0.5)\nprint('async done')\n'finished'",
    }
    accepted, location = await submit(http, url, body, status=202)
    assert accepted["status"] in ("NotStarted", "Running")
    assert "result" not in accepted
    # The link names the pool endpoint it was requested through, so it works as given.
    resolved = url.join(URL(location))
    assert resolved.path == f"{prefix}/executions/{accepted['id']}", location
    assert resolved.query["identifier"] == user
    polled = await _follow(http, url, location)
    assert polled["id"] == accepted["id"]
    assert polled["status"] == "Succeeded"
    assert polled["result"]["stdout"] == "async done\n"
    assert polled["result"]["executionResult"] == "finished"


async def test_timeout_fails_clearly_and_the_session_goes_on(
    env: Env, http: aiohttp.ClientSession
) -> None:
    user = ident("runaway")
    base = env.url + POOL_PATH
    await legacy_exec(http, base, user, "survivor = 'still here'")
    started = time.monotonic()
    props, _ = await legacy_exec(http, base, user, "while True:\n    pass", timeoutInSeconds=2)
    assert 2 <= time.monotonic() - started < 15
    assert props["status"] == "Failure"
    assert "timed out" in props["stderr"]
    props, _ = await legacy_exec(http, base, user, "survivor")
    assert props["status"] == "Success"
    assert props["result"] == "still here"

    failed = await new_exec(http, base, user, {"code": "while True: pass", "timeoutInSeconds": 1})
    assert failed["status"] == "Failed"
    assert failed["error"]["code"] == "ExecutionTimeout"
    after = await new_exec(http, base, user, {"code": "survivor.upper()", "timeoutInSeconds": 5})
    assert after["status"] == "Succeeded"
    assert after["result"]["executionResult"] == "STILL HERE"


async def test_shell_command_with_stdin_and_exit_code(
    env: Env, http: aiohttp.ClientSession
) -> None:
    user = ident("shell")
    base = env.url + ACA_PATH
    # LangChain's SessionsBashTool sends nothing but the command (here with stdin).
    execution = await new_exec(
        http,
        base,
        user,
        {"shellCommand": "read a; echo got $a; echo oops >&2; pwd; exit 3", "stdin": "x1\n"},
    )
    assert execution["status"] == "3"
    assert execution["identifier"] == user
    assert execution["result"]["stdout"] == "got x1\n/mnt/data\n"
    assert execution["result"]["stderr"] == "oops\n"
    execution = await new_exec(
        http, base, user, {"execCommandAndArgs": ["cat"], "stdin": "piped\ninput"}
    )
    assert execution["status"] == "0"
    assert execution["result"]["stdout"] == "piped\ninput"


# --- files ---------------------------------------------------------------------------------


async def test_file_round_trip(env: Env, http: aiohttp.ClientSession) -> None:
    user = ident("files")
    base = env.url + POOL_PATH
    legacy_q = f"api-version={LEGACY_API}&identifier={user}"
    new_q = f"api-version={NEW_API}&identifier={user}"
    names = {
        "": f"plain-{uuid.uuid4().hex[:6]}.bin",
        "/mnt/data/": f"llama-{uuid.uuid4().hex[:6]}.bin",
    }
    for prefix, name in names.items():  # LangChain sends the bare name, LlamaIndex the path
        data, headers = multipart(prefix + name, BINARY)
        async with http.post(f"{base}/files/upload?{legacy_q}", data=data, headers=headers) as r:
            assert r.status == 200, await r.text()
            uploaded = (await r.json())["value"][0]["properties"]
        assert uploaded["filename"] == name
        assert uploaded["size"] == len(BINARY)
    # The new contract's upload (LangChain Bash: `path=/mnt/data`), through the ACA shape.
    bash_name = f"bash-{uuid.uuid4().hex[:6]}.txt"
    data, headers = multipart(bash_name, b"from bash\n")
    async with http.post(
        f"{env.url}{ACA_PATH}/files?{new_q}&path=/mnt/data", data=data, headers=headers
    ) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["name"] == bash_name

    async with http.get(f"{base}/files?{legacy_q}") as r:
        legacy = {
            v["properties"]["filename"]: v["properties"]["size"] for v in (await r.json())["value"]
        }
    assert legacy == {
        names[""]: len(BINARY),
        names["/mnt/data/"]: len(BINARY),
        bash_name: len(b"from bash\n"),
    }
    async with http.get(f"{base}/files?{new_q}") as r:
        listed = {v["name"]: v["sizeInBytes"] for v in (await r.json())["value"]}
    assert listed == legacy

    for name in names.values():
        for path in (f"files/content/{name}", f"files/{name}/content"):
            async with http.get(f"{base}/{path}?{legacy_q}") as r:
                assert r.status == 200, await r.text()
                assert await r.read() == BINARY  # byte for byte through the router
    props, _ = await legacy_exec(
        http, base, user, f"len(open('/mnt/data/{names['']}', 'rb').read())"
    )
    assert props["result"] == len(BINARY)

    async with http.delete(f"{base}/files/{names['']}?{legacy_q}") as r:
        assert r.status == 200
        assert (await r.json())["message"] == "file deleted successfully"
    async with http.delete(f"{base}/files/{bash_name}?{new_q}") as r:
        assert r.status == 204
    async with http.get(f"{base}/files/content/{names['']}?{legacy_q}") as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"]
    assert await legacy_filenames(http, base, user) == {names["/mnt/data/"]}


# --- session management answered by the router ---------------------------------------------


async def test_metadata_list_and_get_session(env: Env, http: aiohttp.ClientSession) -> None:
    for prefix in (POOL_PATH, ACA_PATH):
        async with http.get(f"{env.url}{prefix}/metadata?api-version={NEW_API}") as r:
            assert r.status == 200, await r.text()
            meta = await r.json()
        assert meta["runtimes"][0]["name"] == "python"
        assert meta["jupyterKernel"]["name"]
        assert isinstance(meta["preInstalledPackages"], list)
    # No identifier, no allocation: the router answered them itself.
    async with http.get(f"{env.url}{POOL_PATH}/listSessions?api-version={NEW_API}") as r:
        assert r.status == 200, await r.text()
        empty = await r.json()
    assert empty["sessions"] == empty["value"] == []
    assert (await env.store.counts(POOL))["allocated"] == 0

    missing = ident("nobody")
    async with http.get(
        f"{env.url}{POOL_PATH}/session?api-version={NEW_API}&identifier={missing}"
    ) as r:
        assert r.status == 404
        assert r.headers["x-ms-error-code"] == "SessionNotFound"
    assert await env.store.get_session(POOL, missing) is None  # a GET allocates nothing

    user = ident("viewer")
    _, guid = await legacy_exec(http, env.url + POOL_PATH, user, "1")
    record = await env.store.get_session(POOL, user)
    assert record is not None
    async with http.get(
        f"{env.url}{ACA_PATH}/session?api-version={NEW_API}&identifier={user}"
    ) as r:
        assert r.status == 200, await r.text()
        view = await r.json()
    assert view["identifier"] == user
    assert view["etag"] == record.sandbox
    for key in ("createdAt", "lastAccessedAt", "expireAt", "expiresAt"):
        assert view[key].endswith("Z"), view
    assert view["expireAt"] == view["expiresAt"]
    assert view["createdAt"] <= view["lastAccessedAt"] < view["expireAt"]

    async with http.get(f"{env.url}{ACA_PATH}/listSessions?api-version={NEW_API}") as r:
        assert r.status == 200, await r.text()
        listing = await r.json()
    assert listing["sessions"] == listing["value"]
    assert [s["identifier"] for s in listing["sessions"]] == [user]
    item = listing["sessions"][0]
    assert item["expireAt"] == item["expiresAt"]
    # The execution's activity is written in batches, so the listing may see it extend the
    # expiry the view showed; it never shortens it.
    assert item["expiresAt"] >= view["expiresAt"]
    assert item["etag"] == record.sandbox
    assert guid in env.containers()


async def test_delete_session_gives_a_fresh_empty_session(
    env: Env, http: aiohttp.ClientSession
) -> None:
    user = ident("deleted")
    base = env.url + POOL_PATH
    props, old = await legacy_exec(http, base, user, "secret = 'kept'\nsecret")
    assert props["result"] == "kept"
    name = f"gone-{uuid.uuid4().hex[:6]}.txt"
    data, headers = multipart(f"/mnt/data/{name}", b"to be removed")
    async with http.post(
        f"{base}/files/upload?api-version={LEGACY_API}&identifier={user}",
        data=data,
        headers=headers,
    ) as r:
        assert r.status == 200, await r.text()
    assert await legacy_filenames(http, base, user) == {name}

    # LangChain: DELETE {endpoint}/session?identifier=...&api-version=2025-10-02-preview
    async with http.delete(f"{base}/session?identifier={user}&api-version={DELETE_API}") as r:
        assert r.status == 204, await r.text()
    async with http.get(f"{base}/session?identifier={user}&api-version={DELETE_API}") as r:
        assert r.status == 404
    async with http.delete(f"{base}/session?identifier={user}&api-version={DELETE_API}") as r:
        assert r.status == 404  # deleted once
    await wait_until(lambda: old not in env.containers(), timeout=30, interval=0.05)

    props, new = await legacy_exec(http, base, user, "secret")
    assert new != old
    assert props["status"] == "Failure"
    assert "NameError" in props["stderr"]
    assert await legacy_filenames(http, base, user) == set()
    session = await env.store.get_session(POOL, user)
    assert session is not None and session.container.startswith(new)
