"""The reaper: ends expired, exited and unhealthy sessions, destroys their sandboxes, and
reconciles records with what the runtime actually runs.

Session ends are decided atomically in Redis (EXPIRE/STOP scripts), which queue a `teardown`
event; the container is destroyed by whichever reaper consumes it, and the record is dropped
only after that, so a reaper killed in between leaves work another one picks up (XAUTOCLAIM)
or reconciliation finishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from workers import metrics
from workers.context import REDIS_ERRORS, Context, Event, consume
from workers.probes import probe_once
from workers.runtime import RuntimeError_

log = logging.getLogger("sessionpool.reaper")
GROUP = "reaper"
SWEEP_INTERVAL_S = 0.2


class Reaper:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._liveness_failures: dict[str, int] = {}
        self._liveness_due: dict[str, float] = {}

    # Expiry ----------------------------------------------------------------------------------

    async def sweep(self) -> int:
        """End every session whose expiresAt has passed; returns how many ended."""
        ended = 0
        for name in await self.ctx.store.pool_names():
            ended += len(await self.ctx.store.expire(name))
        return ended

    async def run_sweeper(self) -> None:
        while await self.ctx.pause(SWEEP_INTERVAL_S):
            try:
                await self.sweep()
            except REDIS_ERRORS as exc:
                log.warning("sweep: %s", exc)

    # Teardown ---------------------------------------------------------------------------------

    async def teardown(self, pool: str, event: dict[str, Any]) -> None:
        """Destroy one sandbox and drop its record (idempotent)."""
        sid = event.get("sandbox") or ""
        container = event.get("container") or ""
        if not container and sid:
            rec = (await self.ctx.store.sandboxes(pool)).get(sid, {})
            container = rec.get("container", "")
        if not container and sid:
            for obs in await self.ctx.runtime.list(self.ctx.scope):
                if obs.sandbox_id == sid:
                    container = obs.container
        if container:
            await self.ctx.runtime.destroy(container)
        if sid:
            await self.ctx.store.forget(pool, sid)
        reason = str(event.get("reason") or "unknown")
        metrics.TEARDOWNS.labels(pool, reason).inc()
        log.info("pool %s: sandbox %s destroyed (%s)", pool, sid, reason)

    async def run_pool(self, pool: str) -> None:
        stream = self.ctx.store.pk(pool).events

        async def handle(batch: list[Event]) -> None:
            todo = [e for _, e in batch if e.get("kind") == "teardown"]
            await asyncio.gather(*(self.teardown(pool, e) for e in todo))

        await consume(self.ctx, stream, GROUP, handle)

    # Exits and liveness ----------------------------------------------------------------------

    async def on_exit(self, pool: str, sid: str, reason: str = "exited") -> None:
        """A sandbox's container stopped: end its session, or take it out of the ready set."""
        store = self.ctx.store
        rec = (await store.sandboxes(pool)).get(sid)
        if rec is None or rec.get("state") == "stopping":
            return  # ours: already being torn down
        if rec.get("state") == "allocated" and await store.stop(
            pool, rec.get("identifier", ""), reason, sandbox=sid
        ):
            return
        if await store.retire(pool, sid, reason):
            await store.add_event(
                pool,
                {
                    "kind": "teardown",
                    "sandbox": sid,
                    "container": rec.get("container", ""),
                    "reason": reason,
                },
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
                if rec.get("state") != "allocated" or not rec.get("addr"):
                    continue
                if self._liveness_due.get(sid, 0.0) > now:
                    continue
                self._liveness_due[sid] = now + probe.period_s
                if await probe_once(self.ctx.http, rec["addr"], pool, probe):
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
            elif not obs.running and rec.get("state") in ("ready", "allocated"):
                await self.on_exit(obs.pool, obs.sandbox_id)
                fixed["lost"] += 1
        # Records with no container. Listed after reading the records, so any container a
        # ready/allocated record names existed before this list was taken.
        after = {o.sandbox_id for o in await runtime.list(ctx.scope)}
        for name, recs in records.items():
            for sid, rec in recs.items():
                state = rec.get("state")
                age_ms = now_ms - float(rec.get("createdAt", now_ms))
                if sid in after:
                    # Stuck: a teardown whose message was lost, or a worker that died while
                    # its sandbox was starting.
                    since = float(rec.get("stoppingAt", rec.get("createdAt", now_ms)))
                    if (state == "stopping" and now_ms - since > 30_000) or (
                        state == "warming" and age_ms > ctx.settings.warm_timeout_s * 1000
                    ):
                        await store.retire(name, sid, "stuck")
                        await self.teardown(name, {"sandbox": sid, "reason": "stuck"})
                        fixed["stuck"] += 1
                    continue
                if state in ("ready", "allocated"):
                    await self.on_exit(name, sid)  # queues the teardown that drops the record
                    fixed["lost"] += 1
                elif state == "stopping":
                    await store.forget(name, sid)
                elif state == "warming" and age_ms > ctx.settings.warm_timeout_s * 1000:
                    await store.forget(name, sid)
                    fixed["stale_warming"] += 1
        if any(fixed.values()):
            log.info("reconciled: %s", fixed)
        return fixed

    async def run_reconciler(self) -> None:
        ctx = self.ctx
        while not ctx.stop.is_set():
            try:
                await self.reconcile()
            except (*REDIS_ERRORS, RuntimeError_) as exc:
                log.warning("reconcile: %s", exc)
            if not await ctx.pause(ctx.settings.reconcile_interval_s):
                return
