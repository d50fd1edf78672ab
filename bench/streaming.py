"""Section 2: a large upload and download through the router (and the bare proxy as anchor).

GB/s per core = bytes / CPU seconds of the proxy process; memory growth = peak RSS (VmHWM,
reset through /proc/PID/clear_refs before the transfer) minus RSS before it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import proxies
from bench.common import Proc, reset_peak, status_kib
from bench.proxying import seed_router_pool

CHUNK = b"\xa5" * (256 * 1024)
# "upload": the body's length said up front (Content-Length), as file uploads send it;
# "upload chunked": a body streamed without a length (Transfer-Encoding: chunked).
DIRECTIONS = ("upload", "upload chunked", "download")


@dataclass(frozen=True)
class Transfer:
    direction: str
    bytes: int
    wall_s: float
    cpu_s: float
    rss_growth_mib: float

    @property
    def gb_per_core_s(self) -> float:
        return self.bytes / self.cpu_s / 1e9 if self.cpu_s > 0 else float("inf")


async def _transfer(proc: Proc, url: str, direction: str, size: int) -> Transfer:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(
        auto_decompress=False, timeout=timeout, read_bufsize=1 << 20
    ) as http:
        async with http.get(url.format(path="small", q="")) as r:  # warm: route + connection
            await r.read()
        before = status_kib(proc.pid, "VmRSS")
        reset_peak(proc.pid)
        cpu0, t0 = proc.cpu(), time.perf_counter()
        if direction.startswith("upload"):

            async def body() -> AsyncIterator[bytes]:
                for _ in range(size // len(CHUNK)):
                    yield CHUNK

            length = {} if direction.endswith("chunked") else {"Content-Length": str(size)}
            async with http.post(url.format(path="up", q=""), data=body(), headers=length) as r:
                seen = (await r.json())["body_bytes"]
        else:
            seen = 0
            async with http.get(url.format(path="download", q=f"&size={size}")) as r:
                async for chunk in r.content.iter_any():
                    seen += len(chunk)
        wall, cpu = time.perf_counter() - t0, proc.cpu() - cpu0
        growth = (status_kib(proc.pid, "VmHWM") - before) / 1024
    if seen != size:
        raise RuntimeError(f"{direction}: {seen} of {size} bytes arrived")
    return Transfer(direction, size, wall, cpu, growth)


@dataclass
class StreamingResults:
    router: list[Transfer]
    bare: list[Transfer]

    def to_json(self) -> dict[str, Any]:
        return {
            "router": [{**asdict(t), "gb_per_core_s": t.gb_per_core_s} for t in self.router],
            "bare": [{**asdict(t), "gb_per_core_s": t.gb_per_core_s} for t in self.bare],
        }


def run(
    redis_url: str, prefix: str, size: int, log_dir: Path, repeats: int = 1
) -> StreamingResults:
    """Each direction `repeats` times, router and bare alternating (one transfer is noisy on
    a shared machine: report the median)."""
    started: list[Proc] = []
    try:
        up, ports = proxies.python_upstream(1, log_dir, log=log_dir / "stream-upstream.log")
        started.append(up)
        upstream = f"127.0.0.1:{ports[0]}"
        asyncio.run(seed_router_pool(redis_url, prefix, {"streamer": upstream}))
        router, router_url = proxies.router(redis_url, prefix, log=log_dir / "router-stream.log")
        started.append(router)
        bare, bare_url = proxies.bare_proxy(upstream)
        started.append(bare)
        r_url = f"{router_url}/pools/bench/{{path}}?identifier=streamer{{q}}"
        b_url = f"{bare_url}/{{path}}?via=bare{{q}}"

        async def all_transfers() -> StreamingResults:
            res = StreamingResults([], [])
            for direction in DIRECTIONS:
                for _ in range(repeats):
                    res.router.append(await _transfer(router, r_url, direction, size))
                    res.bare.append(await _transfer(bare, b_url, direction, size))
            return res

        return asyncio.run(all_transfers())
    finally:
        for p in started:
            p.stop()
