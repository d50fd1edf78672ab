"""The workers' scenarios over real Redis and real traffic, on every runtime they apply to.

Each runs once per runtime (`@on(...)`, tests/worker_rigs.py): `process` (child processes of
in-process workers), `docker` (worker processes on the local engine) and `kubernetes` (worker
processes against the fake API server whose pods are real containers; and a real cluster under
the `k8s_cluster` marker). What only one runtime has stays in tests/test_workers_docker.py and
tests/test_workers_kubernetes.py.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import aiohttp
import pytest

from router.sandboxes import MarkReady
from router.store import Store
from sessionpool.testing import HEALTH_PROBE, counts_are, wait_until
from tests.worker_rigs import Rig, consistent, hostname, on, put_warm

pytestmark = pytest.mark.timeout(180)
# A startup probe as usual, then a liveness probe of a port nothing listens on.
FAILING_LIVENESS = [
    HEALTH_PROBE,
    {"type": "Liveness", "tcpSocket": {"port": 9}, "periodSeconds": 1, "failureThreshold": 2},
]


async def no_session(store: Store, pool: str, identifier: str) -> bool:
    return await store.get_session(pool, identifier) is None


async def gone(rig: Rig, host: str) -> bool:
    return host not in await rig.hosts()


@on("process", "docker", "kubernetes")
async def test_warm_pool_serves_refills_and_follows_its_template(
    rig: Rig, store: Store, router_url: str, http: aiohttp.ClientSession
) -> None:
    old = rig.pool(ready=3)
    await rig.warm(store, old)
    assert len(await rig.live()) == 3
    ep = f"{router_url}/pools/main"
    host = await hostname(http, f"{ep}/x?identifier=first-user")
    assert host in (await rig.live()).values()
    assert await hostname(http, f"{ep}/y?identifier=first-user") == host
    await wait_until(lambda: counts_are(store, "main", ready=3, allocated=1), timeout=10)
    await wait_until(lambda: consistent(rig, store, "main"), timeout=10)
    assert len(await rig.live()) == 4

    # A new template replaces the ready sandboxes and keeps the session's.
    new = rig.pool(ready=3, env=({"name": "MODE", "value": "v2"},))
    assert new.version != old.version
    await store.put_pool(new)

    async def replaced() -> bool:
        ready = [r for r in (await store.sandboxes("main")).values() if r.state == "ready"]
        return len(ready) == 3 and all(r.version == new.version for r in ready)

    await wait_until(replaced, timeout=60)
    assert await hostname(http, f"{ep}/z?identifier=first-user") == host
    await wait_until(lambda: consistent(rig, store, "main"), timeout=10)


@on("process", "docker", "kubernetes")
async def test_idle_session_ends_while_a_stream_keeps_its_own(
    rig: Rig, store: Store, router_url: str, http: aiohttp.ClientSession
) -> None:
    await rig.warm(store, rig.pool(ready=2, cooldown_s=2))
    ep = f"{router_url}/pools/main"
    idle_host = await hostname(http, f"{ep}/?identifier=idle-user")
    t_idle = time.monotonic()
    # 10 events 500 ms apart: a 4.5 s stream in flight, over twice the cooldown.
    async with http.get(f"{ep}/sse?n=10&interval_ms=500&identifier=stream-user") as r:
        events = (await r.read()).count(b"data: event")
    assert events == 10  # complete: its sandbox was not torn down under it
    t_end = time.monotonic()
    assert t_end - t_idle > 4
    assert await no_session(store, "main", "idle-user")  # idle: ended during the stream
    assert not await no_session(store, "main", "stream-user")
    await wait_until(lambda: gone(rig, idle_host), timeout=10)
    await wait_until(lambda: no_session(store, "main", "stream-user"), timeout=6, interval=0.05)
    assert time.monotonic() - t_end <= 2 + 2  # within the cooldown (and a reaper round) of it
    await wait_until(lambda: counts_are(store, "main", ready=2, allocated=0), timeout=30)
    await wait_until(lambda: consistent(rig, store, "main"), timeout=10)


@on("process", "docker", "kubernetes")
async def test_stop_exit_outside_kill_and_liveness_end_sessions(
    rig: Rig, store: Store, router_url: str, http: aiohttp.ClientSession
) -> None:
    await rig.warm(
        store,
        rig.pool(ready=2),
        rig.pool("exits", ready=1, lifecycle="OnContainerExit"),
        rig.pool("sick", ready=1, probes=FAILING_LIVENESS),
    )
    ep = f"{router_url}/pools"

    first = await hostname(http, f"{ep}/main/?identifier=stopper")
    async with http.post(f"{ep}/main/.management/stopSession?identifier=stopper") as r:
        assert r.status == 200
    await wait_until(lambda: gone(rig, first), timeout=10)
    await wait_until(lambda: counts_are(store, "main", ready=2), timeout=30)
    assert await hostname(http, f"{ep}/main/?identifier=stopper") != first

    # The session's process exits on its own (code 3).
    second = await hostname(http, f"{ep}/exits/?identifier=exiter")
    async with http.get(f"{ep}/exits/exit?code=3&identifier=exiter") as r:
        assert r.status == 200
    await wait_until(lambda: no_session(store, "exits", "exiter"), timeout=10)
    await wait_until(lambda: gone(rig, second), timeout=10)
    assert await hostname(http, f"{ep}/exits/?identifier=exiter") != second

    third = await hostname(http, f"{ep}/main/?identifier=victim")
    await rig.kill(third)
    await wait_until(lambda: no_session(store, "main", "victim"), timeout=10)
    await wait_until(lambda: gone(rig, third), timeout=10)
    assert await hostname(http, f"{ep}/main/?identifier=victim") != third

    fourth = await hostname(http, f"{ep}/sick/?identifier=patient")
    await wait_until(lambda: no_session(store, "sick", "patient"), timeout=15)
    await wait_until(lambda: gone(rig, fourth), timeout=10)

    for pool, reason in (("main", b'"exited"'), ("sick", b'"unhealthy"')):
        log = await store.redis.xrange(store.pk(pool).log)
        assert any(reason in e[1][b"data"] for e in log), pool


@on("process", "docker", "kubernetes")
async def test_workers_keep_exactly_the_target_and_a_deleted_pool_leaves_nothing(
    rig: Rig, store: Store, router_url: str, http: aiohttp.ClientSession
) -> None:
    for _ in range(rig.replicas):
        await rig.start_worker()
    await put_warm(store, rig.pool(ready=3))
    await wait_until(lambda: consistent(rig, store, "main"), timeout=10)
    deadline = time.monotonic() + 3  # several reconcile and refill rounds later: still 3
    while time.monotonic() < deadline:
        assert len(await rig.hosts()) <= 3
        await asyncio.sleep(0.1)
    assert len(await rig.hosts()) == 3

    await hostname(http, f"{router_url}/pools/main/?identifier=doomed")
    held = await rig.leftovers("main")
    assert len(held) >= 3  # what "nothing left" below would miss
    if rig.runtime == "kubernetes":
        assert sum(1 for o in held if "-env" in o) == 1  # the pool's Secret
    assert await store.delete_pool("main")

    async def nothing_left() -> bool:
        return not await rig.leftovers("main") and not await store.sandboxes("main")

    await wait_until(nothing_left, timeout=30)


@on("process", "docker", "kubernetes")
async def test_pool_with_no_ready_instances_starts_one_per_waiting_request(
    rig: Rig, store: Store, router_url: str, http: aiohttp.ClientSession
) -> None:
    await rig.start_worker()
    await store.put_pool(rig.pool(ready=0, max_sessions=2))
    hosts = await asyncio.gather(
        *(hostname(http, f"{router_url}/pools/main/?identifier=cold-{i}") for i in range(3)),
        return_exceptions=True,
    )
    served = [h for h in hosts if isinstance(h, str)]
    assert len(served) == 2 and len(set(served)) == 2  # one sandbox each, up to the limit
    assert len(hosts) - len(served) == 1  # the third is over maxConcurrentSessions
    await wait_until(lambda: counts_are(store, "main", ready=0, warming=0, allocated=2))
    assert len(await rig.live()) == 2  # nothing extra kept warm


@on("docker", "kubernetes")
async def test_killed_worker_leaks_nothing_and_reconciliation_goes_both_ways(
    rig: Rig, store: Store
) -> None:
    pool = rig.pool(ready=4)
    await store.put_pool(pool)
    # A record with no sandbox: a ready sandbox whose container vanished.
    lost = uuid.uuid4().hex
    assert await store.reserve(pool, "test", [lost]) == [lost]
    ready = await store.mark_ready("main", lost, rig.container_name(lost), "10.0.0.1:1")
    assert ready is MarkReady.READY
    # What the killed worker was starting is reclaimed once it has been warming this long.
    warm_timeout = {"warm_timeout_s": 8}
    worker = await rig.start_worker(**warm_timeout)

    async def warming_with_container() -> bool:
        recs = (await store.sandboxes("main")).values()
        return any(r.state == "warming" and r.container for r in recs)

    await wait_until(warming_with_container, timeout=60, interval=0.01)
    worker.send_signal(signal.SIGKILL)  # in the middle of creating sandboxes
    await worker.wait()
    # Sandboxes with no record: one made by hand (as a dead worker's), and whatever the kill left.
    stray = await rig.stray(pool)
    await rig.start_worker(**warm_timeout)
    await wait_until(lambda: counts_are(store, "main", ready=4, warming=0), timeout=60)
    await wait_until(lambda: consistent(rig, store, "main"), timeout=30)
    assert stray not in await rig.hosts()
    assert len(await rig.hosts()) == 4
    assert lost not in await store.sandboxes("main")
