"""Replenisher and reaper over real Redis, with the process runtime (real child processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.pools import Pool
from router.settings import Settings
from router.store import Store
from sessionpool.testing import counts_are, make_pool, serving_router
from tests.helpers import wait_until
from workers.main import run
from workers.process import ProcessRuntime

APP = str(Path(__file__).with_name("session_app.py"))


def process_pool(
    name: str = "proc",
    *,
    ready: int = 3,
    max_sessions: int = 10,
    cooldown_s: int = 300,
    lifecycle: str = "Timed",
    **extra: Any,
) -> Pool:
    return make_pool(
        name,
        image="local",
        ready=ready,
        max_sessions=max_sessions,
        cooldown_s=cooldown_s,
        lifecycle=lifecycle,
        max_alive_s=extra.pop("max_alive_s", None),
        container={"command": [sys.executable], "args": [APP], **extra},
    )


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[ProcessRuntime]]]:
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(**changes: Any) -> ProcessRuntime:
        runtime = ProcessRuntime(use_bwrap=False)
        stop = asyncio.Event()
        s = settings.replace(
            runtime="process",
            reconcile_interval_s=1.0,
            orphan_grace_s=1.0,
            worker_id=f"w{len(running)}",
            **changes,
        )
        running.append((stop, asyncio.create_task(run(s, runtime, stop))))
        return runtime

    yield start
    for stop, _ in running:
        stop.set()
    for _, task in running:
        await asyncio.wait_for(task, 20)


@pytest.fixture
async def router_url(settings: Settings) -> AsyncIterator[str]:
    async with serving_router(settings.replace(allocation_wait_s=10.0)) as url:
        yield url


async def get_host(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["hostname"])


async def test_pool_warms_serves_and_refills(store: Store, worker: Any, router_url: str) -> None:
    runtime = await worker()
    await store.put_pool(process_pool(ready=3))
    await wait_until(lambda: counts_are(store, "proc", ready=3, warming=0), timeout=15)
    assert len(await runtime.list(store.keys.prefix)) == 3
    host = await get_host(f"{router_url}/pools/proc/hello?identifier=user-1")
    assert host == await get_host(f"{router_url}/pools/proc/again?identifier=user-1")
    await wait_until(lambda: counts_are(store, "proc", ready=3, allocated=1), timeout=10)
    assert len(await runtime.list(store.keys.prefix)) == 4


async def test_idle_session_is_destroyed_but_not_while_in_flight(
    store: Store, worker: Any, router_url: str
) -> None:
    runtime = await worker()
    await store.put_pool(process_pool(ready=1, cooldown_s=2))
    await wait_until(lambda: counts_are(store, "proc", ready=1), timeout=15)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{router_url}/pools/proc/?identifier=idle-one") as r:
            assert r.status == 200
        idle_sid = next(iter(await store.sandboxes("proc")))  # noqa: F841 (kept for clarity)
        t0 = time.monotonic()
        # A download that lasts 4.5 s, twice the cooldown, keeps its own session alive.
        async with http.get(f"{router_url}/pools/proc/sleep?s=4.5&identifier=busy-one") as r:
            body = await r.read()
            assert body == b"." * 45  # complete: the sandbox was not torn down under it
        assert time.monotonic() - t0 >= 4.4
        assert await store.get_session("proc", "busy-one") is not None
        ended = await store.get_session("proc", "idle-one")
        assert ended is None  # the idle one went meanwhile (cooldown 2 s)
        t_end = time.monotonic()
        await wait_until(lambda: _gone(store, "busy-one"), timeout=5)
        assert time.monotonic() - t_end <= 2 + 2  # within cooldown + 2 s of the last activity
    live = {o.sandbox_id for o in await runtime.list(store.keys.prefix)}
    await wait_until(lambda: _only_ready(store, runtime), timeout=5)
    assert live  # the ready sandbox is still there


async def _gone(store: Store, ident: str) -> bool:
    return await store.get_session("proc", ident) is None


async def _only_ready(store: Store, runtime: ProcessRuntime) -> bool:
    recs = await store.sandboxes("proc")
    live = {o.sandbox_id for o in await runtime.list(store.keys.prefix)}
    return all(r.state == "ready" for r in recs.values()) and live == set(recs)


async def test_stop_exit_and_external_kill_end_sessions(
    store: Store, worker: Any, router_url: str
) -> None:
    runtime = await worker()
    await store.put_pool(process_pool(ready=2))
    await wait_until(lambda: counts_are(store, "proc", ready=2), timeout=15)
    ep = f"{router_url}/pools/proc"
    async with aiohttp.ClientSession() as http:
        # stopSession
        first = await get_host(f"{ep}/?identifier=stopper")
        async with http.post(f"{ep}/.management/stopSession?identifier=stopper") as r:
            assert r.status == 200
        await wait_until(lambda: _host_gone(runtime, first), timeout=5)
        await wait_until(lambda: counts_are(store, "proc", ready=2), timeout=10)
        assert await get_host(f"{ep}/?identifier=stopper") != first
        # the container exits on its own
        second = await get_host(f"{ep}/?identifier=exiter")
        async with http.get(f"{ep}/exit?code=3&identifier=exiter") as r:
            assert r.status == 200
        await wait_until(lambda: _gone_in(store, "exiter"), timeout=5)
        await wait_until(lambda: _host_gone(runtime, second), timeout=5)
        assert await get_host(f"{ep}/?identifier=exiter") != second
        # killed from outside
        third = await get_host(f"{ep}/?identifier=victim")
        os.kill(int(third.removeprefix("pid-")), signal.SIGKILL)
        await wait_until(lambda: _gone_in(store, "victim"), timeout=5)
        assert await get_host(f"{ep}/?identifier=victim") != third


async def _gone_in(store: Store, ident: str) -> bool:
    return await store.get_session("proc", ident) is None


async def _host_gone(runtime: ProcessRuntime, host: str) -> bool:
    pid = int(host.removeprefix("pid-"))
    return all(
        not o.container.startswith(f"proc-{pid}-")
        for o in await runtime.list(runtime_scope(runtime))
    )


def runtime_scope(runtime: ProcessRuntime) -> str:
    return next(iter({p.spec.scope for p in runtime._procs.values()}), "")


async def test_template_change_replaces_ready_keeps_allocated(
    store: Store, worker: Any, router_url: str
) -> None:
    await worker()
    old = process_pool(ready=2)
    await store.put_pool(old)
    await wait_until(lambda: counts_are(store, "proc", ready=2), timeout=15)
    host = await get_host(f"{router_url}/pools/proc/?identifier=keeper")
    new = process_pool(ready=2, env=[{"name": "MODE", "value": "v2"}])
    assert new.version != old.version
    await store.put_pool(new)

    async def replaced() -> bool:
        recs = (await store.sandboxes("proc")).values()
        ready = [r for r in recs if r.state == "ready"]
        return len(ready) == 2 and all(r.version == new.version for r in ready)

    await wait_until(replaced, timeout=15)
    assert await get_host(f"{router_url}/pools/proc/?identifier=keeper") == host


async def test_deleted_pool_leaves_nothing(store: Store, worker: Any, router_url: str) -> None:
    runtime = await worker()
    await store.put_pool(process_pool(ready=2))
    await wait_until(lambda: counts_are(store, "proc", ready=2), timeout=15)
    await get_host(f"{router_url}/pools/proc/?identifier=doomed")
    await store.delete_pool("proc")

    async def empty() -> bool:
        return not await runtime.list(store.keys.prefix) and not await store.sandboxes("proc")

    await wait_until(empty, timeout=10)


async def test_pool_with_no_ready_instances_starts_one_per_waiting_request(
    store: Store, worker: Any, router_url: str
) -> None:
    runtime = await worker()
    await store.put_pool(process_pool(ready=0, max_sessions=2))
    hosts = await asyncio.gather(
        *(get_host(f"{router_url}/pools/proc/?identifier=cold-{i}") for i in range(3)),
        return_exceptions=True,
    )
    served = [h for h in hosts if isinstance(h, str)]
    assert len(served) == 2 and len(set(served)) == 2  # one sandbox each, up to the limit
    assert len(hosts) - len(served) == 1  # the third is over maxConcurrentSessions
    await wait_until(lambda: counts_are(store, "proc", ready=0, warming=0, allocated=2))
    assert len(await runtime.list(store.keys.prefix)) == 2  # nothing extra kept warm
