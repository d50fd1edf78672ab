"""Pools and ready sandboxes written exactly as the replenisher writes them (RESERVE,
SET_CONTAINER, MARK_READY), so the router's claim path is the real one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from router.pools import Pool
from router.sandboxes import MarkReady
from router.store import Store
from sessionpool.testing import echo_pool

IMAGE = "sessionpool/echo:dev"


def pool_def(
    name: str, *, ready: int, max_sessions: int, cooldown_s: int = 300, probe: bool = True
) -> Pool:
    probes = None if probe else []  # None: the echo image's /health startup probe
    return echo_pool(
        name, ready=ready, max_sessions=max_sessions, cooldown_s=cooldown_s, probes=probes
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
            if (
                await store.mark_ready(pool.name, sid, f"fake-{sid[:12]}", addr)
                is not MarkReady.READY
            ):
                raise RuntimeError("MARK_READY refused")

    await asyncio.gather(*(one(s, a) for s, a in zip(sids, addrs, strict=True)))
    return sids
