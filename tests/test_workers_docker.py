"""Workers on a real Docker engine: warm pools, teardown, exits, liveness, crashes, replicas."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.pools import Pool
from router.sandboxes import MarkReady
from router.settings import Settings
from router.store import Store
from sessionpool import testing
from sessionpool.testing import FAST_WORKER, Workers, counts_are, serving_router
from tests.helpers import open_engine, wait_until
from workers.runtime import LABEL_POOL, LABEL_SANDBOX, LABEL_SCOPE, LABEL_VERSION

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parent.parent
IMAGE = "sessionpool/echo:dev"


def echo_pool(name: str = "dock", **kwargs: Any) -> Pool:
    return testing.echo_pool(name, **kwargs)


@pytest.fixture(scope="module")
def engine() -> Any:
    client = open_engine(IMAGE)
    yield client
    client.close()


class Seen:
    """A container as one list call saw it (no follow-up inspect that could race a removal)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.id: str = raw["Id"]
        self.labels: dict[str, str] = raw.get("Labels") or {}
        self.status: str = raw.get("State", "")


def containers(engine: Any, scope: str) -> list[Seen]:
    raw = engine.api.containers(all=True, filters={"label": f"{LABEL_SCOPE}={scope}"})
    return [Seen(r) for r in raw]


@pytest.fixture
async def workers(engine: Any, settings: Settings, tmp_path: Path) -> AsyncIterator[Workers]:
    fast = settings.replace(**FAST_WORKER)
    group = Workers(fast, "docker", tmp_path)
    yield group
    codes = await group.stop()
    for c in containers(engine, settings.key_prefix):  # whatever a failed test left
        engine.api.remove_container(c.id, force=True)
    print(group.tails())  # shown by pytest only when the test failed
    assert codes == [0] * len(codes), "a worker did not exit cleanly on SIGTERM"


@pytest.fixture
async def router_url(settings: Settings) -> AsyncIterator[str]:
    async with serving_router(settings.replace(allocation_wait_s=20.0)) as url:
        yield url


async def hostname(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["hostname"])


async def consistent(engine: Any, store: Store, pool: str) -> bool:
    """Every record has a running container and every container a record."""
    recs = await store.sandboxes(pool)
    live = {
        c.labels[LABEL_SANDBOX]
        for c in containers(engine, store.keys.prefix)
        if c.status == "running"
    }
    return set(recs) == live and all(r.state in ("ready", "allocated") for r in recs.values())


async def test_warm_pool_serves_and_refills(
    engine: Any, store: Store, workers: Any, router_url: str
) -> None:
    await workers()
    await store.put_pool(echo_pool(ready=3))
    await wait_until(lambda: counts_are(store, "dock", ready=3, warming=0), timeout=60)
    assert len(containers(engine, store.keys.prefix)) == 3
    async with aiohttp.ClientSession() as http:
        host = await hostname(http, f"{router_url}/pools/dock/x?identifier=first-user")
        assert host in {c.id[:12] for c in containers(engine, store.keys.prefix)}
        assert await hostname(http, f"{router_url}/pools/dock/y?identifier=first-user") == host
    await wait_until(lambda: counts_are(store, "dock", ready=3, allocated=1), timeout=10)
    await wait_until(lambda: consistent(engine, store, "dock"), timeout=10)


async def test_idle_destroyed_in_flight_kept(
    engine: Any, store: Store, workers: Any, router_url: str
) -> None:
    await workers()
    await store.put_pool(echo_pool(ready=2, cooldown_s=2))
    await wait_until(lambda: counts_are(store, "dock", ready=2), timeout=60)
    async with aiohttp.ClientSession() as http:
        idle_host = await hostname(http, f"{router_url}/pools/dock/?identifier=idle-user")
        t_idle = time.monotonic()
        # 10 events 500 ms apart: a 4.5 s stream in flight, over twice the cooldown.
        async with http.get(
            f"{router_url}/pools/dock/sse?n=10&interval_ms=500&identifier=stream-user"
        ) as r:
            events = (await r.read()).count(b"data: event")
        assert events == 10
        t_end = time.monotonic()
        assert t_end - t_idle > 4
        alive = {c.id[:12] for c in containers(engine, store.keys.prefix)}
        assert idle_host not in alive  # idle: gone within the stream's 4.5 s (cooldown 2)
        assert await store.get_session("dock", "stream-user") is not None

        async def stream_session_gone() -> bool:
            return await store.get_session("dock", "stream-user") is None

        await wait_until(stream_session_gone, timeout=6, interval=0.05)
        assert time.monotonic() - t_end <= 2 + 2
    await wait_until(lambda: consistent(engine, store, "dock"), timeout=10)


async def test_stop_exit_kill_and_liveness_end_sessions(
    engine: Any, store: Store, workers: Any, router_url: str
) -> None:
    await workers()
    await store.put_pool(echo_pool(ready=2))
    await store.put_pool(echo_pool("exits", ready=1, lifecycle="OnContainerExit"))
    await store.put_pool(
        echo_pool(
            "sick",
            ready=1,
            probes=[
                {"type": "Startup", "httpGet": {"path": "/health", "port": 8080}},
                {
                    "type": "Liveness",
                    "tcpSocket": {"port": 9},
                    "periodSeconds": 1,
                    "failureThreshold": 2,
                },
            ],
        )
    )
    for name, ready in (("dock", 2), ("exits", 1), ("sick", 1)):
        await wait_until(lambda n=name, r=ready: counts_are(store, n, ready=r), timeout=60)
    scope = store.keys.prefix

    def alive(host: str) -> bool:
        return host in {c.id[:12] for c in containers(engine, scope)}

    async with aiohttp.ClientSession() as http:
        ep = f"{router_url}/pools"
        first = await hostname(http, f"{ep}/dock/?identifier=stopper")
        async with http.post(f"{ep}/dock/.management/stopSession?identifier=stopper") as r:
            assert r.status == 200
        await wait_until(lambda: not alive(first), timeout=5)
        assert await hostname(http, f"{ep}/dock/?identifier=stopper") != first

        second = await hostname(http, f"{ep}/exits/?identifier=exiter")
        async with http.get(f"{ep}/exits/exit?code=0&identifier=exiter") as r:
            assert r.status == 200
        await wait_until(lambda: not alive(second), timeout=10)
        assert await store.get_session("exits", "exiter") is None
        assert await hostname(http, f"{ep}/exits/?identifier=exiter") != second

        third = await hostname(http, f"{ep}/dock/?identifier=victim")
        engine.containers.get(third).kill()
        await wait_until(lambda: _gone(store, "dock", "victim"), timeout=10)
        await wait_until(lambda: not alive(third), timeout=10)
        assert await hostname(http, f"{ep}/dock/?identifier=victim") != third

        fourth = await hostname(http, f"{ep}/sick/?identifier=patient")
        await wait_until(lambda: _gone(store, "sick", "patient"), timeout=15)
        await wait_until(lambda: not alive(fourth), timeout=10)
    log = await store.redis.xrange(store.pk("sick").log)
    assert any(b'"unhealthy"' in e[1][b"data"] for e in log)


async def _gone(store: Store, pool: str, ident: str) -> bool:
    return await store.get_session(pool, ident) is None


async def test_killed_worker_leaks_nothing_and_orphans_are_removed(
    engine: Any, store: Store, workers: Any
) -> None:
    w = await workers()
    await store.put_pool(echo_pool(ready=6))
    await wait_until(lambda: _warming_with_containers(store, engine), timeout=60, interval=0.01)
    w.send_signal(signal.SIGKILL)  # in the middle of creating containers
    await w.wait()
    scope = store.keys.prefix
    pool = echo_pool(ready=6)
    stray = engine.containers.run(
        IMAGE,
        detach=True,
        labels={
            LABEL_SCOPE: scope,
            LABEL_POOL: "dock",
            LABEL_SANDBOX: "handmade",
            LABEL_VERSION: pool.version,
        },
    )
    await workers()
    await wait_until(lambda: counts_are(store, "dock", ready=6, warming=0), timeout=60)
    await wait_until(lambda: consistent(engine, store, "dock"), timeout=30)
    assert stray.id not in {c.id for c in containers(engine, scope)}
    assert len(containers(engine, scope)) == 6


async def _warming_with_containers(store: Store, engine: Any) -> bool:
    recs = await store.sandboxes("dock")
    return sum(1 for r in recs.values() if r.state == "warming" and r.container) >= 1


async def test_two_replicas_keep_exactly_the_target(
    engine: Any, store: Store, workers: Any
) -> None:
    await workers()
    await workers()
    await store.put_pool(echo_pool(ready=4))
    await wait_until(lambda: counts_are(store, "dock", ready=4, warming=0), timeout=60)
    await wait_until(lambda: consistent(engine, store, "dock"), timeout=10)
    deadline = time.monotonic() + 3  # several reconcile and refill rounds later: still 4
    while time.monotonic() < deadline:
        assert len(containers(engine, store.keys.prefix)) <= 4
        await asyncio.sleep(0.1)
    assert len(containers(engine, store.keys.prefix)) == 4


async def test_reconcile_leaves_starting_and_paused_sandboxes_alone(
    engine: Any, store: Store, settings: Settings
) -> None:
    """Regression (found by tests/chaos.py): a container being started ("created") or paused
    (a stall) was taken for exited, so replicas tore down each other's new sandboxes."""
    from router.store import open_redis
    from workers.context import Context
    from workers.docker import DockerRuntime
    from workers.reaper import Reaper
    from workers.runtime import SandboxSpec

    pool = echo_pool(ready=2)
    await store.put_pool(pool)
    runtime = DockerRuntime()
    streams = open_redis(settings.redis_url, timeout_s=10)
    async with aiohttp.ClientSession() as http:
        ctx = Context(settings.replace(orphan_grace_s=0.0), store, streams, runtime, http)
        reaper = Reaper(ctx)
        try:
            # A session whose container is paused.
            sid = "pausedsandbox0001"
            assert await store.reserve(pool, "test", [sid]) == [sid]
            handle = await runtime.create(SandboxSpec(store.keys.prefix, pool, sid))
            assert (
                await store.mark_ready("dock", sid, handle.container, handle.addr)
                is MarkReady.READY
            )
            assert (await store.claim(pool, "paused-user")).created
            engine.api.pause(handle.container)
            # A sandbox whose container exists but has not been started yet.
            starting = "startingsandbox01"
            assert await store.reserve(pool, "test", [starting]) == [starting]
            created = engine.api.create_container(
                IMAGE,
                labels={
                    LABEL_SCOPE: store.keys.prefix,
                    LABEL_POOL: "dock",
                    LABEL_SANDBOX: starting,
                    LABEL_VERSION: pool.version,
                },
            )
            fixed = await reaper.reconcile()
            assert fixed == {"orphans": 0, "lost": 0, "stale_warming": 0, "stuck": 0}
            assert await store.get_session("dock", "paused-user") is not None
            recs = await store.sandboxes("dock")
            assert recs[sid].state == "allocated"
            assert recs[starting].state == "warming"
            assert engine.api.inspect_container(created["Id"])["State"]["Status"] == "created"
            engine.api.unpause(handle.container)
            # The same pass does end a session whose container really exited.
            engine.api.kill(handle.container)
            await wait_until(
                lambda: (
                    engine.api.inspect_container(handle.container)["State"]["Status"] == "exited"
                ),
                timeout=10,
            )
            fixed = await reaper.reconcile()
            assert fixed["lost"] == 1
            assert await store.get_session("dock", "paused-user") is None
        finally:
            for c in containers(engine, store.keys.prefix):
                engine.api.remove_container(c.id, force=True)
            await runtime.close()
            await streams.aclose()
