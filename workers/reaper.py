"""The reaper: ends expired, exited and unhealthy sessions, destroys their sandboxes, and
reconciles records with what the runtime actually runs.

Session ends are decided atomically in Redis (EXPIRE/STOP scripts), which queue a `teardown`
event; the container is destroyed by whichever reaper consumes it, and the record is dropped
only after that, so a reaper killed in between leaves work another one picks up (XAUTOCLAIM)
or reconciliation finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from router.errors import SandboxRuntimeError
from router.events import Allocated, PoolChanged, Teardown
from router.sandboxes import SandboxState
from workers import metrics
from workers.context import REDIS_ERRORS, Context, Event
from workers.probes import probe_once

log = logging.getLogger("sessionpool.reaper")
GROUP = "reaper"
EXPIRE_BATCH = 500
MAX_SLEEP_S = 1.0


class Reaper:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._liveness_failures: dict[str, int] = {}
        self._liveness_due: dict[str, float] = {}
        self._wakes: dict[str, asyncio.Event] = {}  # pool -> wakes its expiry loop
        self._foreign: set[str] = set()  # records of another engine, already reported

    # Expiry ----------------------------------------------------------------------------------

    async def sweep(self, pool: str) -> float | None:
        """End the pool's sessions whose expiresAt has passed; returns seconds until the next
        one is due (by Redis' clock), 0 when more are due now, None when there is no session."""
        store = self.ctx.store
        ended = await store.expire(pool, EXPIRE_BATCH)
        if len(ended) >= EXPIRE_BATCH:
            return 0.0
        due_ms = await store.next_expiry_ms(pool)
        return None if due_ms is None else due_ms / 1000

    async def watch(self, pool: str) -> None:
        """Sleep until the pool's next expiresAt and end what is due then.

        Activity only moves expiresAt later, so the only way an earlier one appears is a new
        session or a changed pool: their stream entries wake this loop early (`handle`). The
        sleep is capped at MAX_SLEEP_S should such an entry be late.
        """
        ctx = self.ctx
        wake = self._wakes.setdefault(pool, asyncio.Event())
        try:
            while not ctx.stop.is_set():
                wake.clear()
                try:
                    due_s = await self.sweep(pool)
                except REDIS_ERRORS as exc:
                    log.warning("pool %s: expiry: %s", pool, exc)
                    due_s = 0.5
                delay = MAX_SLEEP_S if due_s is None else min(due_s + 0.001, MAX_SLEEP_S)
                if delay > 0:
                    with contextlib.suppress(TimeoutError):  # not wait_for: router.waiting
                        async with asyncio.timeout(delay):
                            await _either(ctx.stop, wake)
        finally:
            if self._wakes.get(pool) is wake:
                del self._wakes[pool]

    # Teardown ---------------------------------------------------------------------------------

    async def teardown(self, pool: str, event: Teardown) -> None:
        """Destroy one sandbox and drop its record (idempotent)."""
        handled = time.time()
        sid, container = event.sandbox, event.container
        if not container and sid:
            rec = await self.ctx.store.sandbox(pool, sid)
            container = rec.container if rec is not None else ""
        if not container and sid:
            for obs in await self.ctx.runtime.list(self.ctx.scope):
                if obs.sandbox_id == sid:
                    container = obs.container
        if container:
            await self.ctx.runtime.destroy(container)
        destroyed = time.time()
        if sid:
            await self.ctx.store.forget(pool, sid)
        reason = event.reason or "unknown"
        metrics.TEARDOWNS.labels(pool, reason).inc()
        log.info(
            "pool %s: sandbox %s destroyed (%s)",
            pool,
            sid,
            reason,
            # Wall-clock times (bench/cold.py splits the teardown lag with them).
            extra={"pool": pool, "sandbox": sid, "teardown": [handled, destroyed]},
        )

    # Role (see workers/supervisor.py) -------------------------------------------------------

    group = GROUP

    async def handle(self, pool: str, batch: list[Event]) -> None:
        """Destroy what the batch says must go (in parallel); a new session or a changed pool
        may bring the next expiry forward, so the pool's expiry loop looks again."""
        todo = [e for _, e in batch if isinstance(e, Teardown)]
        if any(isinstance(e, Allocated | PoolChanged) for _, e in batch):
            wake = self._wakes.get(pool)
            if wake is not None:
                wake.set()
        await asyncio.gather(*(self.teardown(pool, e) for e in todo))

    # Exits and liveness ----------------------------------------------------------------------

    async def on_exit(self, pool: str, sid: str, reason: str = "exited") -> None:
        """A sandbox's container stopped: end its session, or take it out of the ready set."""
        store = self.ctx.store
        rec = await store.sandbox(pool, sid)
        if rec is None or rec.state == SandboxState.STOPPING:
            return  # ours: already being torn down
        if rec.state == SandboxState.ALLOCATED and await store.stop(
            pool, rec.identifier, reason, sandbox=sid
        ):
            return
        if await store.retire(pool, sid, reason):
            await store.add_event(
                pool, Teardown(sandbox=sid, container=rec.container, reason=reason)
            )

    async def run_exits(self) -> None:
        async for ex in self.ctx.runtime.exits(self.ctx.scope):
            try:
                await self.on_exit(ex.pool, ex.sandbox_id)
            except REDIS_ERRORS as exc:
                log.warning("exit of %s not recorded (reconciliation will): %s", ex.sandbox_id, exc)

    async def check_liveness(self) -> None:
        """Probe allocated sandboxes of pools with a Liveness probe; end failing sessions."""
        store = self.ctx.store
        now = time.monotonic()
        for name in await store.pool_names():
            pool = await store.get_pool(name)
            probe = pool.probe("Liveness") if pool is not None else None
            if pool is None or probe is None:
                continue
            for sid, rec in (await store.sandboxes(name)).items():
                if rec.state != SandboxState.ALLOCATED or not rec.addr:
                    continue
                if self._liveness_due.get(sid, 0.0) > now:
                    continue
                self._liveness_due[sid] = now + probe.period_s
                if await probe_once(self.ctx.http, rec.addr, pool, probe):
                    self._liveness_failures.pop(sid, None)
                    continue
                failures = self._liveness_failures.get(sid, 0) + 1
                self._liveness_failures[sid] = failures
                if failures >= probe.failure_threshold:
                    log.warning("pool %s: sandbox %s failed liveness %d times", name, sid, failures)
                    self._liveness_failures.pop(sid, None)
                    await self.on_exit(name, sid, "unhealthy")

    async def run_liveness(self) -> None:
        while await self.ctx.pause(0.5):
            try:
                await self.check_liveness()
            except REDIS_ERRORS as exc:
                log.warning("liveness: %s", exc)

    # Reconciliation --------------------------------------------------------------------------

    async def reconcile(self) -> dict[str, int]:
        """Make records and containers agree, both ways. Returns counts of what it fixed."""
        ctx = self.ctx
        store, runtime = ctx.store, ctx.runtime
        fixed = {"orphans": 0, "lost": 0, "stale_warming": 0, "stuck": 0}
        before = await runtime.list(ctx.scope)
        names = set(await store.pool_names()) | {o.pool for o in before}
        records = {name: await store.sandboxes(name) for name in names}
        now_s = time.time()
        now_ms = now_s * 1000
        # Containers with no record (past a grace for records being written), or that exited.
        for obs in before:
            rec = records.get(obs.pool, {}).get(obs.sandbox_id)
            if rec is None:
                if now_s - obs.created_s > ctx.settings.orphan_grace_s:
                    await runtime.destroy(obs.container)
                    metrics.TEARDOWNS.labels(obs.pool, "orphan").inc()
                    await store.log_event(
                        obs.pool, {"event": "orphan-removed", "sandbox": obs.sandbox_id}
                    )
                    fixed["orphans"] += 1
            elif not obs.running and rec.live:
                await self.on_exit(obs.pool, obs.sandbox_id)
                fixed["lost"] += 1
        # Records with no container. Listed after reading the records, so any container a
        # ready/allocated record names existed before this list was taken.
        after = {o.sandbox_id for o in await runtime.list(ctx.scope)}
        mine = await runtime.engine_id()
        for name, recs in records.items():
            for sid, rec in recs.items():
                if (rec.engine or mine) != mine:
                    self._refuse_foreign(name, sid, rec.engine, mine)
                    continue
                state = rec.state
                age_ms = now_ms - (rec.created_ms or now_ms)
                if sid in after:
                    # Stuck: a teardown whose message was lost, or a worker that died while
                    # its sandbox was starting.
                    since = rec.stopping_ms or rec.created_ms or now_ms
                    if (state == SandboxState.STOPPING and now_ms - since > 30_000) or (
                        state == SandboxState.WARMING
                        and age_ms > ctx.settings.warm_timeout_s * 1000
                    ):
                        await store.retire(name, sid, "stuck")
                        await self.teardown(name, Teardown(sandbox=sid, reason="stuck"))
                        fixed["stuck"] += 1
                    continue
                if rec.live:
                    await self.on_exit(name, sid)  # queues the teardown that drops the record
                    fixed["lost"] += 1
                elif state == SandboxState.STOPPING:
                    await store.forget(name, sid)
                elif state == SandboxState.WARMING and age_ms > ctx.settings.warm_timeout_s * 1000:
                    await store.forget(name, sid)
                    fixed["stale_warming"] += 1
        if any(fixed.values()):
            log.info("reconciled: %s", fixed)
        return fixed

    def _refuse_foreign(self, pool: str, sid: str, engine: str, mine: str) -> None:
        """A record made on another engine is not ours to judge: its container is not in our
        list because it runs elsewhere, not because it is gone. Several engines sharing one
        Redis are not a supported topology (yet): say so, once per sandbox."""
        if sid in self._foreign:
            return
        if len(self._foreign) > 10_000:
            self._foreign.clear()
        self._foreign.add(sid)
        log.warning(
            "pool %s: sandbox %s was made on engine %s, this worker runs on %s: not "
            "reconciling it (workers of one deployment must share one engine)",
            pool,
            sid,
            engine,
            mine,
        )

    async def run_reconciler(self) -> None:
        ctx = self.ctx
        while not ctx.stop.is_set():
            try:
                await self.reconcile()
            except (*REDIS_ERRORS, SandboxRuntimeError) as exc:
                log.warning("reconcile: %s", exc)
            if not await ctx.pause(ctx.settings.reconcile_interval_s):
                return


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    """Return when either event is set."""
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
