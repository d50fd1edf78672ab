"""The worker supervisor over real Redis: one stream reader per role for every pool, per-pool
work started as pools appear and stopped when they are deleted."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest

from router import events
from router.events import PoolDeleted, Teardown
from router.settings import Settings
from router.store import Store, open_redis
from tests.helpers import make_pool, wait_until
from workers.context import Context, Event
from workers.supervisor import Supervisor


def tagged(tag: str) -> Teardown:
    """An entry a test can recognise (the Recorder role only records it)."""
    return Teardown(sandbox=tag, reason="tag")


class Recorder:
    """A role that records what it is handed, per pool."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.seen: dict[str, list[events.Event | None]] = defaultdict(list)
        self.watching: set[str] = set()

    async def handle(self, pool: str, batch: list[Event]) -> None:
        self.seen[pool] += [e for _, e in batch]

    async def watch(self, pool: str) -> None:
        self.watching.add(pool)
        try:
            await asyncio.Event().wait()
        finally:
            self.watching.discard(pool)

    def tags(self, pool: str) -> list[str]:
        return [e.sandbox for e in self.seen[pool] if isinstance(e, Teardown) and e.reason == "tag"]


@pytest.fixture
async def running(
    settings: Settings, store: Store
) -> AsyncIterator[tuple[Supervisor, Recorder, Recorder]]:
    streams = open_redis(settings.redis_url, timeout_s=10.0)
    stop = asyncio.Event()
    ctx = Context(settings, store, streams, None, None, stop)  # type: ignore[arg-type]
    first, second = Recorder("replenisher"), Recorder("reaper")
    sup = Supervisor(ctx, [first, second])
    task = asyncio.create_task(sup.run())
    yield sup, first, second
    stop.set()
    await asyncio.wait_for(task, 10)
    await streams.aclose()


async def blocked_readers(store: Store) -> int:
    info = await store.redis.info("clients")
    return int(info["blocked_clients"])


async def test_one_reader_per_role_hands_each_pool_its_own_entries(
    store: Store, running: tuple[Supervisor, Recorder, Recorder]
) -> None:
    sup, first, second = running
    names = [f"pool-{i}" for i in range(8)]
    for name in names:
        await store.put_pool(make_pool(name, ready=0))
    await wait_until(lambda: sup.reading(0) == set(names) and sup.reading(1) == set(names))
    for round_ in range(3):
        for name in names:
            await store.add_event(name, tagged(f"{name}/{round_}"))
    want = {name: [f"{name}/{r}" for r in range(3)] for name in names}
    await wait_until(lambda: all(first.tags(n) == want[n] for n in names))
    await wait_until(lambda: all(second.tags(n) == want[n] for n in names))
    assert first.watching == second.watching == set(names)
    # Eight pools, two roles: two blocking reads in all, not two per pool.
    await wait_until(lambda: _equals(blocked_readers(store), 2))


async def _equals(value: Any, want: int) -> bool:
    return bool(await value == want)


async def test_a_pool_defined_later_is_picked_up_by_event(
    store: Store, running: tuple[Supervisor, Recorder, Recorder]
) -> None:
    sup, first, _ = running
    await store.put_pool(make_pool("early", ready=0))
    await wait_until(lambda: "early" in sup.reading(0))
    await store.put_pool(make_pool("late", ready=0))
    # Well before the periodic resync (reconcile_interval_s is 10 s here).
    await wait_until(lambda: "late" in sup.reading(0), timeout=3)
    await store.add_event("late", tagged("hello"))
    await wait_until(lambda: first.tags("late") == ["hello"], timeout=3)


async def test_deleting_a_pool_stops_its_work(
    store: Store, running: tuple[Supervisor, Recorder, Recorder]
) -> None:
    sup, first, second = running
    await store.put_pool(make_pool("doomed", ready=0))
    await store.put_pool(make_pool("kept", ready=0))
    await wait_until(lambda: sup.pools(0) == {"doomed", "kept"} == sup.pools(1))
    await store.delete_pool("doomed")
    await wait_until(lambda: sup.pools(0) == {"kept"} == sup.pools(1))
    assert "doomed" not in sup.reading(0) | sup.reading(1)
    await wait_until(lambda: "doomed" not in first.watching | second.watching)
    # Both roles handled the pool-deleted entry before stopping.
    for role in (first, second):
        assert isinstance(role.seen["doomed"][-1], PoolDeleted)
    # An entry written to the deleted pool's stream now goes nowhere; the live pool's does.
    await store.add_event("doomed", tagged("late"))
    await store.add_event("kept", tagged("after"))
    await wait_until(lambda: first.tags("kept") == ["after"] == second.tags("kept"))
    assert first.tags("doomed") == [] == second.tags("doomed")
    # Defined again: work starts again.
    await store.put_pool(make_pool("doomed", ready=0))
    await wait_until(lambda: sup.pools(0) == {"doomed", "kept"} == sup.pools(1))


async def test_entries_read_but_never_handled_are_taken_back(
    settings: Settings, store: Store
) -> None:
    """What a read received but nobody handled (a cancelled read, a worker killed after its
    read) is pending for this consumer: the reader takes it back instead of losing it."""
    await store.put_pool(make_pool("pending", ready=0))
    stream = store.events_stream("pending")
    await store.redis.xgroup_create(stream, "replenisher", id="0", mkstream=True)
    await store.add_event("pending", tagged("read-but-lost"))
    # This consumer reads the entry and "dies" before handling it.
    got = await store.redis.xreadgroup("replenisher", settings.worker_id, {stream: ">"}, count=10)
    assert got and len(got[0][1]) >= 1
    streams = open_redis(settings.redis_url, timeout_s=10.0)
    stop = asyncio.Event()
    ctx = Context(settings, store, streams, None, None, stop)  # type: ignore[arg-type]
    role = Recorder("replenisher")
    task = asyncio.create_task(Supervisor(ctx, [role]).run())
    try:
        # Long before XAUTOCLAIM would hand it out (claim_idle_ms is 30 s).
        await wait_until(lambda: role.tags("pending") == ["read-but-lost"], timeout=5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await streams.aclose()


async def test_stop_does_not_wait_for_a_resync_stuck_in_redis(
    settings: Settings, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker told to stop while its discovery waits on Redis (a slow or hung call) stops:
    there is nothing in a resync to finish."""
    entered = asyncio.Event()

    async def stuck() -> list[str]:
        entered.set()
        await asyncio.Event().wait()
        return []

    monkeypatch.setattr(store, "pool_names", stuck)
    streams = open_redis(settings.redis_url, timeout_s=10.0)
    stop = asyncio.Event()
    ctx = Context(settings, store, streams, None, None, stop)  # type: ignore[arg-type]
    task = asyncio.create_task(Supervisor(ctx, [Recorder("replenisher")]).run())
    try:
        await asyncio.wait_for(entered.wait(), 10)  # the first resync is in its Redis call
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        await streams.aclose()
