"""Sessions at scale in one Redis: memory per session, expiry cost, the router's claim path.

    python -m bench.sessions [--sessions 1000000] [--out bench/results]

Seeds N allocated sessions straight into a private redis-server (records byte-for-byte in the
shapes CLAIM and the replenisher write: the session, its sandbox record, its expiresAt), then:

- memory: `used_memory` growth / N, and each key's share (`MEMORY USAGE`);
- expiry: EXPIRE (the reaper's script, 500 per call) when nothing is due, then with 100, 1 000
  and 10 000 sessions due: its cost must follow what expires, not N;
- the reaper's idle cost per pool: one EXPIRE plus the next-expiry read (`next_expiry_ms`),
  which its per-pool loop does at most once a second when nothing is due;
- the router's claim of an existing identifier (what a request whose route is not cached
  costs), at N sessions and at 1 000: it must not change with N.

Not part of CI (a million sessions take ~1 GiB and a minute); `--sessions 2000` is a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from bench.common import RESULTS, RedisServer
from bench.seed import pool_def
from router.keys import Keys
from router.store import Store, open_redis

BATCH = 2000
POOL_MAX = 100_000  # maxConcurrentSessions' upper bound
KiB = 1024


async def seed(store: Store, pool: str, version: str, n: int, start: int = 0) -> None:
    """n allocated sessions with their sandbox records, expiring in an hour."""
    k = store.pk(pool)
    sec, _ = await store.redis.time()
    now = int(sec) * 1000
    for lo in range(start, start + n, BATCH):
        sessions: dict[str, bytes] = {}
        sandboxes: dict[str, bytes] = {}
        expiry: dict[str, int] = {}
        for i in range(lo, min(lo + BATCH, start + n)):
            ident = f"user-{i:09d}"
            sid = uuid.uuid4().hex
            container = uuid.uuid4().hex + uuid.uuid4().hex
            addr = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:8080"
            sessions[ident] = orjson.dumps(
                {
                    "sandbox": sid,
                    "container": container,
                    "addr": addr,
                    "createdAt": now,
                    "cooldownMs": 300_000,
                    "owner": "",
                    "lifecycle": "Timed",
                }
            )
            sandboxes[sid] = orjson.dumps(
                {
                    "id": sid,
                    "state": "allocated",
                    "version": version,
                    "createdAt": now,
                    "worker": "bench-worker-1",
                    "container": container,
                    "addr": addr,
                    "readyAt": now,
                    "identifier": ident,
                    "allocatedAt": now,
                }
            )
            expiry[ident] = now + 3_600_000
        async with store.redis.pipeline(transaction=False) as pipe:
            pipe.hset(k.sessions, mapping=sessions)  # type: ignore[arg-type]
            pipe.hset(k.sandboxes, mapping=sandboxes)  # type: ignore[arg-type]
            pipe.zadd(k.expiry, expiry)
            await pipe.execute()


async def _used(store: Store) -> int:
    return int((await store.redis.info("memory"))["used_memory"])


async def _expire_all(store: Store, pool: str) -> tuple[int, float, int]:
    """EXPIRE until nothing is due: (ended, seconds, calls)."""
    ended, calls = 0, 0
    t0 = time.perf_counter()
    while True:
        calls += 1
        got = await store.expire(pool, 500)
        ended += len(got)
        if len(got) < 500:
            return ended, time.perf_counter() - t0, calls


async def _claim_us(store: Store, pool: Any, idents: list[str]) -> float:
    """Median µs of CLAIM for identifiers that already have a session."""
    samples = []
    for ident in idents:
        t0 = time.perf_counter()
        res = await store.claim(pool, ident)
        samples.append((time.perf_counter() - t0) * 1e6)
        if res.session is None or res.created:
            raise RuntimeError(f"{ident}: expected an existing session, got {res}")
    return statistics.median(samples)


async def measure(redis_url: str, n: int) -> dict[str, Any]:
    redis = open_redis(redis_url)
    store = Store(redis, Keys(f"ss{uuid.uuid4().hex[:6]}"))
    out: dict[str, Any] = {"sessions": n}
    try:
        # A pool holds at most 100 000 sessions: N spread over ceil(N / 100 000) pools.
        per_pool = min(n, POOL_MAX)
        names = [f"big-{j}" for j in range(-(-n // POOL_MAX))]
        small = pool_def("small", ready=0, max_sessions=POOL_MAX)
        pools = [pool_def(name, ready=0, max_sessions=POOL_MAX) for name in names]
        for p in (small, *pools):
            await store.put_pool(p)
        await seed(store, "small", small.version, 1000)
        await redis.memory_purge()
        before = await _used(store)
        t0 = time.perf_counter()
        for j, p in enumerate(pools):
            await seed(store, p.name, p.version, min(per_pool, n - j * POOL_MAX), j * POOL_MAX)
        out["seed_s"] = time.perf_counter() - t0
        out["pools"] = len(pools)
        await redis.memory_purge()
        out["bytes_per_session"] = (await _used(store) - before) / n
        big = pools[0]
        k = store.pk(big.name)
        out["breakdown_bytes_per_session"] = {
            name: int(await redis.memory_usage(key, samples=0) or 0) / per_pool
            for name, key in (
                ("sessions hash", k.sessions),
                ("sandboxes hash", k.sandboxes),
                ("expiry zset", k.expiry),
            )
        }
        # The router's path for an identifier with a session (route not cached): CLAIM.
        step = max(1, per_pool // 200)
        picks = [f"user-{i:09d}" for i in range(0, per_pool, step)][:200]
        out["claim_existing_us"] = {
            "at_1000": await _claim_us(store, small, [f"user-{i:09d}" for i in range(200)]),
            "at_pool_size": await _claim_us(store, big, picks),
        }
        out["pool_size"] = per_pool
        # The reaper when nothing is due: one EXPIRE and one next-expiry read per pool.
        t0 = time.perf_counter()
        for _ in range(200):
            await store.expire(big.name, 500)
            await store.next_expiry_ms(big.name)
        out["idle_pool_check_us"] = (time.perf_counter() - t0) / 200 * 1e6
        sweeps = []
        done = 0
        for due in (100, 1000, 10_000):
            due = min(due, per_pool - done)
            members = [f"user-{i:09d}" for i in range(done, done + due)]
            done += due
            for lo in range(0, due, 1000):
                await redis.zadd(k.expiry, dict.fromkeys(members[lo : lo + 1000], 1), xx=True)
            ended, secs, calls = await _expire_all(store, big.name)
            sweeps.append(
                {
                    "due": due,
                    "ended": ended,
                    "ms": secs * 1000,
                    "calls": calls,
                    "us_per_session": secs / ended * 1e6 if ended else None,
                }
            )
        out["sweeps"] = sweeps
        out["left"] = int(await redis.zcard(k.expiry))
    finally:
        await redis.aclose()
    return out


def report(d: dict[str, Any]) -> str:
    n = d["sessions"]
    per = d["bytes_per_session"]
    claim = d["claim_existing_us"]
    lines = [
        f"Sessions at scale: {n:,} sessions in one Redis, {d['pools']} pools of up to "
        f"{d['pool_size']:,} (seeded in {d['seed_s']:.0f} s)",
        "",
        "| what | figure | target | |",
        "|---|---:|---|---|",
        f"| Redis memory per session | {per:.0f} B | ≤ 1 KiB | "
        f"{'met' if per <= KiB else 'not met'} |",
    ]
    for name, b in d["breakdown_bytes_per_session"].items():
        lines.append(f"| … {name} | {b:.0f} B | | |")
    lines.append(
        f"| reaper, nothing due: EXPIRE + next expiry, per pool | "
        f"{d['idle_pool_check_us']:.0f} µs | at most once a second per pool | |"
    )
    for s in d["sweeps"]:
        if not s["ended"]:
            continue
        lines.append(
            f"| EXPIRE with {s['due']:,} due | {s['ms']:.1f} ms ({s['us_per_session']:.1f} µs "
            f"per session, {s['calls']} calls) | proportional to what expires | |"
        )
    small, big = claim["at_1000"], claim["at_pool_size"]
    lines.append(
        f"| CLAIM of an existing identifier, median | {big:.0f} µs in a pool of "
        f"{d['pool_size']:,} ({n:,} in Redis) vs {small:.0f} µs in a pool of 1,000 "
        f"({big / small:.2f}x) | unchanged | |"
    )
    return "\n".join(lines)


def run(n: int, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sp-sessions-") as tmp:
        redis = RedisServer(Path(tmp)).start()
        try:
            data = asyncio.run(measure(redis.url, n))
        finally:
            redis.stop()
    data["load"] = Path("/proc/loadavg").read_text().split()[:3]
    text = report(data) + f"\n\nload average: {' '.join(data['load'])}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sessions.json").write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    (out / "sessions.md").write_text(text)
    print(text)
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--sessions", type=int, default=1_000_000)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    run(args.sessions, args.out)


if __name__ == "__main__":
    main()
