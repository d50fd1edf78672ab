"""One consumer-group reader for every pool's event stream: one blocking read per role.

A worker used to hold two blocking `XREADGROUP`s per pool (one per role), i.e. two Redis
connections per pool. Here one read names every pool's stream (`XREADGROUP ... STREAMS s1 s2
... > > ...`) and hands each pool's entries to that pool's handler. When the set of streams
changes the read in flight is cancelled (redis-py drops that connection) and the next read
starts with the new set; entries Redis had delivered to the cancelled read are in this
consumer's pending list and are read back first (id `0`), so none is lost.

Entries are acknowledged by whoever handled them (`ack`), after the side effect. Entries a dead
consumer left pending are taken over with `XAUTOCLAIM` once idle for `claim_idle_ms`.

Redis Cluster cannot serve one read over keys of different slots; there the supervisor gives
each pool its own reader (the old cost), see `Supervisor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from redis.exceptions import ResponseError

from router import events
from workers import metrics
from workers.context import REDIS_ERRORS, Context, Event

log = logging.getLogger("sessionpool.worker")
BATCH = 100


class StreamReader:
    """Reads `group`'s entries of many pools' streams and passes them to `deliver(pool, batch)`."""

    def __init__(
        self,
        ctx: Context,
        group: str,
        deliver: Callable[[str, list[Event]], None],
        *,
        block_ms: int = 1000,
    ) -> None:
        self.ctx = ctx
        self.group = group
        self._deliver = deliver
        self._block_ms = block_ms
        self._pools: dict[str, str] = {}  # stream key -> pool
        self._unready: set[str] = set()  # streams whose group may not exist yet
        self._outstanding: dict[str, set[str]] = {}  # stream -> ids handed out, not acked
        self._changed = asyncio.Event()
        self._reading: asyncio.Task[Any] | None = None  # the read in flight
        self._in_read = False  # ... and it has started (so cancelling it is clean)
        # Next read: this consumer's pending entries (id 0). Also at start: a worker that
        # restarts under the same id takes back what it had read but not acknowledged.
        self._recover = True

    @property
    def pools(self) -> set[str]:
        return set(self._pools.values())

    def add(self, pool: str) -> None:
        stream = self.ctx.store.events_stream(pool)
        if stream not in self._pools:
            self._pools[stream] = pool
            self._unready.add(stream)
            self._outstanding.setdefault(stream, set())
            self._interrupt()

    def remove(self, pool: str) -> None:
        stream = self.ctx.store.events_stream(pool)
        if self._pools.pop(stream, None) is not None:
            self._unready.discard(stream)
            self._outstanding.pop(stream, None)
            self._interrupt()

    def _interrupt(self) -> None:
        self._changed.set()
        if self._in_read and self._reading is not None:
            self._reading.cancel()

    async def ack(self, pool: str, ids: Iterable[str]) -> None:
        """Acknowledge entries of `pool` once their side effects are done."""
        ids = list(ids)
        if ids:
            await self.ctx.store.ack_events(pool, self.group, ids)
        self.release(pool, ids)

    def release(self, pool: str, ids: Iterable[str]) -> None:
        """Forget entries handed out (acked, or left for XAUTOCLAIM to deliver again)."""
        held = self._outstanding.get(self.ctx.store.events_stream(pool))
        if held is not None:
            held.difference_update(ids)

    async def run(self) -> None:
        """Read until the worker stops."""
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        claim_every_s = max(ctx.settings.claim_idle_ms / 2000, 0.5)
        next_claim = loop.time() + claim_every_s
        while not ctx.stop.is_set():
            if not self._pools:
                self._changed.clear()
                await _first(ctx.stop.wait(), self._changed.wait())
                continue
            try:
                await self._create_groups()
                if loop.time() >= next_claim:
                    next_claim = loop.time() + claim_every_s
                    await self._autoclaim()
                await self._read_once()
            except REDIS_ERRORS as exc:
                metrics.REDIS_ERRORS.inc()
                log.warning("streams (%s): %s", self.group, exc)
                self._unready.update(self._pools)
                await ctx.pause(0.5)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # A stream was deleted (pool deleted, Redis restarted): create groups again.
                self._unready.update(self._pools)

    async def _create_groups(self) -> None:
        for stream in list(self._unready):
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
                await self.ctx.streams.xgroup_create(stream, self.group, id="0", mkstream=True)
            self._unready.discard(stream)

    async def _read_once(self) -> None:
        recover = self._recover
        self._recover = False
        self._reading = asyncio.create_task(self._read(recover))
        try:
            reply: Any = await self._reading
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the worker is stopping (the read was cancelled with it)
            # The stream set changed under the read: whatever it had received is pending.
            self._recover = True
            return
        finally:
            self._reading = None
        for raw_stream, entries in reply or []:
            self._hand_out(_text(raw_stream), entries)

    async def _read(self, recover: bool) -> Any:
        # The stream set is taken once this task runs: a later change cancels it.
        self._in_read = True
        try:
            if not self._pools:
                return []
            return await self.ctx.streams.xreadgroup(
                self.group,
                self.ctx.settings.worker_id,
                dict.fromkeys(self._pools, "0" if recover else ">"),
                count=BATCH,
                block=None if recover else self._block_ms,
            )
        finally:
            self._in_read = False

    async def _autoclaim(self) -> None:
        s = self.ctx.settings
        for stream in list(self._pools):
            reply: Any = await self.ctx.streams.xautoclaim(
                stream, self.group, s.worker_id, s.claim_idle_ms, "0-0", count=BATCH
            )
            self._hand_out(stream, reply[1])

    def _hand_out(self, stream: str, entries: list[Any]) -> None:
        pool = self._pools.get(stream)
        if pool is None:
            return  # removed meanwhile: left pending (another replica or XAUTOCLAIM takes it)
        held = self._outstanding.setdefault(stream, set())
        batch = [e for e in decode(entries) if e[0] not in held]
        if batch:
            held.update(mid for mid, _ in batch)
            self._deliver(pool, batch)


async def _first(*aws: Any) -> None:
    """Wait until the first of `aws` finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode(entries: list[Any]) -> list[Event]:
    """Stream entries as (id, event); a malformed or unknown entry becomes None (still acked)."""
    out: list[Event] = []
    for mid, fields in entries:
        if fields is None:  # deleted from the stream while pending
            continue
        mid_s = _text(mid)
        event = events.decode(fields.get(b"data") or fields.get("data"))
        if event is None:
            log.warning("dropping malformed stream entry %s", mid_s)
        out.append((mid_s, event))
    return out
