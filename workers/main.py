"""One worker process: the replenisher and/or reaper loops over every pool, until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import aiohttp

from router.keys import Keys
from router.settings import Settings
from router.store import Store, open_redis
from workers.context import REDIS_ERRORS, Context
from workers.reaper import Reaper
from workers.replenisher import Replenisher
from workers.runtime import Runtime

log = logging.getLogger("sessionpool.worker")
DISCOVERY_INTERVAL_S = 1.0


def open_runtime(settings: Settings) -> Runtime:
    """The runtime the settings name; only the docker one imports the docker SDK."""
    if settings.runtime == "docker":
        from workers.docker import DockerRuntime

        return DockerRuntime.from_settings(settings)
    from workers.process import ProcessRuntime

    return ProcessRuntime()


async def run(
    settings: Settings, runtime: Runtime | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run the worker until `stop` is set (or SIGTERM/SIGINT when `stop` is not given)."""
    own_signals = stop is None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if own_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    runtime = runtime or open_runtime(settings)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        from workers.metrics import REGISTRY

        start_http_server(settings.metrics_port, registry=REGISTRY)
    redis = open_redis(settings.redis_url, timeout_s=settings.redis_timeout_s)
    # Blocking stream reads (1 s) need a socket timeout above the block time.
    streams = open_redis(settings.redis_url, timeout_s=10.0)
    http = aiohttp.ClientSession()
    ctx = Context(settings, Store(redis, Keys(settings.key_prefix)), streams, runtime, http, stop)
    replenisher = Replenisher(ctx) if settings.role in ("all", "replenisher") else None
    reaper = Reaper(ctx) if settings.role in ("all", "reaper") else None
    log.info("worker %s up: role=%s runtime=%s", settings.worker_id, settings.role, runtime.name)
    tasks: list[asyncio.Task[None]] = []
    try:
        if replenisher is not None:
            tasks.append(asyncio.create_task(replenisher.run_periodic()))
        if reaper is not None:
            tasks += [
                asyncio.create_task(reaper.run_sweeper()),
                asyncio.create_task(reaper.run_reconciler()),
                asyncio.create_task(reaper.run_liveness()),
                asyncio.create_task(reaper.run_exits()),
            ]
        seen: set[str] = set()
        while not stop.is_set():
            try:
                names = await ctx.store.pool_names()
            except REDIS_ERRORS as exc:
                log.warning("pool discovery: %s", exc)
                names = []
            for name in names:
                if name in seen:
                    continue
                seen.add(name)
                if replenisher is not None:
                    tasks.append(asyncio.create_task(replenisher.run_pool(name)))
                    with contextlib.suppress(*REDIS_ERRORS):
                        await replenisher.fill(name)
                if reaper is not None:
                    tasks.append(asyncio.create_task(reaper.run_pool(name)))
            await ctx.pause(DISCOVERY_INTERVAL_S)
    finally:
        stop.set()
        if replenisher is not None:
            await replenisher.drain()
        # Loops between steps see `stop` at once; a blocked stream read is cancelled, which
        # is safe: an unacknowledged message stays pending for another replica to claim.
        if tasks:
            await asyncio.wait(tasks, timeout=0.2)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runtime.close()
        await http.close()
        await redis.aclose()
        await streams.aclose()
        log.info("worker %s stopped", settings.worker_id)
