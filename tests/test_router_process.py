"""The router as a real process: bounded memory while streaming, and what dying leaves."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.pools import Pool
from router.settings import Settings
from router.store import Store
from sessionpool.testing import spawn, spawn_router, unused_port
from tests.helpers import CHUNK, FakeSandbox, add_ready, make_pool, pattern_sha, wait_until

MiB = 1 << 20
SIZE = 200 * MiB

RouterProc = tuple[asyncio.subprocess.Process, str]
Serving = Callable[..., Awaitable[RouterProc]]


@pytest.fixture
async def router_proc(
    settings: Settings,
) -> AsyncIterator[Callable[..., Awaitable[RouterProc]]]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(**changes: Any) -> RouterProc:
        proc, base = await spawn_router(settings.replace(**changes))
        procs.append(proc)
        return proc, base

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def sandbox() -> AsyncIterator[FakeSandbox]:
    sb = await FakeSandbox().start()
    yield sb
    sb.slow_release.set()
    await sb.close()


@pytest.fixture
def serving(
    store: Store, sandbox: FakeSandbox, router_proc: Callable[[], Awaitable[RouterProc]]
) -> Serving:
    """Put `pool` (the demo pool by default) with `sandbox` ready; start a router process."""

    async def serve(pool: Pool | None = None) -> RouterProc:
        pool = pool or make_pool()
        await store.put_pool(pool)
        await add_ready(store, pool, sandbox)
        return await router_proc()

    return serve


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


async def test_200_mib_both_ways_in_bounded_memory(serving: Serving) -> None:
    proc, base = await serving()
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        ep = f"{base}/pools/demo"
        async with http.get(f"{ep}/warm?identifier=streamer") as r:
            assert r.status == 200
        baseline = rss_kib(proc.pid, "VmRSS")
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)

        async def upload() -> AsyncIterator[bytes]:
            for _ in range(SIZE // len(CHUNK)):
                yield CHUNK

        async with http.post(f"{ep}/up?identifier=streamer", data=upload()) as r:
            seen = await r.json()
        assert seen["body_bytes"] == SIZE
        assert seen["body_sha256"] == pattern_sha(SIZE)
        for chunked in ("0", "1"):
            digest, size = hashlib.sha256(), 0
            url = f"{ep}/download?size={SIZE}&chunked={chunked}&identifier=streamer"
            async with http.get(url) as r:
                assert r.status == 200
                if chunked == "0":
                    assert r.headers["Content-Length"] == str(SIZE)
                else:
                    assert "Content-Length" not in r.headers
                    assert r.headers["Transfer-Encoding"] == "chunked"
                async for chunk in r.content.iter_any():
                    digest.update(chunk)
                    size += len(chunk)
            assert size == SIZE
            assert digest.hexdigest() == pattern_sha(SIZE)
        growth_mib = (rss_kib(proc.pid, "VmHWM") - baseline) / 1024
    assert growth_mib < 16, f"router peak RSS grew by {growth_mib:.1f} MiB"


async def test_killed_router_does_not_keep_sessions_alive(
    store: Store, sandbox: FakeSandbox, serving: Serving
) -> None:
    proc, base = await serving(make_pool(cooldown_s=1))
    async with aiohttp.ClientSession() as http:
        task = asyncio.ensure_future(http.get(f"{base}/pools/demo/hang?identifier=orphan"))
        await asyncio.wait_for(sandbox.slow_started.wait(), 10)
        k = store.pk("demo")
        first = await store.redis.zscore(k.expiry, "orphan")

        async def refreshed() -> bool:  # the in-flight request keeps it alive...
            return (await store.redis.zscore(k.expiry, "orphan") or 0) > (first or 0) + 500

        await wait_until(refreshed, timeout=5)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        last = await store.redis.zscore(k.expiry, "orphan")
        t = await store.redis.time()
        now_ms = t[0] * 1000 + t[1] // 1000
        # ...until the router dies: then it expires one cooldown after its last touch.
        assert last is not None and last - now_ms <= 1000 + 50
        task.cancel()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
async def test_sigterm_drains_in_flight_then_exits(sandbox: FakeSandbox, serving: Serving) -> None:
    proc, base = await serving()
    async with aiohttp.ClientSession() as http:
        task = asyncio.ensure_future(http.get(f"{base}/pools/demo/hang?identifier=drainer"))
        await asyncio.wait_for(sandbox.slow_started.wait(), 10)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert proc.returncode is None  # still finishing the request in flight
        sandbox.slow_release.set()
        async with await asyncio.wait_for(task, 10) as r:
            assert r.status == 200
            assert await r.text() == "released"
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_processes_share_one_port(settings: Settings, store: Store) -> None:
    port = unused_port()  # a fixed port: several processes cannot share port 0
    pool = make_pool()
    await store.put_pool(pool)
    sb = await FakeSandbox().start()
    proc = await spawn("router", settings.replace(port=port, processes=2))
    assert proc.stdout is not None
    try:
        await add_ready(store, pool, sb)
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 30)).decode() for _ in range(2)]
        assert all(f":{port}" in line for line in lines)  # both bound the same port
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        servers = [
            c
            for c in children
            if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()
        ]
        assert len(servers) == 2
        async with aiohttp.ClientSession() as http:
            for i in range(20):  # new connections each time: the kernel spreads them
                async with http.get(
                    f"http://127.0.0.1:{port}/pools/demo/?identifier=multi",
                    headers={"Connection": "close"},
                ) as r:
                    assert r.status == 200, i
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            for pid in [proc.pid, *map(int, kids)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await proc.wait()
        await sb.close()


async def test_sigterm_closes_websockets_with_1001(sandbox: FakeSandbox, serving: Serving) -> None:
    proc, base = await serving()
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{base}/pools/demo/ws?identifier=ws-leaver") as ws:
            await ws.send_str("hello")
            assert await ws.receive_str() == f"{sandbox.name}:hello"
            proc.send_signal(signal.SIGTERM)
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
    assert await asyncio.wait_for(proc.wait(), 20) == 0


def open_files_limit(pid: int) -> tuple[int, int]:
    line = next(
        x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if "open files" in x
    )
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def may_raise_hard_limits() -> bool:
    """CAP_SYS_RESOURCE (bit 24) in this process's effective set: root, as in CI."""
    caps = next(x for x in Path("/proc/self/status").read_text().splitlines() if "CapEff" in x)
    return bool(int(caps.split()[1], 16) >> 24 & 1)


async def test_router_raises_its_open_files_limit(
    router_proc: Callable[..., Awaitable[RouterProc]],
) -> None:
    """Started with a soft RLIMIT_NOFILE of 256, the router serves with its soft limit at the
    hard one, and both at max_open_files where it is allowed to raise the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    target = min(hard + 1024, nr_open)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # what the child inherits
    try:
        proc, base = await router_proc(max_open_files=target)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    want = target if may_raise_hard_limits() else hard
    assert open_files_limit(proc.pid) == (want, want)
    async with aiohttp.ClientSession() as http, http.get(f"{base}/healthz") as r:
        assert r.status == 200
