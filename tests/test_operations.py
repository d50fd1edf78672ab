"""Operations: Prometheus metrics that move with the pool, JSON logs with trace ids."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from router.app import create_app
from router.settings import Settings
from router.store import Store
from sessionpool.testing import spawn_router, stop_process, unused_port
from tests.helpers import FakeSandbox, add_ready, make_pool, wait_until
from tests.worker_rigs import process_pool
from workers.main import run
from workers.process import ProcessRuntime

ROOT = Path(__file__).resolve().parent.parent


def metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = (
        rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? ([0-9.e+-]+)$"
        if want
        else rf"^{re.escape(name)} ([0-9.e+-]+)$"
    )
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else None


@pytest.fixture
async def routers(settings: Settings) -> AsyncIterator[list[str]]:
    servers = [
        TestServer(create_app(settings), host="127.0.0.1", handler_cancellation=True)
        for _ in range(2)
    ]
    for s in servers:
        await s.start_server()
    yield [f"http://127.0.0.1:{s.port}" for s in servers]
    for s in servers:
        await s.close()


async def scrape(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        return await r.text()


async def shows(
    http: aiohttp.ClientSession, base: str, name: str, value: float, **labels: str
) -> None:
    """Wait until a scrape of `base` shows `name{labels} == value` (/metrics is cached briefly)."""

    async def seen() -> bool:
        return metric(await scrape(http, base), name, **labels) == value

    await wait_until(seen, timeout=5)


async def test_router_metrics_move_and_agree(store: Store, routers: list[str]) -> None:
    pool = make_pool()
    await store.put_pool(pool)
    live, dead = await FakeSandbox().start(), await FakeSandbox().start()
    try:
        await add_ready(store, pool, live)
        async with aiohttp.ClientSession() as http:
            for base in routers:  # the gauges come from Redis: every router agrees
                await shows(http, base, "sessionpool_pool_ready", 1, pool="demo")
                await shows(http, base, "sessionpool_pool_allocated", 0, pool="demo")
                await shows(http, base, "sessionpool_pool_warming", 0, pool="demo")
            async with http.get(f"{routers[0]}/pools/demo/x?identifier=metered") as r:
                assert r.status == 200
            for base in routers:
                await shows(http, base, "sessionpool_pool_ready", 0, pool="demo")
                await shows(http, base, "sessionpool_pool_allocated", 1, pool="demo")
            await shows(http, routers[0], "sessionpool_allocation_seconds_count", 1, pool="demo")
            await shows(http, routers[0], "sessionpool_proxy_seconds_count", 1, pool="demo")
            await store.reserve(pool, "test", ["warm-1"])
            await shows(http, routers[1], "sessionpool_pool_warming", 1, pool="demo")
            await store.forget("demo", "warm-1")
            async with http.post(
                f"{routers[1]}/pools/demo/.management/stopSession?identifier=metered"
            ) as r:
                assert r.status == 200
            await shows(http, routers[0], "sessionpool_pool_allocated", 0, pool="demo")
            await add_ready(store, pool, dead)
            await dead.close()  # its port now refuses connections
            async with http.get(f"{routers[0]}/pools/demo/x?identifier=unlucky") as r:
                assert r.status == 502
            unreachable = {"pool": "demo", "kind": "SessionUnreachable"}
            await shows(http, routers[0], "sessionpool_upstream_errors_total", 1, **unreachable)
            await shows(http, routers[0], "sessionpool_responses_total", 1, code="5xx")
    finally:
        await live.close()


async def test_router_logs_are_json_with_the_trace_id(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    pool = make_pool()
    await store.put_pool(pool)
    dead = await FakeSandbox().start()
    await add_ready(store, pool, dead)
    await dead.close()
    log = tmp_path / "router.log"
    proc, base = await spawn_router(settings, log=log)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(
                f"{base}/pools/demo/x?identifier=logged",
                headers={"Authorization": "Bearer sekrit-token"},
            ) as r:
                assert r.status == 502
                trace_id = (await r.json())["error"]["traceId"]
    finally:
        await stop_process(proc)
    err = log.read_text()
    records = [orjson.loads(x) for x in err.splitlines() if x.strip()]  # every line is JSON
    assert records
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    tagged = [r for r in records if r.get("traceId") == trace_id]
    assert any("SessionUnreachable" in r["msg"] for r in tagged)
    assert "sekrit-token" not in err


async def test_worker_metrics_count_teardowns_by_reason(settings: Settings, store: Store) -> None:
    port = unused_port()  # the worker binds it itself (0 means no metrics server)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run(
            settings.replace(runtime="process", metrics_port=port),
            ProcessRuntime(use_bwrap=False),
            stop,
        )
    )

    async def teardowns(http: aiohttp.ClientSession, reason: str) -> float:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
        return metric(text, "sessionpool_teardowns_total", pool="proc", reason=reason) or 0.0

    try:
        await store.put_pool(process_pool(ready=1))

        async def ready() -> Any:
            return (await store.counts("proc"))["ready"] == 1

        await wait_until(ready, timeout=15)
        async with aiohttp.ClientSession() as http:
            before = await teardowns(http, "stopped")
            claimed = await store.claim(process_pool(ready=1), "metric-user")
            assert claimed.created
            assert await store.stop("proc", "metric-user", "stopped")

            async def counted() -> bool:
                return await teardowns(http, "stopped") == before + 1

            await wait_until(counted, timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
