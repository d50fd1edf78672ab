"""Prometheus metrics of the router: pool gauges read from Redis, latencies, errors.

Pool gauges are read from Redis at scrape time, so every router reports the same numbers.
Names follow ACA's metrics: ready = `PoolReadyPodCount`, allocated = `PoolExecutingPodCount`,
warming = `PoolPendingPodCount`.
"""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.store import Store

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class RouterMetrics:
    """One registry per router process (tests run several in one interpreter)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        pool_gauge = functools.partial(Gauge, labelnames=["pool"], registry=r)
        self.ready = pool_gauge("sessionpool_pool_ready", "Ready sandboxes (ACA PoolReadyPodCount)")
        self.allocated = pool_gauge(
            "sessionpool_pool_allocated", "Allocated sessions (ACA PoolExecutingPodCount)"
        )
        self.warming = pool_gauge(
            "sessionpool_pool_warming", "Sandboxes starting (ACA PoolPendingPodCount)"
        )
        latency = functools.partial(
            Histogram, labelnames=["pool"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.allocation = latency(
            "sessionpool_allocation_seconds", "Time to claim a sandbox for a new identifier"
        )
        self.proxy = latency(
            "sessionpool_proxy_seconds", "Time from request to the session's response headers"
        )
        counter = functools.partial(Counter, registry=r)
        self.upstream_errors = counter(
            "sessionpool_upstream_errors", "Requests the session could not answer", ["pool", "kind"]
        )
        self.store_errors = counter(
            "sessionpool_store_errors", "Requests answered 503 because Redis was unreachable"
        )
        self.malformed_requests = counter(
            "sessionpool_malformed_requests",
            "Requests refused by the HTTP parser (400, logged at most once per interval)",
        )
        self.header_timeouts = counter(
            "sessionpool_header_timeouts",
            "Connections closed for not sending a request's headers in time",
        )
        self.refused_connections = counter(
            "sessionpool_refused_connections",
            "Connections answered 503 because the process was at its connection cap",
        )
        self.open_connections = Gauge(
            "sessionpool_open_connections", "Client connections open in this process", registry=r
        )
        self.responses = counter("sessionpool_responses", "Responses by status class", ["code"])
        self._by_class: dict[int, Any] = {}  # labels() per response is not free

    def response(self, status: int) -> None:
        """Count a response by its status class (1xx … 5xx)."""
        cls = status // 100
        child = self._by_class.get(cls)
        if child is None:
            child = self._by_class[cls] = self.responses.labels(f"{cls}xx")
        child.inc()

    async def render(self, store: Store) -> bytes:
        """Refresh the pool gauges from Redis, then render the exposition text."""
        names = await store.pool_names()
        for gauge in (self.ready, self.allocated, self.warming):
            gauge.clear()
        for name in names:
            counts = await store.counts(name)
            self.ready.labels(name).set(counts["ready"])
            self.allocated.labels(name).set(counts["allocated"])
            self.warming.labels(name).set(counts["warming"])
        return generate_latest(self.registry)
