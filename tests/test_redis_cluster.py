"""Redis Cluster: a router and a worker on a real three-node cluster serve pools whose keys live
on different nodes (SPEC: Sentinel and Cluster URLs are supported besides a plain URL).

On a cluster one stream read cannot span keys of several slots, so the worker's supervisor reads
each pool's streams on their own there (workers/supervisor.py); these tests are what runs that
path: pools on different nodes are filled, their sessions are routed and reaped, and a deleted
pool's work stops and leaves nothing.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from redis.asyncio.cluster import RedisCluster

from router.app import ROUTING, create_app
from router.keys import Keys
from router.store import Store, open_redis
from sessionpool.testing import unused_ports
from tests.helpers import wait_until
from tests.worker_rigs import process_pool, process_settings
from workers.main import run
from workers.process import ProcessRuntime

pytestmark = pytest.mark.timeout(120)


class Cluster:
    """Three primaries on loopback (no replicas), each a real redis-server in cluster mode."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        # Each node's cluster bus has a port of its own (the default, port + 10000, can be taken
        # or above 65535).
        ports = unused_ports(6)
        self.ports, self.bus_ports = ports[:3], ports[3:]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for port, bus in zip(self.ports, self.bus_ports, strict=True):
            node = self.dir / str(port)
            node.mkdir()
            self.procs.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        *("--bind", "127.0.0.1", "--port", str(port)),
                        *("--cluster-enabled", "yes", "--cluster-port", str(bus)),
                        *("--cluster-config-file", str(node / "nodes.conf")),
                        *("--save", "", "--appendonly", "no", "--dir", str(node)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def create(self) -> None:
        """Hand the 16384 slots out over the three nodes (redis-cli's own planner)."""
        subprocess.run(
            [
                *("redis-cli", "--cluster", "create"),
                *(f"127.0.0.1:{p}" for p in self.ports),
                *("--cluster-replicas", "0", "--cluster-yes"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


async def _answers(port: int) -> bool:
    r = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    try:
        return bool(await r.ping())
    except (aioredis.ConnectionError, aioredis.TimeoutError):
        return False
    finally:
        await r.aclose()


async def _cluster_ok(ports: list[int]) -> bool:
    """Every node sees every slot served (slots are learned by gossip, so this takes a while)."""
    for port in ports:
        r = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=1, decode_responses=True)
        try:
            info = await r.execute_command("CLUSTER", "INFO")
        except (aioredis.ConnectionError, aioredis.TimeoutError):
            return False
        finally:
            await r.aclose()
        text = info if isinstance(info, str) else str(info)
        if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
            return False
    return True


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    assert shutil.which("redis-server") and shutil.which("redis-cli"), "redis is not installed"
    c = Cluster(tmp_path)
    c.start()
    try:
        for port in c.ports:
            await wait_until(lambda port=port: _answers(port), timeout=10)
        await asyncio.to_thread(c.create)
        await wait_until(lambda: _cluster_ok(c.ports), timeout=30)
        yield c
    finally:
        c.stop()


async def _node_of(redis: RedisCluster, key: str) -> int:
    node = redis.get_node_from_key(key)
    assert node is not None, key
    return int(node.port)


async def pools_on_different_nodes(redis: RedisCluster, keys: Keys, n: int) -> list[str]:
    """n pool names whose keys (one hash tag per pool) live on n different nodes."""
    found: dict[int, str] = {}
    for i in range(1000):
        name = f"pool-{i}"
        port = await _node_of(redis, keys.pool(name).sandboxes)
        found.setdefault(port, name)
        if len(found) == n:
            return list(found.values())
    raise AssertionError("no pool names on that many nodes")


async def test_pools_on_every_node_are_filled_routed_reaped_and_deleted(
    cluster: Cluster, key_prefix: str
) -> None:
    runtime = ProcessRuntime(use_bwrap=False)
    settings = process_settings(cluster.url, key_prefix)
    redis = open_redis(cluster.url)
    assert isinstance(redis, RedisCluster)
    await redis.initialize()  # learns the slot map (a first command would too)
    keys = Keys(key_prefix)
    store = Store(redis, keys)
    names = await pools_on_different_nodes(redis, keys, 3)
    for name in names:
        await store.put_pool(process_pool(name, ready=2, cooldown_s=2))
    stop = asyncio.Event()
    worker = asyncio.create_task(run(settings, runtime, stop))
    server = TestServer(create_app(settings), host="127.0.0.1", handler_cancellation=True)
    await server.start_server()

    async def ready(name: str, n: int) -> bool:
        return (await store.counts(name))["ready"] == n

    async def processes(name: str) -> set[str]:
        seen = await runtime.list(key_prefix)
        return {o.sandbox_id for o in seen if o.running and o.pool == name}

    try:
        # The router's invalidation subscription is live on the cluster (routes are cached).
        await wait_until(lambda: server.app[ROUTING].cache_enabled, timeout=10)
        for name in names:  # the replenisher answers every pool's demand, on every node
            await wait_until(lambda name=name: ready(name, 2), timeout=30)
        async with aiohttp.ClientSession() as http:
            for name in names:
                url = f"http://127.0.0.1:{server.port}/pools/{name}/?identifier=user-{name}"
                for _ in range(2):  # the second request meets the same sandbox
                    async with http.get(url) as r:
                        assert r.status == 200, await r.text()
                session = await store.get_session(name, f"user-{name}")
                assert session is not None and session.sandbox in await processes(name)
                # The pool's allocation reached the worker: it makes a replacement.
                await wait_until(lambda name=name: ready(name, 2), timeout=30)

            # Idle past the 2 s cooldown: the reaper ends each session and its sandbox.
            sandboxes = {}
            for name in names:
                session = await store.get_session(name, f"user-{name}")
                assert session is not None
                sandboxes[name] = session.sandbox

            async def reaped(name: str) -> bool:
                return await store.get_session(name, f"user-{name}") is None and sandboxes[
                    name
                ] not in await processes(name)

            for name in names:
                await wait_until(lambda name=name: reaped(name), timeout=30)
            # The identifier comes back to a new sandbox (its cached route was dropped).
            name = names[0]
            url = f"http://127.0.0.1:{server.port}/pools/{name}/?identifier=user-{name}"
            async with http.get(url) as r:
                assert r.status == 200, await r.text()
            again = await store.get_session(name, f"user-{name}")
            assert again is not None and again.sandbox != sandboxes[name]

            # Session management on a pool's node: list, get, stop.
            mgmt = f"http://127.0.0.1:{server.port}/pools/{name}/.management"
            async with http.get(f"{mgmt}/listSessions") as r:
                assert r.status == 200, await r.text()
                assert f"user-{name}" in {s["identifier"] for s in (await r.json())["value"]}
            ident = {"identifier": f"user-{name}"}
            async with http.get(f"{mgmt}/getSession", params=ident) as r:
                assert r.status == 200, await r.text()
            async with http.post(f"{mgmt}/stopSession", params=ident) as r:
                assert r.status in (200, 204), await r.text()
            sandboxes[name] = again.sandbox
            await wait_until(lambda: reaped(name), timeout=30)
            for path in ("readyz", "metrics"):
                async with http.get(f"http://127.0.0.1:{server.port}/{path}") as r:
                    assert r.status == 200, (path, await r.text())

            # The admin API lists every pool (with its counts, read from each pool's node)
            # and deletes one.
            async with http.get(f"http://127.0.0.1:{server.port}/admin/pools") as r:
                assert r.status == 200, await r.text()
                listed = {p["name"] for p in (await r.json())["value"]}
            assert listed == set(names)
            doomed, *kept = names
            async with http.delete(f"http://127.0.0.1:{server.port}/admin/pools/{doomed}") as r:
                assert r.status in (200, 204), await r.text()

        # A deleted pool's work stops and leaves nothing; the others keep their floor.

        async def nothing_left() -> bool:
            return not await processes(doomed) and not await store.sandboxes(doomed)

        await wait_until(nothing_left, timeout=30)
        for name in kept:
            assert await ready(name, 2)
            assert len(await processes(name)) == 2
    finally:
        await server.close()
        stop.set()
        await asyncio.wait_for(worker, 30)
        await redis.aclose()
