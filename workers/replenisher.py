"""The replenisher: keeps each pool's ready sandboxes at target.

The target follows demand: `readySessionInstances` is the floor, and while sessions are being
allocated it keeps enough ready to absorb the recent allocation rate for one refill time: the
most allocations the last `demand_window_s` saw within any one refill time (a steady rate r
gives r * refill time; a burst gives its size, so the same burst again is served warm).
Requests still waiting are not counted: RESERVE already starts one sandbox for each, and a
spare started beside it would only share its CPU. RESERVE caps the target by
`maxConcurrentSessions`. At most `create_concurrency` sandboxes of one pool start at once,
reserved first served first, so the first of a burst are ready sooner. When demand falls the
target falls back, and ready sandboxes above it that no request claimed are retired after
`surplus_grace_s`.

Level-triggered: every wake-up (an `allocated`/`pool-empty`/`pool-changed` event on the pool's
stream, or the periodic safety net) recomputes what is missing. RESERVE writes `warming`
records atomically before any container exists, so replicas never create beyond the target,
and a worker that dies mid-creation leaves records the reaper's reconciliation resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from router.errors import SandboxRuntimeError
from router.events import Teardown
from router.pools import Pool
from router.sandboxes import MarkReady
from workers import metrics
from workers.context import REDIS_ERRORS, Context, Event
from workers.probes import wait_started
from workers.runtime import SandboxSpec

log = logging.getLogger("sessionpool.replenisher")
T = TypeVar("T")
GROUP = "replenisher"
MAX_BACKOFF_S = 30.0
SURPLUS_BATCH = 100  # most surplus sandboxes retired per fill
STREAM_LOOK_MAX = 2000  # most stream entries read to count recent allocations
TARGET_TTL_S = 1.0  # the demand-following target is recomputed at most this often
# The refill time used is at least this: a pool in demand keeps at least one second's worth of
# its recent allocation rate ready (and this is the figure before any refill was measured).
MIN_REFILL_S = 1.0
REFILL_SMOOTHING = 0.3  # weight of the newest refill time in the running average


class Replenisher:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._sem = asyncio.Semaphore(ctx.settings.create_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._backoff: dict[str, tuple[float, float]] = {}  # pool -> (until, current delay)
        self._targets: dict[str, tuple[float, int]] = {}  # pool -> (valid until, target)
        self._refill_s: dict[str, float] = {}  # pool -> smoothed reserve-to-ready time
        self._boot: dict[str, asyncio.Semaphore] = {}  # pool -> its sandboxes starting

    async def fill(self, pool_name: str) -> int:
        """Start creating what the pool lacks; returns how many sandboxes were reserved."""
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        until, _ = self._backoff.get(pool_name, (0.0, 0.0))
        if loop.time() < until:
            return 0
        pool = await ctx.store.get_pool(pool_name)
        if pool is None:
            return 0
        await self._retire_stale(pool)
        target = await self.target(pool)
        # Enough candidates for the target plus every waiting request (RESERVE takes what
        # it needs of them, and never goes past maxConcurrentSessions for either).
        wanted = min(target + pool.max_sessions, 1000)
        ids = [uuid.uuid4().hex for _ in range(wanted)]
        reserved = await ctx.store.reserve(pool, ctx.settings.worker_id, ids, target)
        for sid in reserved:
            task = asyncio.create_task(self._create(pool, sid), name=f"create-{sid[:8]}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not reserved:
            retired = await ctx.store.retire_surplus(
                pool.name, target, int(ctx.settings.surplus_grace_s * 1000), SURPLUS_BATCH
            )
            if retired:
                log.info("pool %s: %d surplus sandboxes retired", pool.name, len(retired))
        return len(reserved)

    async def target(self, pool: Pool) -> int:
        """How many ready sandboxes to keep: readySessionInstances at least, and enough to
        absorb the recent allocation rate for one refill time (RESERVE caps the part above
        readySessionInstances at what maxConcurrentSessions leaves room for)."""
        loop = asyncio.get_running_loop()
        cached = self._targets.get(pool.name)
        if cached is not None and cached[0] > loop.time():
            return max(cached[1], pool.ready_instances)
        window_s = self.ctx.settings.demand_window_s
        cap = min(pool.max_sessions * 4, STREAM_LOOK_MAX)
        times = await self.ctx.store.allocation_times(pool.name, int(window_s * 1000), cap)
        refill_s = max(self._refill_s.get(pool.name, 0.0), MIN_REFILL_S)
        following = peak_in_span(times, int(refill_s * 1000))
        self._targets[pool.name] = (loop.time() + TARGET_TTL_S, following)
        return max(following, pool.ready_instances)

    async def _retire_stale(self, pool: Pool) -> None:
        """Ready sandboxes of an older template are replaced (allocated ones run on)."""
        store = self.ctx.store
        ready = await store.ready_ids(pool.name)
        if not ready:
            return
        records = await store.sandboxes(pool.name)
        for sid in ready:
            rec = records.get(sid)
            if (
                rec is not None
                and rec.version != pool.version
                and await store.retire(pool.name, sid, "replaced")
            ):
                await store.add_event(
                    pool.name, Teardown(sandbox=sid, container=rec.container, reason="replaced")
                )

    def _booting(self, pool: str) -> asyncio.Semaphore:
        """At most `create_concurrency` sandboxes of one pool start at once, from reservation
        to ready: a burst's sandboxes share the CPU with fewer others, so the first of them
        (reserved first: the waiting requests') are ready sooner, and a pool whose image starts
        slowly holds back only its own."""
        sem = self._boot.get(pool)
        if sem is None:
            sem = self._boot[pool] = asyncio.Semaphore(self.ctx.settings.create_concurrency)
        return sem

    async def _create(self, pool: Pool, sid: str) -> None:
        # Wall-clock step times, logged once the sandbox is ready (bench/timeline.py reads them).
        steps = {"reserved": time.time()}
        async with self._booting(pool.name):
            await self._start(pool, sid, steps)

    async def _start(self, pool: Pool, sid: str, steps: dict[str, float]) -> None:
        ctx = self.ctx
        store = ctx.store
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with self._sem:
            steps["slot"] = time.time()
            if ctx.stop.is_set():
                await store.forget(pool.name, sid)
                return
            spec = SandboxSpec(
                scope=ctx.scope,
                pool=pool,
                sandbox_id=sid,
                env={e.name: pool.secrets[e.secret_ref] for e in pool.env if e.secret_ref},
            )
            try:
                engine = await ctx.runtime.engine_id()
                handle = await ctx.runtime.create(spec)
            except SandboxRuntimeError as exc:
                log.error("pool %s: cannot create a sandbox: %s", pool.name, exc)
                metrics.CREATE_FAILURES.labels(pool.name).inc()
                self._fail(pool.name)
                await store.forget(pool.name, sid)
                return
        steps["started"] = time.time()
        try:
            if not await self._persist(
                lambda: store.set_container(pool.name, sid, handle.container, engine)
            ):
                await ctx.runtime.destroy(handle.container)  # reservation withdrawn meanwhile
                return
            if not await wait_started(ctx.http, handle.addr, pool):
                log.error("pool %s: sandbox %s failed its startup probe", pool.name, sid)
                metrics.CREATE_FAILURES.labels(pool.name).inc()
                self._fail(pool.name)
                await store.retire(pool.name, sid, "unhealthy")
                await ctx.runtime.destroy(handle.container)
                await store.forget(pool.name, sid)
                return
            steps["probed"] = time.time()
            state = await self._persist(
                lambda: store.mark_ready(pool.name, sid, handle.container, handle.addr)
            )
            if state is not MarkReady.READY:  # pool deleted or template changed meanwhile
                await ctx.runtime.destroy(handle.container)
                await store.forget(pool.name, sid)
                return
            steps["ready"] = time.time()
            log.info(
                "pool %s: sandbox %s ready in %.0f ms",
                pool.name,
                sid,
                (steps["ready"] - steps["reserved"]) * 1000,
                extra={"pool": pool.name, "sandbox": sid, "steps": steps},
            )
            took = steps["ready"] - steps["reserved"]
            prev = self._refill_s.get(pool.name, took)
            self._refill_s[pool.name] = prev + REFILL_SMOOTHING * (took - prev)
            self._backoff.pop(pool.name, None)
            metrics.CREATED.labels(pool.name).inc()
            metrics.START_SECONDS.labels(pool.name).observe(loop.time() - started)
        except REDIS_ERRORS as exc:
            # Redis is away: the container stays labelled, reconciliation settles it later.
            log.warning("pool %s: sandbox %s left to reconciliation: %s", pool.name, sid, exc)
        except asyncio.CancelledError:
            # Shutting down mid-start: hand the step back cleanly instead of leaking it.
            await asyncio.shield(self._abandon(pool.name, sid, handle.container))
            raise

    async def _abandon(self, pool: str, sid: str, container: str) -> None:
        try:
            if await self.ctx.store.retire(pool, sid, "cancelled"):
                await self.ctx.runtime.destroy(container)
                await self.ctx.store.forget(pool, sid)
        except REDIS_ERRORS as exc:
            log.warning("pool %s: sandbox %s left to reconciliation: %s", pool, sid, exc)

    async def _persist(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run one state change, retrying through a Redis outage (a failover, a restart) for
        up to `warm_timeout_s`: a sandbox that started fine should not be lost to a blip."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ctx.settings.warm_timeout_s
        while True:
            try:
                return await call()
            except REDIS_ERRORS:
                if loop.time() > deadline or self.ctx.stop.is_set():
                    raise
                await asyncio.sleep(0.5)

    def _fail(self, pool: str) -> None:
        loop = asyncio.get_running_loop()
        _, delay = self._backoff.get(pool, (0.0, 0.5))
        delay = min(delay * 2, MAX_BACKOFF_S)
        self._backoff[pool] = (loop.time() + delay, delay)

    # Role (see workers/supervisor.py) -------------------------------------------------------

    group = GROUP

    async def handle(self, pool: str, batch: list[Event]) -> None:
        """Any entry (allocated, pool-empty, pool-changed, ...) is a reason to look again."""
        await self.fill(pool)

    async def watch(self, pool: str) -> None:
        """Fill at once, then now and then as a safety net for a lost entry. When the pool's
        work stops (the pool was deleted), what was kept about it goes too."""
        ctx = self.ctx
        try:
            while True:
                try:
                    await self.fill(pool)
                except REDIS_ERRORS as exc:
                    log.warning("pool %s: fill: %s", pool, exc)
                if not await ctx.pause(min(ctx.settings.reconcile_interval_s, 2.0)):
                    return
        finally:
            for kept in (self._backoff, self._targets, self._refill_s, self._boot):
                kept.pop(pool, None)

    async def drain(self) -> None:
        """Let sandboxes being created finish (or be cancelled) before exit."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def peak_in_span(times_ms: Sequence[int], span_ms: int) -> int:
    """The most of `times_ms` that fall within any one `span_ms`-long interval."""
    ordered = sorted(times_ms)
    best = lo = 0
    for hi, at in enumerate(ordered):
        while at - ordered[lo] >= span_ms:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
