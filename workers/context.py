"""What every worker role shares: settings, Redis, the runtime, and stream consumption."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.settings import Settings
from router.store import Redis, Store
from workers.runtime import Runtime, RuntimeError_

log = logging.getLogger("sessionpool.worker")
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError)
Event = tuple[str, dict[str, Any]]


@dataclass
class Context:
    """Resources of one worker process."""

    settings: Settings
    store: Store
    streams: Redis  # its own client: blocking reads must not share the short socket timeout
    runtime: Runtime
    http: aiohttp.ClientSession
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def scope(self) -> str:
        return self.settings.key_prefix

    async def pause(self, seconds: float) -> bool:
        """Wait `seconds` or until stop; True when the worker should go on."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        return not self.stop.is_set()


async def consume(
    ctx: Context,
    stream: str,
    group: str,
    handle: Callable[[list[Event]], Awaitable[None]],
    *,
    block_ms: int = 1000,
) -> None:
    """Feed a consumer group's messages to `handle`, acking each batch after it succeeded.

    Messages a dead consumer left pending are taken over after `claim_idle_ms` (XAUTOCLAIM),
    so a worker killed mid-step loses no work: handlers must therefore be idempotent.
    """
    consumer = ctx.settings.worker_id
    created = False
    claim_every_s = max(ctx.settings.claim_idle_ms / 2000, 0.5)
    loop = asyncio.get_running_loop()
    next_claim = 0.0
    while not ctx.stop.is_set():
        try:
            if not created:
                with contextlib.suppress(ResponseError):  # BUSYGROUP
                    await ctx.streams.xgroup_create(stream, group, id="0", mkstream=True)
                created = True
            batch: list[Event] = []
            if loop.time() >= next_claim:
                next_claim = loop.time() + claim_every_s
                reply: Any = await ctx.streams.xautoclaim(
                    stream, group, consumer, ctx.settings.claim_idle_ms, "0-0", count=100
                )
                batch += _decode(reply[1])
            if not batch:
                reply = await ctx.streams.xreadgroup(
                    group, consumer, {stream: ">"}, count=100, block=block_ms
                )
                for _, entries in reply or []:
                    batch += _decode(entries)
            if batch:
                await handle(batch)
                await ctx.streams.xack(stream, group, *[mid for mid, _ in batch])
        except REDIS_ERRORS as exc:
            log.warning("stream %s: %s", stream, exc)
            created = False
            await ctx.pause(0.5)
        except RuntimeError_ as exc:
            # The runtime failed (engine busy or restarting): the batch stays pending and is
            # delivered again through XAUTOCLAIM once it has idled for claim_idle_ms.
            log.warning("stream %s: %s", stream, exc)
            await ctx.pause(0.5)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            created = False  # the stream was deleted (pool deleted or Redis restarted)


def _decode(entries: list[Any]) -> list[Event]:
    out: list[Event] = []
    for mid, fields in entries:
        if fields is None:  # deleted from the stream while pending
            continue
        raw = fields.get(b"data") or fields.get("data")
        mid_s = mid.decode() if isinstance(mid, bytes) else mid
        try:
            out.append((mid_s, orjson.loads(raw) if raw else {}))
        except orjson.JSONDecodeError:
            log.warning("dropping malformed stream entry %s", mid_s)
            out.append((mid_s, {}))
    return out
