"""One worker process: the replenisher and/or reaper over every pool, until SIGTERM.

`run` owns every loop in one TaskGroup: the supervisor (which starts and stops each pool's
work, see workers/supervisor.py) and the reaper's process-wide loops. SIGTERM sets `stop`;
after a short grace whatever still runs is cancelled, then resources are closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import weakref
from concurrent.futures import ThreadPoolExecutor

import aiohttp

from router.keys import Keys
from router.settings import Settings
from router.store import Store, open_redis
from workers.context import Context
from workers.reaper import Reaper
from workers.replenisher import Replenisher
from workers.runtime import Runtime
from workers.supervisor import Role, Supervisor

log = logging.getLogger("sessionpool.worker")
STOP_GRACE_S = 0.2
BLOCKING_THREADS = 16  # besides creates: destroys, lists, inspects
_SIZED_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def open_runtime(settings: Settings) -> Runtime:
    """The runtime the settings name; only that runtime's module imports its SDK."""
    if settings.runtime == "docker":
        from workers.docker import DockerRuntime

        return DockerRuntime.from_settings(settings)
    if settings.runtime == "kubernetes":
        from workers.kubernetes import KubernetesRuntime

        return KubernetesRuntime(settings)
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
    # Runtimes make blocking engine calls in threads (asyncio.to_thread): enough of them that
    # parallel creates (create_concurrency) and a burst of destroys do not queue for a thread.
    if loop not in _SIZED_LOOPS:  # once per loop (tests run several workers in one)
        _SIZED_LOOPS.add(loop)
        loop.set_default_executor(
            ThreadPoolExecutor(settings.create_concurrency + BLOCKING_THREADS, "sp-engine")
        )
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
    roles: list[Role] = [r for r in (replenisher, reaper) if r is not None]
    supervisor = Supervisor(ctx, roles)
    log.info("worker %s up: role=%s runtime=%s", settings.worker_id, settings.role, runtime.name)
    try:
        async with asyncio.TaskGroup() as tg:
            loops = [tg.create_task(supervisor.run())]
            if reaper is not None:
                loops += [
                    tg.create_task(reaper.run_reconciler()),
                    tg.create_task(reaper.run_liveness()),
                    tg.create_task(reaper.run_exits()),
                ]
            await stop.wait()
            # Grace: sandboxes being created finish (or are handed back), loops see `stop`
            # between steps; then whatever still runs is cancelled. A cancelled stream read is
            # safe: an unacknowledged entry stays pending for another replica to claim.
            if replenisher is not None:
                await replenisher.drain()
            await asyncio.wait(loops, timeout=STOP_GRACE_S)
            for task in loops:
                task.cancel()
    finally:
        stop.set()
        await runtime.close()
        await http.close()
        await redis.aclose()
        await streams.aclose()
        log.info("worker %s stopped", settings.worker_id)
