"""The replenisher: keeps each pool's ready sandboxes at `readySessionInstances`.

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
from collections.abc import Awaitable, Callable
from typing import TypeVar

from router.pools import Pool
from router.store import text
from workers import metrics
from workers.context import REDIS_ERRORS, Context, Event
from workers.probes import wait_started
from workers.runtime import RuntimeError_, SandboxSpec

log = logging.getLogger("sessionpool.replenisher")
T = TypeVar("T")
GROUP = "replenisher"
MAX_BACKOFF_S = 30.0


class Replenisher:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._sem = asyncio.Semaphore(ctx.settings.create_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._backoff: dict[str, tuple[float, float]] = {}  # pool -> (until, current delay)

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
        # Enough candidates for the target plus every waiting request (RESERVE takes what
        # it needs of them).
        wanted = min(pool.ready_instances + pool.max_sessions, 1000)
        ids = [uuid.uuid4().hex for _ in range(wanted)]
        reserved = await ctx.store.reserve(pool, ctx.settings.worker_id, ids)
        for sid in reserved:
            task = asyncio.create_task(self._create(pool, sid), name=f"create-{sid[:8]}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(reserved)

    async def _retire_stale(self, pool: Pool) -> None:
        """Ready sandboxes of an older template are replaced (allocated ones run on)."""
        store = self.ctx.store
        ready = await store.redis.zrange(store.pk(pool.name).ready, 0, -1)
        if not ready:
            return
        records = await store.sandboxes(pool.name)
        for raw in ready:
            sid = text(raw)
            rec = records.get(sid)
            if (
                rec is not None
                and rec.get("version") != pool.version
                and await store.retire(pool.name, sid, "replaced")
            ):
                await store.add_event(
                    pool.name,
                    {
                        "kind": "teardown",
                        "sandbox": sid,
                        "container": rec.get("container", ""),
                        "reason": "replaced",
                    },
                )

    async def _create(self, pool: Pool, sid: str) -> None:
        ctx = self.ctx
        store = ctx.store
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Wall-clock step times, logged once the sandbox is ready (bench/timeline.py reads them).
        steps = {"reserved": time.time()}
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
                handle = await ctx.runtime.create(spec)
            except RuntimeError_ as exc:
                log.error("pool %s: cannot create a sandbox: %s", pool.name, exc)
                metrics.CREATE_FAILURES.labels(pool.name).inc()
                self._fail(pool.name)
                await store.forget(pool.name, sid)
                return
        steps["started"] = time.time()
        try:
            if not await self._persist(
                lambda: store.set_container(pool.name, sid, handle.container)
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
            if state != 1:  # pool deleted or template changed while it started
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
        """Fill at once, then now and then as a safety net for a lost entry."""
        ctx = self.ctx
        while True:
            try:
                await self.fill(pool)
            except REDIS_ERRORS as exc:
                log.warning("pool %s: fill: %s", pool, exc)
            if not await ctx.pause(min(ctx.settings.reconcile_interval_s, 2.0)):
                return

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
