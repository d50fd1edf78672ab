"""Workers on a real Docker engine: what only the docker runtime has. The scenarios every
runtime shares (warm pools, teardown, exits, liveness, crashes, replicas) are in
tests/test_workers.py."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from router.sandboxes import MarkReady
from router.settings import Settings
from router.store import Store
from sessionpool.testing import ECHO_IMAGE, echo_pool, wait_until
from workers.runtime import LABEL_SCOPE

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]


async def test_reconcile_leaves_starting_and_paused_sandboxes_alone(
    echo_engine: Any, store: Store, settings: Settings
) -> None:
    """Regression (found by tests/chaos.py): a container being started ("created") or paused
    (a stall) was taken for exited, so replicas tore down each other's new sandboxes."""
    from router.store import open_redis
    from workers.context import Context
    from workers.docker import DockerRuntime
    from workers.reaper import Reaper
    from workers.runtime import SandboxSpec

    engine = echo_engine
    pool = echo_pool("dock", ready=2)
    await store.put_pool(pool)
    runtime = DockerRuntime()
    streams = open_redis(settings.redis_url, timeout_s=10)
    async with aiohttp.ClientSession() as http:
        ctx = Context(settings.replace(orphan_grace_s=0.0), store, streams, runtime, http)
        reaper = Reaper(ctx)
        try:
            # A session whose container is paused.
            sid = "pausedsandbox0001"
            assert await store.reserve(pool, "test", [sid]) == [sid]
            handle = await runtime.create(SandboxSpec(store.keys.prefix, pool, sid))
            assert (
                await store.mark_ready("dock", sid, handle.container, handle.addr)
                is MarkReady.READY
            )
            assert (await store.claim(pool, "paused-user")).created
            engine.api.pause(handle.container)
            # A sandbox whose container exists but has not been started yet.
            starting = "startingsandbox01"
            assert await store.reserve(pool, "test", [starting]) == [starting]
            labels = SandboxSpec(store.keys.prefix, pool, starting).labels
            created = engine.api.create_container(ECHO_IMAGE, labels=labels)
            fixed = await reaper.reconcile()
            assert fixed == {"orphans": 0, "lost": 0, "stale_warming": 0, "stuck": 0}
            assert await store.get_session("dock", "paused-user") is not None
            recs = await store.sandboxes("dock")
            assert recs[sid].state == "allocated"
            assert recs[starting].state == "warming"
            assert engine.api.inspect_container(created["Id"])["State"]["Status"] == "created"
            engine.api.unpause(handle.container)
            # The same pass does end a session whose container really exited.
            engine.api.kill(handle.container)
            await wait_until(
                lambda: (
                    engine.api.inspect_container(handle.container)["State"]["Status"] == "exited"
                ),
                timeout=10,
            )
            fixed = await reaper.reconcile()
            assert fixed["lost"] == 1
            assert await store.get_session("dock", "paused-user") is None
        finally:
            scope = {"label": f"{LABEL_SCOPE}={store.keys.prefix}"}
            for c in engine.api.containers(all=True, filters=scope):
                engine.api.remove_container(c["Id"], force=True)
            await runtime.close()
            await streams.aclose()
