"""A docker worker reconciles only the sandboxes made on its own engine (and says so)."""

from __future__ import annotations

import logging
import uuid

import aiohttp
import pytest

from router.sandboxes import MarkReady
from router.settings import Settings
from router.store import Store, open_redis
from tests.helpers import make_pool
from workers.context import Context
from workers.docker import DockerRuntime
from workers.reaper import Reaper

pytestmark = [pytest.mark.docker, pytest.mark.timeout(60)]


async def test_records_of_another_engine_are_left_alone(
    store: Store, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool("guard", ready=3)
    await store.put_pool(pool)
    runtime = DockerRuntime()
    mine = await runtime.engine_id()
    assert mine.startswith("docker:") and len(mine) > len("docker:")
    assert await runtime.engine_id() == mine  # stable

    async def session_on(engine: str, user: str) -> str:
        """A claimed session whose container (not on this engine) the record names."""
        sid = uuid.uuid4().hex
        assert await store.reserve(pool, "test", [sid]) == [sid]
        assert await store.set_container("guard", sid, f"elsewhere-{sid[:8]}", engine)
        assert (
            await store.mark_ready("guard", sid, f"elsewhere-{sid[:8]}", "10.9.9.9:80")
            is MarkReady.READY
        )
        assert (await store.claim(pool, user)).created
        return sid

    other = await session_on("docker:another-engine", "theirs")
    ours = await session_on(mine, "ours")
    streams = open_redis(settings.redis_url, timeout_s=10)
    try:
        async with aiohttp.ClientSession() as http:
            reaper = Reaper(Context(settings, store, streams, runtime, http))
            with caplog.at_level(logging.WARNING, logger="sessionpool.reaper"):
                fixed = await reaper.reconcile()
                await reaper.reconcile()
    finally:
        await runtime.close()
        await streams.aclose()
    # Ours has no container on our engine: lost, its session ended. Theirs is untouched.
    assert fixed["lost"] == 1
    assert await store.get_session("guard", "ours") is None
    assert await store.get_session("guard", "theirs") is not None
    assert (await store.sandboxes("guard"))[other].state == "allocated"
    rec = (await store.sandboxes("guard")).get(ours)
    assert rec is None or rec.state != "allocated"
    refusals = [r for r in caplog.records if "not reconciling" in r.getMessage()]
    assert len(refusals) == 1  # said once, not at every pass
    assert "docker:another-engine" in refusals[0].getMessage()
