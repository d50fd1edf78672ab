"""The warm pool follows demand (process runtime, real Redis): it grows under a burst of new
identifiers, never past maxConcurrentSessions, shrinks back after, and ready sandboxes above
the target that nobody claimed are retired after the grace."""

from __future__ import annotations

import asyncio

import aiohttp

from router.store import Store
from sessionpool.testing import counts_are, wait_until
from tests.worker_rigs import Rig, hostname, on, process_pool


@on("process")
async def test_warm_pool_grows_under_a_burst_and_shrinks_after(
    rig: Rig, store: Store, router_url: str, http: aiohttp.ClientSession
) -> None:
    await rig.start_worker(demand_window_s=3.0, surplus_grace_s=0.5)
    max_sessions = 16
    await store.put_pool(process_pool(ready=1, max_sessions=max_sessions))
    await wait_until(lambda: counts_are(store, "proc", ready=1, warming=0), timeout=15)
    peak = {"warm": 0}
    violations: list[dict[str, int]] = []
    sampling = True

    async def sample() -> None:
        while sampling:
            k = store.pk("proc")
            async with store.redis.pipeline(transaction=True) as pipe:  # one consistent view
                pipe.zcard(k.ready).zcard(k.warming).zcard(k.expiry)
                ready, warming, allocated = await pipe.execute()
            c = {"ready": ready, "warming": warming, "allocated": allocated}
            if c["allocated"] > max_sessions or sum(c.values()) > max_sessions:
                violations.append(c)
            if c["allocated"] == 10:
                peak["warm"] = max(peak["warm"], c["ready"] + c["warming"])
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        hosts = await asyncio.gather(
            *(hostname(http, f"{router_url}/pools/proc/?identifier=burst-{i}") for i in range(10))
        )
        assert len(set(hosts)) == 10  # one sandbox each
        # Grows: ten allocations within about one refill time ask for ten warm; what
        # maxConcurrentSessions leaves (16 - 10 allocated) is kept warm, not just the floor.
        await wait_until(lambda: peak["warm"] >= max_sessions - 10, timeout=15)
        # Shrinks: once the window has passed, back to the floor; the surplus was retired.
        await wait_until(lambda: counts_are(store, "proc", ready=1, warming=0), timeout=20)
    finally:
        sampling = False
        await sampler
    assert violations == []
    recs = await store.sandboxes("proc")
    await wait_until(lambda: _held(rig, 11), timeout=10)
    assert sorted(r.state for r in recs.values()).count("allocated") == 10


async def _held(rig: Rig, n: int) -> bool:
    return len(await rig.hosts()) == n


@on("process")
async def test_unclaimed_surplus_is_retired_after_the_grace(
    rig: Rig, store: Store, router_url: str, http: aiohttp.ClientSession
) -> None:
    await rig.start_worker(surplus_grace_s=0.5)
    await store.put_pool(process_pool(ready=4, max_sessions=8))
    await wait_until(lambda: counts_are(store, "proc", ready=4, warming=0), timeout=15)
    before = set(await rig.live())
    # Scale down (the template is unchanged, so nothing is replaced): three are now surplus.
    await store.put_pool(process_pool(ready=1, max_sessions=8))
    await wait_until(lambda: counts_are(store, "proc", ready=1, warming=0), timeout=15)
    await wait_until(lambda: _held(rig, 1), timeout=10)
    after = set(await rig.live())
    assert after < before  # the one kept is one of the originals: retired, not replaced
    async with http.get(f"{router_url}/pools/proc/?identifier=still-served") as r:
        assert r.status == 200


@on("process")
async def test_a_pools_sandboxes_start_at_most_create_concurrency_at_once(
    rig: Rig, store: Store
) -> None:
    """From container start to ready (the startup probe included), one pool never has more
    sandboxes starting than create_concurrency: a burst shares the CPU among fewer at once."""
    await rig.start_worker(create_concurrency=2)
    starting_seen: list[int] = []
    sampling = True

    async def sample() -> None:
        while sampling:
            recs = await store.sandboxes("proc")
            starting_seen.append(
                sum(1 for r in recs.values() if r.state == "warming" and r.container)
            )
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        await store.put_pool(process_pool(ready=6, max_sessions=10))
        await wait_until(lambda: counts_are(store, "proc", ready=6, warming=0), timeout=30)
    finally:
        sampling = False
        await sampler
    assert max(starting_seen) == 2  # in parallel, and never more than the bound
