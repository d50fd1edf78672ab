"""Pools and ready sandboxes written exactly as the replenisher writes them (RESERVE,
SET_CONTAINER, MARK_READY), so the router's claim path is the real one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from router.pools import Pool, parse_pool
from router.store import Store

IMAGE = "sessionpool/echo:dev"


def pool_def(
    name: str, *, ready: int, max_sessions: int, cooldown_s: int = 300, probe: bool = True
) -> Pool:
    container: dict[str, Any] = {
        "name": "main",
        "image": IMAGE,
        "resources": {"cpu": 0.5, "memory": "256Mi"},
    }
    if probe:
        container["probes"] = [{"type": "Startup", "httpGet": {"path": "/health", "port": 8080}}]
    return parse_pool(
        name,
        {
            "properties": {
                "scaleConfiguration": {
                    "maxConcurrentSessions": max_sessions,
                    "readySessionInstances": ready,
                },
                "dynamicPoolConfiguration": {
                    "lifecycleConfiguration": {
                        "lifecycleType": "Timed",
                        "cooldownPeriodInSeconds": cooldown_s,
                    }
                },
                "customContainerTemplate": {
                    "containers": [container],
                    "ingress": {"targetPort": 8080},
                },
            }
        },
    )


async def seed_ready(
    store: Store, pool: Pool, addrs: Sequence[str], concurrency: int = 64
) -> list[str]:
    """One ready sandbox per address (fake container ids); returns the sandbox ids."""
    sids = [uuid.uuid4().hex for _ in addrs]
    sem = asyncio.Semaphore(concurrency)

    async def one(sid: str, addr: str) -> None:
        async with sem:
            got = await store.reserve(pool, "bench", [sid])
            if got != [sid]:
                raise RuntimeError("RESERVE refused: the pool's readySessionInstances is too low")
            await store.set_container(pool.name, sid, f"fake-{sid[:12]}")
            if await store.mark_ready(pool.name, sid, f"fake-{sid[:12]}", addr) != 1:
                raise RuntimeError("MARK_READY refused")

    await asyncio.gather(*(one(s, a) for s, a in zip(sids, addrs, strict=True)))
    return sids
