"""Section 3a: first request of a new identifier from a warm pool, end to end through the router.

Ready sandboxes are seeded exactly as the replenisher writes them, each with its own address (a
distinct port of one local aiohttp upstream), so every first request runs the real claim path:
CLAIM in Redis, a route cached, and a new upstream TCP connection, as with a fresh container.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import proxies
from bench.common import Proc
from bench.seed import pool_def, seed_ready
from router.keys import Keys
from router.store import Store, open_redis


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@dataclass
class Latencies:
    label: str
    ms: list[float]

    @property
    def p50(self) -> float:
        return percentile(self.ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.ms, 99)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "n": len(self.ms),
            "p50_ms": self.p50,
            "p99_ms": self.p99,
            "ms": self.ms,
        }


async def first_requests(base: str, idents: list[str], concurrency: int, label: str) -> Latencies:
    """GET each new identifier once; `concurrency` requests in flight at a time."""
    out: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{base}/healthz") as r:  # the client's connection is warm
            await r.read()

        async def one(ident: str) -> None:
            async with sem:
                t0 = time.perf_counter()
                async with http.get(f"{base}/small?identifier={ident}") as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{ident}: {r.status} {await r.text()}")
                out.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(one(i) for i in idents))
    return Latencies(label, out)


def run(
    redis_url: str, prefix: str, claims: int, concurrency: int, log_dir: Path
) -> list[Latencies]:
    started: list[Proc] = []
    try:
        up, ports = proxies.python_upstream(2 * claims, log_dir, log=log_dir / "alloc-upstream.log")
        started.append(up)

        async def seed() -> None:
            redis = open_redis(redis_url)
            try:
                store = Store(redis, Keys(prefix))
                pool = pool_def("alloc", ready=2 * claims, max_sessions=4 * claims)
                await store.put_pool(pool)
                await seed_ready(store, pool, [f"127.0.0.1:{p}" for p in ports])
            finally:
                await redis.aclose()

        asyncio.run(seed())
        router, url = proxies.router(redis_url, prefix, log=log_dir / "router-alloc.log")
        started.append(router)
        base = f"{url}/pools/alloc"

        async def measure() -> list[Latencies]:
            seq = await first_requests(
                base, [f"seq-{i}" for i in range(claims)], 1, "one at a time"
            )
            par = await first_requests(
                base, [f"par-{i}" for i in range(claims)], concurrency, f"{concurrency} at a time"
            )
            return [seq, par]

        return asyncio.run(measure())
    finally:
        for p in started:
            p.stop()
