"""Prometheus metrics of a worker process (served on a port of its own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

TEARDOWNS = Counter(
    "sessionpool_teardowns",
    "Sandboxes destroyed, by reason (idle, stopped, exited, maxAlive, unhealthy, orphan, …)",
    ["pool", "reason"],
    registry=REGISTRY,
)
CREATED = Counter(
    "sessionpool_sandboxes_created", "Sandboxes that became ready", ["pool"], registry=REGISTRY
)
CREATE_FAILURES = Counter(
    "sessionpool_sandbox_failures",
    "Sandboxes that could not be created or failed their startup probe",
    ["pool"],
    registry=REGISTRY,
)
START_SECONDS = Histogram(
    "sessionpool_sandbox_start_seconds",
    "From reservation to ready (create + startup probe)",
    ["pool"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
REDIS_ERRORS = Counter(
    "sessionpool_worker_redis_errors", "Redis errors seen by worker loops", registry=REGISTRY
)
