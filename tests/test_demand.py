"""The demand-following target: the allocation times the store reads (real Redis), and the
arithmetic (the most allocations within one refill time)."""

from __future__ import annotations

from router.store import Store
from sessionpool.testing import add_ready, make_pool
from workers.replenisher import peak_in_span


async def test_allocation_times_are_the_allocations_of_the_window(store: Store) -> None:
    pool = make_pool("wanted", ready=1, max_sessions=10)
    await store.put_pool(pool)
    await add_ready(store, pool, "c-1", "127.0.0.1:1")
    assert (await store.claim(pool, "first-one")).created  # allocated from the ready one
    # A request left waiting (no ready sandbox) is not an allocation.
    assert (await store.claim(pool, "waiter-1", wait_ms=30_000)).empty
    times = await store.allocation_times("wanted", 10_000, 100)
    assert len(times) == 1
    sec, usec = await store.redis.time()
    assert 0 <= int(sec) * 1000 + int(usec) // 1000 - times[0] < 10_000


def test_a_burst_counts_whole_within_one_refill_time() -> None:
    burst = [10_000 + 50 * i for i in range(20)]  # 20 allocations in one second
    assert peak_in_span(burst, 1_000) == 20
    assert peak_in_span(burst, 3_000) == 20
    assert peak_in_span(burst, 500) == 10


def test_a_steady_rate_gives_rate_times_refill_time() -> None:
    steady = [i * 500 for i in range(20)]  # 2 a second for 10 seconds
    assert peak_in_span(steady, 3_000) == 6
    assert peak_in_span(steady, 1_000) == 2


def test_the_busiest_span_wins_and_order_does_not_matter() -> None:
    times = [0, 100, 5_000, 5_100, 5_200, 5_300, 9_000]
    assert peak_in_span(list(reversed(times)), 1_000) == 4
    assert peak_in_span([], 1_000) == 0
    assert peak_in_span([42], 1) == 1
