"""The control-plane API (`/admin/pools`) against real Redis and real routers."""

from __future__ import annotations

import copy
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp.test_utils import TestServer

from router.app import create_app
from router.auth import hash_key
from router.settings import Settings
from router.store import Store
from sessionpool.testing import HEALTH_PROBE, pool_body
from tests.helpers import FakeSandbox, add_ready

ADMIN_KEY = "sp_admin-0123456789abcdef"
SCOPED_ADMIN_KEY = "sp_scoped-admin-0123456789abcdef"
EXEC_KEY = "sp_exec-0123456789abcdef"
SECRET_VALUE = "s3cr3t-value-that-must-never-be-echoed"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

StartRouter = Callable[..., Awaitable[str]]


def definition(**overrides: Any) -> dict[str, Any]:
    container = {
        "env": [{"name": "MODE", "value": "x"}, {"name": "KEY", "secretRef": "k"}],
        "resources": {"cpu": 0.5, "memory": "1Gi"},
        "probes": [copy.deepcopy(HEALTH_PROBE)],
    }
    props: dict[str, Any] = pool_body(
        ready=2,
        cooldown_s=60,
        container=container,
        containerType="CustomContainer",
        sessionNetworkConfiguration={"status": "EgressDisabled"},
        sandboxConfiguration={"pidsLimit": 128},
        secrets=[{"name": "k", "value": SECRET_VALUE}],
    )["properties"]
    props.update(overrides)
    return {"properties": props}


@pytest.fixture
def keys_file(tmp_path: Path) -> str:
    path = tmp_path / "keys.yaml"
    path.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "ops",
                    "key_sha256": hash_key(ADMIN_KEY),
                    "roles": ["admin"],
                    "pools": ["*"],
                },
                {
                    "name": "team",
                    "key_sha256": hash_key(SCOPED_ADMIN_KEY),
                    "roles": ["admin"],
                    "pools": ["demo"],
                },
                {
                    "name": "exec",
                    "key_sha256": hash_key(EXEC_KEY),
                    "roles": ["executor"],
                    "pools": ["*"],
                },
            ]
        )
    )
    return str(path)


@pytest.fixture
async def start_router(settings: Settings, keys_file: str) -> AsyncIterator[StartRouter]:
    servers: list[TestServer] = []

    async def start(**changes: Any) -> str:
        changes = {"auth": "required", "api_keys_file": keys_file, **changes}
        server = TestServer(
            create_app(settings.replace(**changes)), host="127.0.0.1", handler_cancellation=True
        )
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.close()


async def send(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, Any, Any, bytes]:
    hdrs = dict(ADMIN if headers is None else headers)
    data = raw
    if body is not None:
        data = orjson.dumps(body)
    if data is not None:
        hdrs["Content-Type"] = content_type
    async with http.request(method, url, data=data, headers=hdrs) as r:
        text = await r.read()
        doc = orjson.loads(text) if text and r.content_type == "application/json" else None
        return r.status, doc, r.headers, text


def assert_invalid(status: int, doc: Any, headers: Any, field: str) -> None:
    assert status == 400, doc
    assert doc["error"]["code"] == "InvalidPoolDefinition"
    assert headers["x-ms-error-code"] == "InvalidPoolDefinition"
    assert field in doc["error"]["message"], doc["error"]["message"]


# Create, read, replace ---------------------------------------------------------------------


async def test_put_creates_then_replaces_and_get_lists(
    store: Store, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    base = await start_router()
    url = f"{base}/admin/pools/demo"
    status, view, headers, _ = await send(http, "PUT", url, definition())
    assert status == 201, view
    assert headers["Location"] == "/admin/pools/demo"
    assert view["name"] == "demo"
    assert view["poolManagementEndpoint"] == f"{base}/pools/demo"
    assert view["counts"] == {"ready": 0, "allocated": 0, "warming": 0}
    assert view["properties"]["scaleConfiguration"]["readySessionInstances"] == 2
    assert view["properties"]["secrets"] == [{"name": "k"}]
    stored = await store.get_pool("demo")
    assert stored is not None
    assert stored.secrets == {"k": SECRET_VALUE}
    assert stored.version == view["version"]
    events = await store.redis.xrange(store.pk("demo").events)
    assert any(b"pool-changed" in e[1][b"data"] for e in events)  # workers were told

    # Scale and lifecycle changes keep the version: ready sandboxes stay.
    scaled = definition(
        scaleConfiguration={"maxConcurrentSessions": 20, "readySessionInstances": 4}
    )
    status, view2, _, _ = await send(http, "PUT", url, scaled)
    assert status == 200
    assert view2["version"] == view["version"]
    assert view2["properties"]["scaleConfiguration"]["readySessionInstances"] == 4
    # A template change makes a new version.
    changed = copy.deepcopy(scaled)
    changed["properties"]["customContainerTemplate"]["containers"][0]["image"] = "echo:2"
    status, view3, _, _ = await send(http, "PUT", url, changed)
    assert status == 200
    assert view3["version"] != view["version"]
    # So does a new secret value behind an env var.
    rotated = copy.deepcopy(changed)
    rotated["properties"]["secrets"] = [{"name": "k", "value": "another"}]
    status, view4, _, _ = await send(http, "PUT", url, rotated)
    assert view4["version"] != view3["version"]

    status, got, _, _ = await send(http, "GET", url)
    assert status == 200
    assert got == view4
    await send(http, "PUT", f"{base}/admin/pools/second", definition())
    status, listing, _, _ = await send(http, "GET", f"{base}/admin/pools")
    assert status == 200
    assert [p["name"] for p in listing["value"]] == ["demo", "second"]


async def test_get_round_trips_through_put_and_never_echoes_secrets(
    store: Store, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    base = await start_router()
    url = f"{base}/admin/pools/demo"
    bodies = []
    bodies.append((await send(http, "PUT", url, definition()))[3])
    status, view, _, raw = await send(http, "GET", url)
    bodies.append(raw)
    # What GET answered goes back unchanged: the name-only secret keeps its stored value.
    status, _, _, raw = await send(http, "PUT", url, view)
    assert status == 200, raw
    bodies.append(raw)
    bodies.append((await send(http, "PATCH", url, {"properties": {"tenantBinding": True}}))[3])
    bodies.append((await send(http, "GET", f"{base}/admin/pools"))[3])
    for raw in bodies:
        assert SECRET_VALUE.encode() not in raw
    stored = await store.get_pool("demo")
    assert stored is not None
    assert stored.secrets == {"k": SECRET_VALUE}
    assert stored.version == view["version"]


BAD_BODIES: list[tuple[str, Any, str]] = [
    ("Bad_Name", definition(), "name"),
    ("ab", definition(), "name"),
    ("demo", [1, 2], "body"),
    ("demo", {"properties": "x"}, "properties"),
    ("demo", {"name": "other", **definition()}, "name"),
    ("demo", {"properties": {}, "scaleConfig": {}}, "scaleConfig"),
    ("demo", definition(containerType="Python"), "properties.containerType"),
    ("demo", definition(containerType=3), "properties.containerType"),
    (
        "demo",
        definition(scaleConfiguration={"maxConcurrentSessions": "10"}),
        "scaleConfiguration.maxConcurrentSessions",
    ),
    (
        "demo",
        definition(scaleConfiguration={"maxConcurrentSessions": 0}),
        "scaleConfiguration.maxConcurrentSessions",
    ),
    (
        "demo",
        definition(scaleConfiguration={"readySessionInstances": -1}),
        "scaleConfiguration.readySessionInstances",
    ),
    (
        "demo",
        definition(scaleConfiguration={"readySessionInstances": True}),
        "scaleConfiguration.readySessionInstances",
    ),
    ("demo", definition(scaleConfiguration=[]), "properties.scaleConfiguration"),
    (
        "demo",
        definition(
            dynamicPoolConfiguration={"lifecycleConfiguration": {"lifecycleType": "Forever"}}
        ),
        "lifecycleType",
    ),
    (
        "demo",
        definition(
            dynamicPoolConfiguration={"lifecycleConfiguration": {"cooldownPeriodInSeconds": 0}}
        ),
        "lifecycleConfiguration.cooldownPeriodInSeconds",
    ),
    (
        "demo",
        definition(
            dynamicPoolConfiguration={"executionType": "Timed", "cooldownPeriodInSeconds": 2.5}
        ),
        "dynamicPoolConfiguration.cooldownPeriodInSeconds",
    ),
    (
        "demo",
        definition(customContainerTemplate={"containers": [], "ingress": {"targetPort": 80}}),
        "containers",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [{"image": "a b"}],
                "ingress": {"targetPort": 80},
            }
        ),
        "containers[0].image",
    ),
    (
        "demo",
        definition(customContainerTemplate={"containers": [{"image": "x"}]}),
        "ingress.targetPort",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [{"image": "x"}],
                "ingress": {"targetPort": 70000},
            }
        ),
        "ingress.targetPort",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [{"image": "x", "command": "sh -c x"}],
                "ingress": {"targetPort": 80},
            }
        ),
        "containers[0].command",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [{"image": "x", "env": [{"name": "A", "secretRef": "missing"}]}],
                "ingress": {"targetPort": 80},
            }
        ),
        "env[0].secretRef",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [{"image": "x", "env": [{"name": "A", "secretRef": ["k"]}]}],
                "ingress": {"targetPort": 80},
            }
        ),
        "env[0].secretRef",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [{"image": "x", "env": [{"name": "1A", "value": "v"}]}],
                "ingress": {"targetPort": 80},
            }
        ),
        "env[0].name",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [
                    {
                        "image": "x",
                        "env": [{"name": "A", "value": "v"}, {"name": "A", "value": "w"}],
                    }
                ],
                "ingress": {"targetPort": 80},
            }
        ),
        "env[1].name",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [{"image": "x", "env": [{"name": "A", "value": 5}]}],
                "ingress": {"targetPort": 80},
            }
        ),
        "env[0].value",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [{"image": "x", "resources": {"memory": "1GB"}}],
                "ingress": {"targetPort": 80},
            }
        ),
        "resources.memory",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [{"image": "x", "resources": {"cpu": "half"}}],
                "ingress": {"targetPort": 80},
            }
        ),
        "resources.cpu",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [
                    {"image": "x", "probes": [{"type": "Startup", "httpGet": {"path": "/"}}]}
                ],
                "ingress": {"targetPort": 80},
            }
        ),
        "probes[0].httpGet.port",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [
                    {
                        "image": "x",
                        "probes": [
                            {"type": "Startup", "tcpSocket": {"port": 80}},
                            {"type": "Startup", "tcpSocket": {"port": 81}},
                        ],
                    }
                ],
                "ingress": {"targetPort": 80},
            }
        ),
        "probes[1].type",
    ),
    (
        "demo",
        definition(
            customContainerTemplate={
                "containers": [
                    {"image": "x", "probes": [{"type": "Readiness", "tcpSocket": {"port": 80}}]}
                ],
                "ingress": {"targetPort": 80},
            }
        ),
        "probes[0].type",
    ),
    (
        "demo",
        definition(sessionNetworkConfiguration={"status": "Open"}),
        "sessionNetworkConfiguration.status",
    ),
    (
        "demo",
        definition(sandboxConfiguration={"runtime": ["runsc"]}),
        "sandboxConfiguration.runtime",
    ),
    ("demo", definition(sandboxConfiguration={"pidsLimit": 1}), "sandboxConfiguration.pidsLimit"),
    ("demo", definition(tenantBinding="yes"), "tenantBinding"),
    ("demo", definition(secrets={"k": "v"}), "properties.secrets"),
    (
        "demo",
        definition(secrets=[{"name": "k", "value": "a"}, {"name": "k", "value": "b"}]),
        "secrets[1].name",
    ),
    ("demo", definition(secrets=[{"name": "new"}]), "secrets[0].value"),
    # Above the operator's maximums (router/limits.py), each named.
    *(
        (
            "demo",
            definition(
                customContainerTemplate={
                    "containers": [{"image": "x", "resources": {key: value}}],
                    "ingress": {"targetPort": 80},
                }
            ),
            f"resources.{key}",
        )
        for key, value in (("cpu", 2.5), ("memory", "5Gi"), ("ephemeralStorage", "8Gi"))
    ),
    ("demo", definition(sandboxConfiguration={"pidsLimit": 5000}), "pidsLimit"),
]


@pytest.mark.parametrize(("name", "body", "field"), BAD_BODIES)
async def test_invalid_definitions_are_400_naming_the_field_and_store_nothing(
    store: Store,
    start_router: StartRouter,
    http: aiohttp.ClientSession,
    name: str,
    body: Any,
    field: str,
) -> None:
    base = await start_router()
    assert_invalid(*(await send(http, "PUT", f"{base}/admin/pools/{name}", body))[:3], field)
    assert await store.pool_names() == []


async def test_invalid_replace_leaves_the_old_definition(
    store: Store, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    base = await start_router()
    url = f"{base}/admin/pools/demo"
    await send(http, "PUT", url, definition())
    before = await store.redis.get(store.pk("demo").definition)
    bad = definition(
        scaleConfiguration={"maxConcurrentSessions": 5, "readySessionInstances": 10_001}
    )
    assert_invalid(*(await send(http, "PUT", url, bad))[:3], "readySessionInstances")
    assert_invalid(
        *(
            await send(
                http, "PATCH", url, {"properties": {"customContainerTemplate": {"ingress": None}}}
            )
        )[:3],
        "ingress.targetPort",
    )
    assert await store.redis.get(store.pk("demo").definition) == before


@pytest.mark.parametrize(
    ("method", "raw", "content_type", "status", "code"),
    [
        ("PUT", b'{"properties": ', "application/json", 400, "InvalidPoolDefinition"),
        ("PUT", b"", "application/json", 400, "InvalidPoolDefinition"),
        ("PUT", b"properties: {}", "application/yaml", 415, "UnsupportedMediaType"),
        ("PUT", b"{}", "text/plain", 415, "UnsupportedMediaType"),
        ("PATCH", b"[", "application/merge-patch+json", 400, "InvalidPoolDefinition"),
        ("PATCH", b'"string"', "application/json", 400, "InvalidPoolDefinition"),
        ("PATCH", b"{}", "application/x-www-form-urlencoded", 415, "UnsupportedMediaType"),
    ],
)
async def test_body_format_errors(
    store: Store,
    start_router: StartRouter,
    http: aiohttp.ClientSession,
    method: str,
    raw: bytes,
    content_type: str,
    status: int,
    code: str,
) -> None:
    base = await start_router()
    url = f"{base}/admin/pools/demo"
    if method == "PATCH":
        await send(http, "PUT", url, definition())
    got, doc, headers, _ = await send(http, method, url, raw=raw, content_type=content_type)
    assert got == status, doc
    assert doc["error"]["code"] == code
    assert headers["x-ms-error-code"] == code


async def test_bodies_over_one_mib_are_413(
    store: Store, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    base = await start_router()
    big = b'{"properties": {}, "tags": "' + b"x" * (1 << 20) + b'"}'

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: cut while reading
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    for data in (io.BytesIO(big), chunks()):
        async with http.put(
            f"{base}/admin/pools/demo",
            data=data,
            headers={**ADMIN, "Content-Type": "application/json"},
        ) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "RequestTooLarge"
    assert await store.pool_names() == []


# PATCH -------------------------------------------------------------------------------------


async def test_patch_is_a_json_merge_patch_that_keeps_secrets(
    store: Store, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    base = await start_router()
    url = f"{base}/admin/pools/demo"
    _, created, _, _ = await send(http, "PUT", url, definition())
    # Scale only: merged into the stored definition, secrets (omitted) kept, same version.
    status, view, _, _ = await send(
        http,
        "PATCH",
        url,
        {"properties": {"scaleConfiguration": {"readySessionInstances": 7}}},
        content_type=("application/merge-patch+json"),
    )
    assert status == 200, view
    scale = view["properties"]["scaleConfiguration"]
    assert scale == {"maxConcurrentSessions": 10, "readySessionInstances": 7}
    assert view["version"] == created["version"]
    pool = await store.get_pool("demo")
    assert pool is not None
    assert pool.secrets == {"k": SECRET_VALUE}
    assert pool.ready_instances == 7
    # null removes a key; a secret listed by name only keeps its value; a new one is added.
    status, view, _, _ = await send(
        http,
        "PATCH",
        url,
        {
            "properties": {
                "sandboxConfiguration": None,
                "secrets": [{"name": "k"}, {"name": "extra", "value": "v2"}],
            }
        },
    )
    assert status == 200, view
    assert "sandboxConfiguration" not in view["properties"]
    assert view["properties"]["secrets"] == [{"name": "k"}, {"name": "extra"}]
    pool = await store.get_pool("demo")
    assert pool is not None
    assert pool.secrets == {"k": SECRET_VALUE, "extra": "v2"}
    assert pool.pids_limit is None  # back to the operator's default
    assert view["version"] != created["version"]  # the sandbox changed (pids limit)
    # Arrays are replaced whole: dropping the secret an env var uses is refused.
    status, doc, headers, _ = await send(
        http, "PATCH", url, {"properties": {"secrets": [{"name": "extra"}]}}
    )
    assert_invalid(status, doc, headers, "secretRef")
    status, doc, _, _ = await send(http, "PATCH", f"{base}/admin/pools/nothere", {"properties": {}})
    assert status == 404
    assert doc["error"]["code"] == "PoolNotFound"


# DELETE ------------------------------------------------------------------------------------


async def test_delete_ends_sessions_and_then_404(
    store: Store, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    base = await start_router()
    url = f"{base}/admin/pools/demo"
    await send(http, "PUT", url, definition(scaleConfiguration={"readySessionInstances": 2}))
    pool = await store.get_pool("demo")
    assert pool is not None
    sandboxes = [await FakeSandbox().start() for _ in range(2)]
    try:
        for sb in sandboxes:
            await add_ready(store, pool, sb)
        exec_auth = {"Authorization": f"Bearer {EXEC_KEY}"}
        async with http.get(f"{base}/pools/demo/x?identifier=user1", headers=exec_auth) as r:
            assert r.status == 200
            used = (await r.json())["sandbox"]
        status, view, _, _ = await send(http, "GET", url)
        assert view["counts"] == {"ready": 1, "allocated": 1, "warming": 0}
        status, _, _, body = await send(http, "DELETE", url)
        assert status == 204
        assert body == b""
        records = await store.sandboxes("demo")
        assert sorted(s.state for s in records.values()) == ["stopping", "stopping"]
        assert await store.get_session("demo", "user1") is None
        assert used in {sb.name for sb in sandboxes}
        status, doc, _, _ = await send(http, "GET", url)
        assert status == 404
        assert doc["error"]["code"] == "PoolNotFound"
        assert (await send(http, "DELETE", url))[0] == 404
        async with http.get(f"{base}/pools/demo/x?identifier=user1", headers=exec_auth) as r:
            assert r.status == 404
        assert await store.pool_names() == []
    finally:
        for sb in sandboxes:
            await sb.close()


# Authorization on the control plane --------------------------------------------------------


async def test_admin_needs_the_admin_role_and_scope(
    store: Store, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    base = await start_router()
    for name in ("demo", "other"):
        assert (await send(http, "PUT", f"{base}/admin/pools/{name}", definition()))[0] == 201
    scoped = {"Authorization": f"Bearer {SCOPED_ADMIN_KEY}"}
    status, listing, _, _ = await send(http, "GET", f"{base}/admin/pools", headers=scoped)
    assert [p["name"] for p in listing["value"]] == ["demo"]
    assert (await send(http, "GET", f"{base}/admin/pools/demo", headers=scoped))[0] == 200
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        body = definition() if method in ("PUT", "PATCH") else None
        status, doc, _, _ = await send(
            http, method, f"{base}/admin/pools/other", body, headers=scoped
        )
        assert status == 403, (method, doc)
        status, doc, headers, _ = await send(
            http, method, f"{base}/admin/pools/demo", body, headers={"x-api-key": EXEC_KEY}
        )
        assert status == 403
        status, doc, headers, _ = await send(
            http, method, f"{base}/admin/pools/demo", body, headers={}
        )
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
    assert await store.pool_names() == ["demo", "other"]  # nothing was changed or deleted
    status, doc, headers, _ = await send(http, "POST", f"{base}/admin/pools/demo", {})
    assert status == 405
    assert doc["error"]["code"] == "MethodNotAllowed"


async def test_auth_none_leaves_the_control_plane_open(
    store: Store, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    base = await start_router(auth="none", api_keys_file="")
    status, view, _, _ = await send(
        http, "PUT", f"{base}/admin/pools/demo", definition(), headers={}
    )
    assert status == 201, view
    assert (await send(http, "GET", f"{base}/admin/pools", headers={}))[1]["value"][0][
        "name"
    ] == "demo"


async def test_a_stored_definition_that_no_longer_validates_can_be_replaced(
    store: Store, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    base = await start_router()
    stale = definition()
    stale["properties"]["sandboxConfiguration"] = {"pidsLimit": 1}  # now out of range
    await store.redis.set(
        store.pk("demo").definition,
        orjson.dumps({"name": "demo", "version": "x", "properties": stale["properties"]}),
    )
    await store.redis.sadd(store.keys.pools, "demo")
    status, listing, _, _ = await send(http, "GET", f"{base}/admin/pools")
    assert status == 200
    assert listing["value"][0]["error"]["code"] == "InvalidPoolDefinition"
    fixed = definition(secrets=[{"name": "k"}])  # the stored value is still found
    status, view, _, _ = await send(http, "PUT", f"{base}/admin/pools/demo", fixed)
    assert status == 200, view
    pool = await store.get_pool("demo")
    assert pool is not None
    assert pool.secrets == {"k": SECRET_VALUE}


async def test_mcp_credentials_need_the_admin_role_and_open_only_the_mcp_endpoint(
    http: aiohttp.ClientSession, start_router: StartRouter
) -> None:
    base = await start_router()
    shell = {"containerType": "Shell", "mcpServerSettings": {"isMCPServerEnabled": True}}
    for name in ("demo", "other"):
        status, body, _, _ = await send(http, "PUT", f"{base}/admin/pools/{name}", shell)
        assert status == 201, body
    fetch = f"{base}/admin/pools/demo/fetchMcpServerCredentials"
    for headers, expected in (
        ({}, 401),
        ({"Authorization": f"Bearer {EXEC_KEY}"}, 403),
        ({"Authorization": f"Bearer {SCOPED_ADMIN_KEY}"}, 200),  # scoped to demo
    ):
        status, body, _, _ = await send(http, "POST", fetch, headers=headers)
        assert status == expected, (headers, body)
    scoped_other = f"{base}/admin/pools/other/rotateMcpServerCredentials"
    status, _, _, _ = await send(
        http, "POST", scoped_other, headers={"Authorization": f"Bearer {SCOPED_ADMIN_KEY}"}
    )
    assert status == 403
    status, body, _, _ = await send(http, "POST", fetch)
    key = body["apiKey"]
    # The MCP key opens the MCP endpoint and nothing else; router credentials do not open it.
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    mcp = f"{base}/pools/demo/mcp"
    status, _, _, _ = await send(http, "POST", mcp, ping, headers={"x-ms-apikey": key})
    assert status == 200
    for creds in (ADMIN, {"Authorization": f"Bearer {EXEC_KEY}"}):
        status, _, _, _ = await send(http, "POST", mcp, ping, headers=creds)
        assert status == 401
    for creds in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}):
        status, _, _, _ = await send(http, "GET", f"{base}/admin/pools/demo", headers=creds)
        assert status == 401
