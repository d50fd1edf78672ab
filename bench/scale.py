"""Section 5: sessions tracked in one Redis (memory per session, reaper sweep cost) and idle
WebSockets held by one router process (RSS per connection)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import proxies
from bench.common import Proc, status_kib
from bench.proxying import seed_router_pool
from bench.seed import pool_def, seed_ready
from router.keys import Keys
from router.server import raise_open_files
from router.store import Store, open_redis


@dataclass
class Sweep:
    expired: int
    seconds: float
    calls: int

    @property
    def us_per_session(self) -> float:
        return self.seconds / self.expired * 1e6 if self.expired else float("nan")


@dataclass
class RedisScale:
    sessions: int
    bytes_per_session: float
    seed_s: float
    breakdown: dict[str, int]
    sweeps: list[Sweep]

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "sweeps": [{**asdict(s), "us_per_session": s.us_per_session} for s in self.sweeps],
        }


async def _used_memory(store: Store) -> int:
    info = await store.redis.info("memory")
    return int(info["used_memory"])


async def _sweep(store: Store, pool: str) -> Sweep:
    """Run EXPIRE (500 per call, as the reaper does) until nothing more is due."""
    t0 = time.perf_counter()
    expired, calls = 0, 0
    while True:
        calls += 1
        ended = await store.expire(pool)
        expired += len(ended)
        if len(ended) < 500:
            break
    return Sweep(expired, time.perf_counter() - t0, calls)


async def redis_scale(
    redis_url: str, prefix: str, n: int, expire_counts: list[int], concurrency: int = 256
) -> RedisScale:
    redis = open_redis(redis_url, max_connections=concurrency + 8)
    try:
        store = Store(redis, Keys(prefix))
        # A pool allows at most 10 000 ready sandboxes and 100 000 sessions: seed and claim
        # in batches, as a replenisher keeping up with demand would.
        batch = min(n, 10_000)
        pool = pool_def("scale", ready=batch, max_sessions=n, cooldown_s=3600)
        await store.put_pool(pool)
        await redis.memory_purge()
        before = await _used_memory(store)
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(concurrency)

        async def claim(i: int) -> None:
            async with sem:
                res = await store.claim(pool, f"session-{i:08d}")
                if res.session is None:
                    raise RuntimeError(f"claim {i}: {res}")

        for start in range(0, n, batch):
            count = min(batch, n - start)
            addrs = [
                f"10.{i // 62500 % 250}.{i // 250 % 250}.{i % 250}:8080"
                for i in range(start, start + count)
            ]
            await seed_ready(store, pool, addrs, concurrency)
            await asyncio.gather(*(claim(i) for i in range(start, start + count)))
        seed_s = time.perf_counter() - t0
        after = await _used_memory(store)
        k = store.pk("scale")
        breakdown = {}
        for name, key in (
            ("sessions hash", k.sessions),
            ("expiry zset", k.expiry),
            ("sandboxes hash", k.sandboxes),
            ("events stream", k.events),
            ("log stream", k.log),
        ):
            breakdown[name] = int(await redis.memory_usage(key, samples=0) or 0)
        sweeps = [await _sweep(store, "scale")]  # nothing due: the cost of an idle sweep
        done = 0
        for count in expire_counts:
            members = [f"session-{i:08d}" for i in range(done, done + count)]
            done += count
            for start in range(0, count, 1000):
                await redis.zadd(k.expiry, dict.fromkeys(members[start : start + 1000], 1), xx=True)
            sweeps.append(await _sweep(store, "scale"))
        return RedisScale(n, (after - before) / n, seed_s, breakdown, sweeps)
    finally:
        await redis.aclose()


@dataclass
class WebSocketScale:
    wanted: int
    held: int
    rss_before_kib: int
    rss_after_kib: int
    fd_limit: int
    note: str

    @property
    def kib_per_ws(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.held if self.held else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kib_per_ws": self.kib_per_ws}


def websockets(redis_url: str, prefix: str, wanted: int, log_dir: Path) -> WebSocketScale:
    """Open `wanted` idle WebSockets through one router process to a local echo upstream.

    Each proxied WebSocket holds two descriptors in the router (caller and sandbox side): this
    process raises its RLIMIT_NOFILE as the router does (`raise_open_files`: the hard limit
    too where it may, as root), so the upstream and router it starts inherit enough; where it
    may not, the count is capped below half the limit.
    """
    need = 2 * wanted + 1024
    limit, _ = raise_open_files(need)
    n = min(wanted, (limit - 200) // 2)
    note = (
        ""
        if n == wanted
        else (
            f"capped at {n}: RLIMIT_NOFILE is at most {limit} here (raising the hard limit to "
            f"{need} was refused) and each proxied WebSocket holds 2 descriptors in the router"
        )
    )
    started: list[Proc] = []
    try:
        up, ports = proxies.python_upstream(1, log_dir, log=log_dir / "ws-upstream.log")
        started.append(up)
        asyncio.run(seed_router_pool(redis_url, prefix, {"sockets": f"127.0.0.1:{ports[0]}"}))
        router, url = proxies.router(
            redis_url,
            prefix,
            log=log_dir / "router-ws.log",
            env={"SESSIONPOOL_MAX_OPEN_FILES": str(need)},
        )
        started.append(router)
        ws_url = f"{url}/pools/bench/ws?identifier=sockets"

        async def hold() -> WebSocketScale:
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn) as http:
                async with http.ws_connect(ws_url) as ws:  # warm: route, code paths
                    await ws.send_str("hello")
                    await ws.receive(timeout=10)
                await asyncio.sleep(0.5)
                before = status_kib(router.pid, "VmRSS")
                socks: list[aiohttp.ClientWebSocketResponse] = []
                sem = asyncio.Semaphore(100)

                async def open_one() -> None:
                    async with sem:
                        socks.append(
                            await http.ws_connect(
                                ws_url, timeout=aiohttp.ClientWSTimeout(ws_close=2)
                            )
                        )

                await asyncio.gather(*(open_one() for _ in range(n)))
                for ws in socks[:: max(1, n // 50)]:  # a sample still answers
                    await ws.send_str("ping")
                    msg = await ws.receive(timeout=10)
                    if msg.data != "ping":
                        raise RuntimeError(f"websocket echo: {msg!r}")
                await asyncio.sleep(1.0)
                after = status_kib(router.pid, "VmRSS")
                held = sum(1 for ws in socks if not ws.closed)
                await asyncio.gather(*(ws.close() for ws in socks), return_exceptions=True)
            return WebSocketScale(wanted, held, before, after, limit, note)

        return asyncio.run(hold())
    finally:
        for p in started:
            p.stop()
