"""The router edge against real Redis and real HTTP servers playing the sandboxes."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestServer, make_mocked_request

from router.app import Dispatch, create_app, pool_endpoint
from router.pools import Pool
from router.settings import Settings
from router.store import Store
from router.target import Target
from tests.helpers import FakeSandbox, add_ready, make_pool, wait_until

Router = Callable[..., Awaitable[str]]
Serving = Callable[..., Awaitable[tuple[str, list[FakeSandbox]]]]


@pytest.fixture
async def start_router(settings: Settings) -> AsyncIterator[Router]:
    servers: list[TestServer] = []

    async def start(**changes: Any) -> str:
        server = TestServer(
            create_app(settings.replace(**changes)), host="127.0.0.1", handler_cancellation=True
        )
        await server.start_server()
        servers.append(server)
        base = f"http://127.0.0.1:{server.port}"
        return base

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def serving(store: Store, sandboxes: Any, start_router: Router) -> Serving:
    """Put `pool` (the demo pool by default) with `ready` ready sandboxes, start a router with
    `changes`; return its base URL and the sandboxes."""

    async def serve(
        pool: Pool | None = None, *, ready: int = 1, **changes: Any
    ) -> tuple[str, list[FakeSandbox]]:
        pool = pool or make_pool()
        await store.put_pool(pool)
        made = [await sandboxes() for _ in range(ready)]
        for sb in made:
            await add_ready(store, pool, sb)
        return await start_router(**changes), made

    return serve


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def wait_cache_live(http: aiohttp.ClientSession, base: str) -> None:
    """The invalidation subscription is up once /readyz answers (Redis reachable)."""

    async def ready() -> bool:
        async with http.get(f"{base}/readyz") as r:
            return r.status == 200

    await wait_until(ready)


def assert_envelope(status: int, body: dict[str, Any], headers: Any, code: str) -> None:
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert len(body["error"]["traceId"]) == 32
    assert headers["x-ms-error-code"] == code


async def test_forwards_method_path_query_and_headers_on_the_wire(
    serving: Serving, http: aiohttp.ClientSession
) -> None:
    base, (sb,) = await serving()
    query = "identifier=user%2B1%7Cx&api-version=2024-02-02-preview&b=%20sp%20"
    async with http.request(
        "PATCH",
        f"{base}/pools/demo/api/r%C3%A9sum%C3%A9/run?{query}",
        data=b"hello",
        headers={
            "Authorization": "Bearer secret",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "X-Forwarded-Proto": "spoofed",
            "X-Custom": "kept",
            "Proxy-Authorization": "Basic x",
            "Accept-Encoding": "gzip",
        },
    ) as r:
        assert r.status == 200
        seen = await r.json()
    assert seen["sandbox"] == sb.name
    assert seen["method"] == "PATCH"
    assert seen["raw_path"] == f"/api/r%C3%A9sum%C3%A9/run?{query}"  # verbatim
    headers = {k.lower(): v for k, v in seen["headers"]}
    for dropped in ("authorization", "x-hop", "keep-alive", "te", "proxy-authorization"):
        assert dropped not in headers, dropped
    assert "x-hop" not in headers.get("connection", "").lower()  # the router's own hop
    assert headers["x-custom"] == "kept"
    assert headers["accept-encoding"] == "gzip"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == base.removeprefix("http://")
    assert headers["x-forwarded-prefix"] == "/pools/demo"
    assert headers["host"] == sb.addr
    assert "user-agent" in headers  # the caller's own, passed through
    assert seen["body_sha256"] == hashlib.sha256(b"hello").hexdigest()


async def test_aca_path_shape_and_host_suffix_reach_the_same_session(
    serving: Serving, http: aiohttp.ClientSession
) -> None:
    base, _ = await serving(ready=2, host_suffix="sessions.test")
    names = set()
    urls = [
        f"{base}/pools/demo/x?identifier=abcd",
        f"{base}/subscriptions/s1/resourceGroups/rg/sessionPools/demo/x?identifier=abcd",
    ]
    for url in urls:
        async with http.get(url) as r:
            body = await r.json()
            assert body["raw_path"] == "/x?identifier=abcd"
            names.add(body["sandbox"])
    async with http.get(
        f"{base}/whole/path?identifier=abcd", headers={"Host": "demo.sessions.test"}
    ) as r:
        body = await r.json()
        assert body["raw_path"] == "/whole/path?identifier=abcd"
        names.add(body["sandbox"])
    assert len(names) == 1


async def test_concurrent_first_requests_across_two_routers_agree(
    store: Store, start_router: Router, sandboxes: Any, http: aiohttp.ClientSession
) -> None:
    pool = make_pool(ready=40, max_sessions=100)
    await store.put_pool(pool)
    for _ in range(30):
        await add_ready(store, pool, await sandboxes())
    bases = [await start_router(), await start_router()]
    idents = [f"user-{i:02d}" for i in range(20)]

    async def hit(i: int) -> tuple[str, str]:
        ident = idents[i % 20]
        async with http.get(f"{bases[i % 2]}/pools/demo/?identifier={ident}") as r:
            assert r.status == 200, await r.text()
            return ident, (await r.json())["sandbox"]

    results = await asyncio.gather(*(hit(i) for i in range(200)))
    by_ident: dict[str, set[str]] = {}
    for ident, sandbox in results:
        by_ident.setdefault(ident, set()).add(sandbox)
    assert all(len(s) == 1 for s in by_ident.values()), by_ident
    used = {next(iter(s)) for s in by_ident.values()}
    assert len(used) == 20  # exactly 20 sandboxes claimed, one per identifier
    counts = await store.counts("demo")
    assert counts == {"ready": 10, "allocated": 20, "warming": 0}


async def test_sse_events_arrive_one_by_one(serving: Serving, http: aiohttp.ClientSession) -> None:
    base, (sb,) = await serving()
    async with http.get(f"{base}/pools/demo/sse?identifier=sse-user&n=3") as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        for i in range(3):
            # The sandbox sends event i+1 only after we read event i: a buffering proxy
            # would deadlock here and time out.
            line = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert line == f"id: {i}\ndata: event {i}\n\n".encode()
            sb.sse_release.put_nowait(None)
        assert await r.content.read() == b""


async def test_websocket_relay_both_ways_with_close_codes(
    serving: Serving, http: aiohttp.ClientSession
) -> None:
    base, (sb,) = await serving()
    url = f"{base}/pools/demo/ws?identifier=ws-user"
    async with http.ws_connect(url, protocols=["chat"]) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hi")
        assert (await ws.receive_str()) == f"{sb.name}:hi"
        await ws.send_bytes(b"\x01\x02\x03")
        assert (await ws.receive_bytes()) == b"\x03\x02\x01"
        await ws.send_str("close:4001")  # the sandbox closes with 4001
        msg = await ws.receive()
        assert msg.type == WSMsgType.CLOSE
        assert msg.data == 4001
    async with http.ws_connect(url) as ws:  # the client closes with 4002
        await ws.send_str("ping")
        await ws.receive_str()
        await ws.close(code=4002)
    await wait_until(lambda: {"ws_close_code": 4002} in sb.requests)


async def test_management_get_list_stop(
    serving: Serving, store: Store, sandboxes: Any, http: aiohttp.ClientSession
) -> None:
    base, _ = await serving(make_pool(cooldown_s=60), ready=2)
    ep = f"{base}/pools/demo"
    for ident in ("alpha", "bravo"):
        async with http.get(f"{ep}/?identifier={ident}") as r:
            assert r.status == 200
    async with http.post(f"{ep}/.management/getSession?identifier=alpha") as r:
        view = await r.json()
    assert view["identifier"] == "alpha"
    assert view["expiresAt"] == view["expireAt"] and view["expiresAt"].endswith("Z")
    assert view["etag"] and view["createdAt"] and view["lastAccessedAt"]
    async with http.get(f"{ep}/.management/listSessions") as r:
        listing = await r.json()
    assert listing["count"] == 2 and listing["nextLink"] is None
    assert {v["identifier"] for v in listing["value"]} == {"alpha", "bravo"}
    assert listing["sessions"] == listing["value"]
    async with http.post(f"{ep}/.management/stopSession?identifier=alpha") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        assert await r.text() == "Session alpha in session pool demo stopped."
    async with http.post(f"{ep}/.management/getSession?identifier=alpha") as r:
        assert r.status == 404
        assert_envelope(r.status, await r.json(), r.headers, "SessionNotFound")
    # The stopped sandbox is queued for teardown and never handed out again.
    sandboxes_now = await store.sandboxes("demo")
    assert sorted(s.state for s in sandboxes_now.values()) == ["allocated", "stopping"]
    async with http.get(f"{ep}/?identifier=alpha") as r:
        assert r.status == 503  # no ready sandbox left: a stopped one is never reused


async def test_list_sessions_pages_of_300(
    store: Store, start_router: Router, http: aiohttp.ClientSession
) -> None:
    pool = make_pool(ready=0, max_sessions=1000)
    await store.put_pool(pool)
    k = store.pk("demo")
    async with store.redis.pipeline(transaction=False) as pipe:
        for i in range(305):
            pipe.hset(
                k.sessions,
                f"id-{i:04d}",
                b'{"sandbox":"s","createdAt":1,"cooldownMs":1000,"lifecycle":"Timed"}',
            )
            pipe.zadd(k.expiry, {f"id-{i:04d}": 10_000 + i})
        await pipe.execute()
    base = await start_router()
    async with http.get(f"{base}/pools/demo/.management/listSessions?skip=0") as r:
        page = await r.json()
    assert page["count"] == 305 and len(page["value"]) == 300
    assert page["nextLink"] == f"{base}/pools/demo/.management/listSessions?skip=300"
    async with http.get(page["nextLink"]) as r:
        page2 = await r.json()
    assert [v["identifier"] for v in page2["value"]] == [f"id-{i:04d}" for i in range(300, 305)]
    async with http.get(f"{base}/pools/demo/.management/listSessions?skip=-1") as r:
        assert r.status == 400


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/pools/demo/x", 400, "MissingIdentifier"),
        ("/pools/demo/x?identifier=", 400, "MissingIdentifier"),
        ("/pools/demo/x?identifier=abc", 400, "InvalidIdentifier"),
        ("/pools/demo/x?identifier=" + "a" * 129, 400, "InvalidIdentifier"),
        ("/pools/demo/x?identifier=has%20space", 400, "InvalidIdentifier"),
        ("/pools/demo/x?identifier=nul%00byte", 400, "InvalidIdentifier"),
        ("/pools/nope/x?identifier=abcd", 404, "PoolNotFound"),
        ("/pools/demo/.management/getSession?identifier=unknown", 404, "SessionNotFound"),
    ],
)
async def test_client_errors_have_the_envelope(
    store: Store,
    start_router: Router,
    http: aiohttp.ClientSession,
    path: str,
    status: int,
    code: str,
) -> None:
    await store.put_pool(make_pool())
    base = await start_router()
    async with http.get(base + path) as r:
        assert r.status == status
        assert_envelope(r.status, await r.json(), r.headers, code)


async def test_invalid_identifier_is_rejected_before_redis(
    redis_server: Any, settings: Settings, start_router: Router, http: aiohttp.ClientSession
) -> None:
    base = await start_router(redis_url="unix:///nonexistent/redis.sock")
    async with http.get(f"{base}/pools/demo/x?identifier=ab") as r:
        assert r.status == 400  # not 503: the store was never asked
    async with http.get(f"{base}/pools/demo/x?identifier=abcd") as r:
        assert r.status == 503
        assert_envelope(r.status, await r.json(), r.headers, "StoreUnavailable")


async def test_body_over_cap_is_413(serving: Serving, http: aiohttp.ClientSession) -> None:
    base, (sb,) = await serving(max_body_bytes=1000)
    url = f"{base}/pools/demo/up?identifier=big-body"
    async with http.post(url, data=b"x" * 1001) as r:  # Content-Length: refused up front
        assert r.status == 413
        assert_envelope(r.status, await r.json(), r.headers, "RequestTooLarge")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 500

    async with http.post(url, data=chunks()) as r:  # chunked: cut once it passes the cap
        assert r.status == 413
        assert_envelope(r.status, await r.json(), r.headers, "RequestTooLarge")
    assert not [q for q in sb.requests if q["body_bytes"] > 1000]


async def test_session_limit_is_429_with_retry_after(
    serving: Serving, http: aiohttp.ClientSession
) -> None:
    base, _ = await serving(make_pool(max_sessions=1), ready=2)
    async with http.get(f"{base}/pools/demo/?identifier=first") as r:
        assert r.status == 200
    async with http.get(f"{base}/pools/demo/?identifier=second") as r:
        assert r.status == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert_envelope(r.status, await r.json(), r.headers, "SessionLimitReached")
    async with http.get(f"{base}/pools/demo/?identifier=first") as r:
        assert r.status == 200  # the existing session still answers


async def test_empty_pool_waits_for_a_ready_sandbox_then_503(
    store: Store, start_router: Router, sandboxes: Any, http: aiohttp.ClientSession
) -> None:
    pool = make_pool()
    await store.put_pool(pool)
    base = await start_router(allocation_wait_s=10.0)
    await wait_cache_live(http, base)
    events = store.pk("demo").events
    task = asyncio.ensure_future(http.get(f"{base}/pools/demo/?identifier=waiter"))
    # The claim found the pool empty and woke the workers through the stream at once.

    async def woke_workers() -> bool:
        return any(b"pool-empty" in e[1][b"data"] for e in await store.redis.xrange(events))

    await wait_until(woke_workers)
    sb = await sandboxes()
    await add_ready(store, pool, sb)  # what the replenisher does; the waiter is woken
    async with await asyncio.wait_for(task, 5) as r:
        assert r.status == 200
        assert (await r.json())["sandbox"] == sb.name
    base2 = await start_router(allocation_wait_s=0.3)
    async with http.get(f"{base2}/pools/demo/?identifier=nobody-home") as r:
        assert r.status == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert_envelope(r.status, await r.json(), r.headers, "NoReadySession")


async def test_unreachable_and_slow_sessions(
    store: Store,
    start_router: Router,
    sandboxes: Any,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool()
    await store.put_pool(pool)
    dead, slow = await sandboxes(), await sandboxes()
    await add_ready(store, pool, dead)
    dead_port = str(dead.server.port)
    await dead.close()  # its port now refuses connections
    base = await start_router(upstream_idle_timeout_s=0.3)

    async def refused(url: str, status: int, code: str, port: str) -> None:
        async with http.get(url) as r:
            assert r.status == status
            body = await r.read()
            assert_envelope(r.status, orjson.loads(body), r.headers, code)
            # The caller never learns where a sandbox lives; the operator's log does.
            assert port.encode() not in body
            assert not any(port in v for v in r.headers.values())
        assert any(port in rec.getMessage() for rec in caplog.records)

    caplog.set_level(logging.WARNING, logger="sessionpool.proxy")
    await refused(f"{base}/pools/demo/?identifier=dead-one", 502, "SessionUnreachable", dead_port)
    ws_url = f"{base}/pools/demo/ws?identifier=dead-one"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused_ws:
        await http.ws_connect(ws_url)
    assert refused_ws.value.status == 502
    await add_ready(store, pool, slow)
    slow_port = str(slow.server.port)
    caplog.clear()
    await refused(
        f"{base}/pools/demo/drop?identifier=slow-one", 502, "SessionUnreachable", slow_port
    )
    caplog.clear()
    await refused(f"{base}/pools/demo/hang?identifier=slow-one", 504, "SessionTimeout", slow_port)


async def test_client_disconnect_cancels_the_upstream_request(
    serving: Serving, http: aiohttp.ClientSession
) -> None:
    base, (sb,) = await serving()
    task = asyncio.ensure_future(http.get(f"{base}/pools/demo/hang?identifier=leaver"))
    await asyncio.wait_for(sb.slow_started.wait(), 5)
    task.cancel()  # closes the client connection
    await asyncio.wait_for(sb.cancelled.wait(), 5)


async def test_redis_down_then_back(
    serving: Serving, redis_server: Any, store: Store, sandboxes: Any, http: aiohttp.ClientSession
) -> None:
    pool = make_pool()
    base, _ = await serving(pool, ready=2)
    async with http.get(f"{base}/pools/demo/?identifier=before") as r:
        assert r.status == 200
    redis_server.stop()
    try:
        async with http.get(f"{base}/pools/demo/?identifier=during") as r:
            assert r.status == 503
            assert_envelope(r.status, await r.json(), r.headers, "StoreUnavailable")
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 503
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
    finally:
        redis_server.start()
    # The restarted Redis is empty: define the pool again and give it a sandbox.
    await store.put_pool(pool)
    sb = await sandboxes()
    await add_ready(store, pool, sb)

    async def served() -> bool:
        async with http.get(f"{base}/pools/demo/?identifier=after") as r:
            return r.status == 200

    await wait_until(served, timeout=10)


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarding_headers_are_replaced_unless_the_peer_is_a_trusted_proxy(
    store: Store,
    start_router: Router,
    sandboxes: Any,
    http: aiohttp.ClientSession,
    trusted: bool,
) -> None:
    pool = make_pool()
    await store.put_pool(pool)
    await add_ready(store, pool, await sandboxes())
    # The test client connects from 127.0.0.1: trusted in one case, not in the other.
    base = await start_router(
        trusted_proxies="10.0.0.0/8, 127.0.0.0/8" if trusted else "10.0.0.0/8"
    )
    sent = {
        "X-Forwarded-For": "203.0.113.7, 198.51.100.1",
        "Forwarded": 'for=203.0.113.7;proto=https;host="app.example"',
        "X-Real-IP": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "app.example",
        "X-Forwarded-Prefix": "/elsewhere",
    }
    async with http.get(f"{base}/pools/demo/h?identifier=fwd-user", headers=sent) as r:
        assert r.status == 200
        seen = await r.json()
    got: dict[str, list[str]] = {}
    for k, v in seen["headers"]:
        got.setdefault(k.lower(), []).append(v)
    host = base.removeprefix("http://")
    this_hop = f'for=127.0.0.1;proto=http;host="{host}"'
    if trusted:  # the proxy's word is kept and this hop appended
        assert got["x-forwarded-for"] == ["203.0.113.7, 198.51.100.1, 127.0.0.1"]
        assert got["forwarded"] == [f"{sent['Forwarded']}, {this_hop}"]
        assert got["x-real-ip"] == ["203.0.113.7"]
        assert got["x-forwarded-proto"] == ["https"]
        assert got["x-forwarded-host"] == ["app.example"]
    else:  # replaced by what the router saw: nothing the caller wrote survives
        assert got["x-forwarded-for"] == ["127.0.0.1"]
        assert got["forwarded"] == [this_hop]
        assert got["x-real-ip"] == ["127.0.0.1"]
        assert got["x-forwarded-proto"] == ["http"]
        assert got["x-forwarded-host"] == [host]
    assert got["x-forwarded-prefix"] == ["/pools/demo"]  # always the router's own


def test_trusted_proxies_setting_is_checked() -> None:
    assert Settings.from_env({"SESSIONPOOL_TRUSTED_PROXIES": "10.0.0.0/8,::1"}).trusted_proxies
    with pytest.raises(ValueError, match="trusted_proxies: 'nope'"):
        Settings(trusted_proxies="10.0.0.0/8, nope")


def dispatch_cases() -> list[str]:
    """Raw paths for the direct way: plain ones, and every shape the route table might read
    differently (escapes, dot segments, fragments, the MCP endpoint, odd pool names)."""
    plain = ["/pools/demo", "/pools/demo/", "/pools/demo/x?identifier=a", "/pools/demo/a/b/c"]
    tricky = [
        "/pools/demo/../admin/pools",
        "/pools/../admin/pools",
        "/pools/demo/%2e%2e/admin",
        "/pools/de%6do/x",
        "/pools/demo/mcp",
        "/pools/demo/mcp/",
        "/pools/demo/mcp?identifier=a",
        "/pools/demo/x/mcp",
        "/pools/demo/.management/sessions",
        "/pools//demo/x",
        "/pools/DEMO/x",
        "/pools/a{b}/x",
        "/pools/demo#frag/x",
        "/pools/demo/x#frag",
        "/poolsdemo/x",
        "/pools/demo?x=/../admin",
    ]
    parts = ["/", "demo", "mcp", ".", "..", "%2f", "%2e", "x", "?", "#", "a-b", "DEMO", "-"]
    rng = random.Random(16)
    fuzz = ["/pools/" + "".join(rng.choices(parts, k=rng.randint(1, 6))) for _ in range(400)]
    return plain + tricky + fuzz


async def test_the_direct_way_is_taken_only_where_the_route_table_agrees() -> None:
    """`Dispatch` skips URL dispatch for pool endpoint requests: wherever it does, the
    table resolves the same request to the pool endpoint with the same pool."""
    app = create_app(Settings(auth="none", host_suffix="sessions.test"))
    dispatch = app._handle
    assert isinstance(dispatch, Dispatch)
    direct = 0
    for raw in dispatch_cases():
        for host in ("router.test", "demo.sessions.test"):
            request = make_mocked_request("GET", raw, headers={"Host": host}, app=app)
            target = dispatch.target(request)
            if target is None:
                continue
            direct += 1
            assert host == "router.test", raw  # a host-suffix host takes the middleware
            match = await app.router.resolve(request)
            assert match.handler is pool_endpoint, raw
            assert (match["pool"], target.rest) == (
                target.pool,
                Target.split(match["pool"], raw, 2).rest,
            ), raw
    assert direct >= 4  # the plain ones at least
    expect = make_mocked_request(
        "POST", "/pools/demo/x", headers={"Expect": "100-continue"}, app=app
    )
    assert dispatch.target(expect) is None  # aiohttp's expect handler answers it
