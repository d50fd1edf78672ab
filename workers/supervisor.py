"""Starts and stops each pool's work as pools appear and go.

Every role (replenisher, reaper) has one `StreamReader` for all pools and, per pool, a task
that handles that pool's entries in order plus the role's own per-pool loop (`Role.watch`).
Pools are found by event: `put_pool`/`delete_pool` publish on the invalidation channel, which
the supervisor follows; a resync every `reconcile_interval_s` covers a lost message or a Redis
restart. A deleted pool's work stops once its role has handled the `pool-deleted` entry (so the
teardowns queued before it are done first), or at a resync that finds the pool gone twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio.cluster import RedisCluster

from router.errors import SandboxRuntimeError
from router.events import PoolDeleted
from router.keys import SEP
from workers.context import REDIS_ERRORS, Context, Event
from workers.streams import StreamReader

log = logging.getLogger("sessionpool.worker")


class Role(Protocol):
    """What a worker role does for each pool."""

    group: str  # its consumer group on every pool's stream

    async def handle(self, pool: str, batch: list[Event]) -> None:
        """Act on a batch of the pool's entries (idempotent: an entry may come twice)."""
        ...

    async def watch(self, pool: str) -> None:
        """The role's own loop for one pool, cancelled when the pool's work stops."""
        ...


@dataclass
class _Work:
    """One role's work for one pool."""

    queue: asyncio.Queue[list[Event]] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Supervisor:
    """Owns the readers and every pool's tasks (in one TaskGroup) for the given roles."""

    def __init__(self, ctx: Context, roles: Sequence[Role]) -> None:
        self.ctx = ctx
        self.roles = list(roles)
        # Redis Cluster refuses one read over keys of several slots: one reader per pool there.
        self._per_pool_readers = isinstance(ctx.streams, RedisCluster)
        self._readers: dict[tuple[int, str], StreamReader] = {}
        self._work: dict[tuple[int, str], _Work] = {}
        self._reader_tasks: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._absent: set[str] = set()  # pools missing at the last resync
        self._tg: asyncio.TaskGroup | None = None

    def pools(self, role: int = 0) -> set[str]:
        """Pools whose work is running for `roles[role]`."""
        return {pool for r, pool in self._work if r == role}

    def reading(self, role: int = 0) -> set[str]:
        """Pools whose streams `roles[role]`'s readers follow."""
        out: set[str] = set()
        for (r, _), reader in self._readers.items():
            if r == role:
                out |= reader.pools
        return out

    async def run(self) -> None:
        """Run until the worker stops (then every pool's work is cancelled)."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            if not self._per_pool_readers:
                for i in range(len(self.roles)):
                    self._reader(i, "")
            discovery = [tg.create_task(self._follow()), tg.create_task(self._resync_loop())]
            await self.ctx.stop.wait()
            # Handlers between entries, readers blocked in a read, and the discovery loops
            # (a subscription or a resync in a slow Redis call): nothing to finish.
            for work in self._work.values():
                for task in work.tasks:
                    task.cancel()
            for task in [*self._reader_tasks.values(), *discovery]:
                task.cancel()

    # Readers ---------------------------------------------------------------------------------

    def _reader(self, role: int, pool: str) -> StreamReader:
        key = (role, pool if self._per_pool_readers else "")
        reader = self._readers.get(key)
        if reader is None:
            assert self._tg is not None
            reader = StreamReader(
                self.ctx, self.roles[role].group, lambda p, b: self._deliver(role, p, b)
            )
            self._readers[key] = reader
            self._reader_tasks[key] = self._tg.create_task(reader.run())
        return reader

    def _deliver(self, role: int, pool: str, batch: list[Event]) -> None:
        work = self._work.get((role, pool))
        if work is None:  # stopped meanwhile: left pending for XAUTOCLAIM
            reader = self._readers.get((role, pool if self._per_pool_readers else ""))
            if reader is not None:
                reader.release(pool, [mid for mid, _ in batch])
            return
        work.queue.put_nowait(batch)

    # Starting and stopping -------------------------------------------------------------------

    def start(self, pool: str) -> None:
        """Start every role's work for `pool` (no-op where it runs already)."""
        assert self._tg is not None
        self._absent.discard(pool)
        for i, role in enumerate(self.roles):
            if (i, pool) in self._work:
                continue
            work = _Work()
            self._work[(i, pool)] = work
            work.tasks = [
                self._tg.create_task(self._handle_loop(i, pool, work), name=f"{role.group}-{pool}"),
                self._tg.create_task(role.watch(pool), name=f"{role.group}-watch-{pool}"),
            ]
            self._reader(i, pool).add(pool)
            log.info("pool %s: %s work started", pool, role.group)

    def stop(self, role: int, pool: str) -> None:
        """Stop one role's work for `pool` and stop reading its stream."""
        work = self._work.pop((role, pool), None)
        if work is None:
            return
        key = (role, pool if self._per_pool_readers else "")
        reader = self._readers.get(key)
        if reader is not None:
            reader.remove(pool)
            if self._per_pool_readers:
                del self._readers[key]
                self._reader_tasks.pop(key).cancel()
        current = asyncio.current_task()
        for task in work.tasks:
            if task is not current:
                task.cancel()
        log.info("pool %s: %s work stopped", pool, self.roles[role].group)

    async def _handle_loop(self, role: int, pool: str, work: _Work) -> None:
        reader = self._reader(role, pool)
        handler = self.roles[role]
        while True:
            batch = await work.queue.get()
            ids = [mid for mid, _ in batch]
            try:
                await handler.handle(pool, batch)
            except (*REDIS_ERRORS, SandboxRuntimeError) as exc:
                # Left pending: XAUTOCLAIM hands it out again once it has idled.
                log.warning("pool %s: %s: %s", pool, handler.group, exc)
                reader.release(pool, ids)
                await self.ctx.pause(0.5)
                continue
            try:
                await reader.ack(pool, ids)
            except REDIS_ERRORS as exc:
                log.warning("pool %s: ack: %s", pool, exc)
                reader.release(pool, ids)
            if any(isinstance(e, PoolDeleted) for _, e in batch) and not await self._exists(pool):
                self.stop(role, pool)
                return

    async def _exists(self, pool: str) -> bool:
        try:
            return await self.ctx.store.pool_exists(pool)
        except REDIS_ERRORS:
            return True  # cannot tell: keep working, the resync decides later

    # Discovery -------------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Follow pool changes on the invalidation channel (an event, not a polling loop)."""
        ctx = self.ctx
        channel = ctx.store.keys.invalidation_channel
        while not ctx.stop.is_set():
            try:
                async for ch, data in ctx.store.subscribe(ctx.stop, channel):
                    if not ch:
                        await self.resync()  # subscribed: nothing is missed from here on
                        continue
                    pool, _, ident = data.partition(SEP)
                    if not ident and await self._exists(pool):
                        self.start(pool)
            except (*REDIS_ERRORS, OSError) as exc:
                log.warning("pool changes: %s", exc)
            await ctx.pause(0.5)

    async def _resync_loop(self) -> None:
        while await self.ctx.pause(self.ctx.settings.reconcile_interval_s):
            with contextlib.suppress(*REDIS_ERRORS):
                await self.resync()

    async def resync(self) -> None:
        """Start work for every defined pool; stop it for pools gone at two resyncs running."""
        names = set(await self.ctx.store.pool_names())
        for pool in names:
            self.start(pool)
        running = {pool for _, pool in self._work}
        gone = running - names
        for pool in gone & self._absent:
            for i in range(len(self.roles)):
                self.stop(i, pool)
        self._absent = gone
