"""The demand-following target's arithmetic: the most allocations within one refill time."""

from __future__ import annotations

from workers.replenisher import peak_in_span


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
