"""The request path under pressure: one CLAIM per herd, a Redis pool that waits instead of
failing, probes that never take the request path's connections. Real Redis, real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from router import routing as routing_module
from router import scripts
from router.app import ROUTING, STORE, Cached, create_app
from router.routing import Routing
from router.settings import Settings
from router.store import Store
from tests.helpers import FakeSandbox, add_ready, hold, make_pool, wait_until

CLAIM_SHA = hashlib.sha1(scripts.CLAIM.encode()).hexdigest()


class Monitor:
    """Counts what Redis really executed, from its MONITOR feed."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.lines: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Monitor:
        reader, self._writer = await asyncio.open_unix_connection(str(self.socket))
        self._writer.write(b"MONITOR\r\n")
        assert await reader.readline() == b"+OK\r\n"
        self._task = asyncio.create_task(self._read(reader))
        return self

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self.lines.append(line.decode(errors="replace"))

    async def __aexit__(self, *exc: object) -> None:
        assert self._writer is not None and self._task is not None
        self._writer.close()
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task

    async def sync(self, store: Store) -> None:
        """Everything executed before this call is in `lines` once it returns."""
        marker = uuid.uuid4().hex
        await store.redis.echo(marker)
        await wait_until(lambda: any(marker in line for line in self.lines))

    def claims(self, key_prefix: str, identifier: str) -> int:
        return sum(
            1
            for line in self.lines
            if f'"evalsha" "{CLAIM_SHA}"' in line.lower()
            and f'"{key_prefix}:sessions:' in line
            and f'"{identifier}"' in line
        )


class Env:
    def __init__(self, server: TestServer, store: Store, key_prefix: str) -> None:
        self.server = server
        self.store = store
        self.key_prefix = key_prefix
        self.base = f"http://127.0.0.1:{server.port}"

    @property
    def routing(self) -> Routing:
        return self.server.app[ROUTING]

    @property
    def router_store(self) -> Store:
        return self.server.app[STORE]


@pytest.fixture
async def env(
    settings: Settings, store: Store, key_prefix: str
) -> AsyncIterator[tuple[Env, FakeSandbox]]:
    sandbox = await FakeSandbox().start()
    pool = make_pool()
    await store.put_pool(pool)
    await add_ready(store, pool, sandbox)
    await add_ready(store, pool, sandbox)
    await store.redis.script_load(scripts.CLAIM)  # no NOSCRIPT retries in the count
    app = create_app(
        settings.replace(route_cache_ttl_s=1.0, redis_max_connections=4, redis_timeout_s=30.0)
    )
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    e = Env(server, store, key_prefix)
    await wait_until(lambda: e.routing.cache_enabled)
    yield e, sandbox
    await server.close()
    await sandbox.close()


class HeldPool:
    """Holds every free connection of the router's Redis pool with a blocking call."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.keys = [f"{env.key_prefix}:hold:{i}" for i in range(3)]  # 4 = these + subscriber
        self.tasks: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> HeldPool:
        redis = self.env.router_store.redis
        self.tasks = [asyncio.create_task(redis.blpop([k], timeout=20)) for k in self.keys]

        async def blocked() -> bool:
            clients = await self.env.store.redis.client_list()
            return sum(1 for c in clients if c.get("cmd") == "blpop") >= len(self.keys)

        await wait_until(blocked)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    async def release(self) -> None:
        for key in self.keys:
            await self.env.store.redis.lpush(key, b"go")
        await asyncio.gather(*self.tasks)


async def get_sandbox(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        name: str = (await r.json())["sandbox"]
        return name


async def test_a_herd_for_one_identifier_makes_one_claim_across_a_cache_expiry(
    env: tuple[Env, FakeSandbox], redis_server: Any
) -> None:
    e, sandbox = env
    n = 30
    url = f"{e.base}/pools/demo/x?identifier=herd"
    async with Monitor(redis_server.socket) as monitor, aiohttp.ClientSession() as http:
        for round_ in (1, 2):
            # The Redis pool is held, so every request misses and queues before any CLAIM runs:
            # without single flight each would then run its own.
            misses = e.routing.misses
            await e.routing.get_pool("demo")  # cached: the pool lookup needs no connection
            async with HeldPool(e) as held:
                calls = [asyncio.create_task(get_sandbox(http, url)) for _ in range(n)]
                await wait_until(lambda misses=misses: e.routing.misses == misses + n)
                await held.release()
                served = await asyncio.gather(*calls)
            assert served == [sandbox.name] * n
            await monitor.sync(e.store)
            assert monitor.claims(e.key_prefix, "herd") == round_
            # Let the cached route expire; the next round is a herd of cached requests again.
            await wait_until(lambda: e.routing.cached("demo", "herd") is None)


async def test_requests_wait_for_a_busy_redis_pool_and_probes_do_not(
    env: tuple[Env, FakeSandbox],
) -> None:
    e, sandbox = env
    async with aiohttp.ClientSession() as http:
        await e.routing.get_pool("demo")
        async with HeldPool(e) as held:
            calls = [
                asyncio.create_task(get_sandbox(http, f"{e.base}/pools/demo/x?identifier=user{i}"))
                for i in range(2)
            ]
            # The probes have their own connections: they answer while the pool is held.
            async with http.get(f"{e.base}/readyz") as r:
                assert r.status == 200
            async with http.get(f"{e.base}/metrics") as r:
                assert r.status == 200
                assert "sessionpool_pool_ready" in await r.text()
            await wait_until(lambda: e.routing.misses >= 2)
            assert not any(c.done() for c in calls)  # waiting, not failed with 503
            await held.release()
            assert await asyncio.gather(*calls) == [sandbox.name] * 2


async def test_a_herd_reads_a_pool_definition_once_when_cold_and_once_when_expired(
    monkeypatch: pytest.MonkeyPatch, env: tuple[Env, FakeSandbox], redis_server: Any
) -> None:
    e, _ = env
    monkeypatch.setattr(routing_module, "POOL_CACHE_TTL_S", 0.0)  # cached, but expired at once
    definition = e.store.pk("herd").definition

    def reads() -> int:
        return sum(1 for line in monitor.lines if f'"get" "{definition.lower()}"' in line.lower())

    await e.store.put_pool(make_pool("herd"))
    async with Monitor(redis_server.socket) as monitor:
        # Cold: every caller misses; one GET serves them all.
        pools = await asyncio.gather(*(e.routing.get_pool("herd") for _ in range(30)))
        assert {p.name for p in pools} == {"herd"}
        await monitor.sync(e.store)
        assert reads() == 1
        # Expired: every caller is answered from the cache while one GET renews it.
        pools = await asyncio.gather(*(e.routing.get_pool("herd") for _ in range(30)))
        assert {p.name for p in pools} == {"herd"}
        await wait_until(lambda: reads() == 2)
        await monitor.sync(e.store)
        assert reads() == 2

    # Expired while the renewing read is slow: callers are still answered from the cache at
    # once (stale-while-revalidate), not queued behind the read (single flight alone).
    gate, renewed = asyncio.Event(), asyncio.Event()
    read = e.router_store.get_pool

    async def held_read(name: str) -> Any:
        await gate.wait()
        pool = await read(name)
        renewed.set()
        return pool

    monkeypatch.setattr(e.router_store, "get_pool", held_read)
    herd = asyncio.gather(*(e.routing.get_pool("herd") for _ in range(30)))
    pools = await asyncio.wait_for(herd, 5)
    assert {p.name for p in pools} == {"herd"}
    gate.set()
    await asyncio.wait_for(renewed.wait(), 5)  # the one renewal was running meanwhile


async def test_close_cancels_the_reads_still_running_off_requests(
    monkeypatch: pytest.MonkeyPatch, env: tuple[Env, FakeSandbox]
) -> None:
    """At shutdown a pool read in flight (a miss's, or a renewal's) is cancelled and awaited
    before the store's client closes, never left to open a connection after it."""
    e, _ = env
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def held_read(name: str) -> Any:
        return await hold(entered, cancelled)

    monkeypatch.setattr(e.router_store, "get_pool", held_read)
    caller = asyncio.create_task(e.routing.get_pool("not-cached"))
    await asyncio.wait_for(entered.wait(), 5)
    await e.routing.close()
    assert cancelled.is_set()  # already, when close() returned
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_a_probe_answer_still_computing_at_shutdown_is_stopped() -> None:
    """/readyz and /metrics share one computation (`Cached`), shielded from callers who
    leave; at shutdown it is cancelled, so it never reaches a Redis client closed under it
    (it would open a new connection nobody closes)."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    cached = Cached(lambda: hold(started, cancelled), 1.0)  # a slow Redis
    caller = asyncio.create_task(cached.get())
    await started.wait()
    caller.cancel()  # the caller leaves; the shielded computation goes on
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not cancelled.is_set()
    await cached.close()
    assert cancelled.is_set()
