"""The demand-following target: what the store reads as recent demand (real Redis), and its
arithmetic (the most new sessions within one refill time)."""

from __future__ import annotations

from router.store import Store
from sessionpool.testing import add_ready, make_pool
from workers.replenisher import peak_in_span


async def test_demand_counts_allocations_when_made_and_waiters_now(store: Store) -> None:
    pool = make_pool("wanted", ready=1, max_sessions=10)
    await store.put_pool(pool)
    await add_ready(store, pool, "c-1", "127.0.0.1:1")
    assert (await store.claim(pool, "first-one")).created  # allocated from the ready one
    for ident in ("waiter-1", "waiter-2"):
        assert (await store.claim(pool, ident, wait_ms=30_000)).empty  # no ready: waits
    demand = await store.demand("wanted", 10_000, 100)
    assert demand.waiting == 2
    assert len(demand.allocated_ms) == 1
    assert 0 <= demand.now_ms - demand.allocated_ms[0] < 10_000
    # A waiter whose wait is over no longer counts.
    assert (await store.claim(pool, "gave-up", wait_ms=1)).empty
    await store.redis.zadd(store.pk("wanted").demand, {"gave-up": demand.now_ms - 1})
    assert (await store.demand("wanted", 10_000, 100)).waiting == 2


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
