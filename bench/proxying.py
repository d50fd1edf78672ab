"""Section 1: the same upstream directly and through each proxy, side by side, with wrk."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import proxies
from bench.common import Proc, which
from bench.load import LoadResult, wrk
from bench.seed import pool_def, seed_ready
from router.keys import Keys
from router.store import Store, open_redis


@dataclass
class Path_:
    """One way to reach the upstream: `proc` is the proxy (None for direct)."""

    name: str
    url: str
    proc: Proc | None


@dataclass
class ProxyResults:
    upstream: str
    runs: dict[str, dict[int, LoadResult]] = field(default_factory=dict)  # path -> c -> run
    representative: dict[str, dict[int, LoadResult]] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)  # path -> why

    def to_json(self) -> dict[str, Any]:
        def conv(d: dict[str, dict[int, LoadResult]]) -> dict[str, Any]:
            return {
                p: {str(c): dataclasses.asdict(r) for c, r in runs.items()} for p, runs in d.items()
            }

        return {
            "upstream": self.upstream,
            "runs": conv(self.runs),
            "representative": conv(self.representative),
            "not_run": self.not_run,
        }


async def _warm_route(url: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"router answered {r.status}: {body[:300]!r}")


async def seed_router_pool(redis_url: str, prefix: str, addrs: dict[str, str]) -> None:
    """Pool `bench` with one ready sandbox per identifier in `addrs`."""
    redis = open_redis(redis_url)
    try:
        store = Store(redis, Keys(prefix))
        pool = pool_def("bench", ready=len(addrs), max_sessions=len(addrs) + 10)
        await store.put_pool(pool)
        for ident, addr in addrs.items():  # one at a time: each claim takes its own sandbox
            await seed_ready(store, pool, [addr])
            result = await store.claim(pool, ident)
            if result.session is None or result.session.addr != addr:
                raise RuntimeError(f"seeding: {ident} was not routed to {addr}")
    finally:
        await redis.aclose()


def run(
    workdir: Path,
    redis_url: str,
    prefix: str,
    connections: list[int],
    duration_s: int,
    warmup_s: int,
    log_dir: Path,
    rep_connections: int = 2,
) -> ProxyResults:
    started: list[Proc] = []
    try:
        not_run: dict[str, str] = {}
        if which("nginx") is not None:
            up_proc, upstream = proxies.nginx_upstream(workdir / "nginx-upstream")
            up_name = "nginx (1 worker, 40-byte body)"
        else:
            up_proc, ports = proxies.python_upstream(1, workdir, log=log_dir / "upstream.log")
            upstream = f"127.0.0.1:{ports[0]}"
            up_name = "bench/upstream.py (aiohttp, 40-byte body): nginx is not installed"
            not_run["nginx proxy_pass"] = proxies.NGINX_MISSING
        started.append(up_proc)
        echo_proc, echo_addr = proxies.echo_app(log=log_dir / "echo-app.log")
        started.append(echo_proc)

        asyncio.run(seed_router_pool(redis_url, prefix, {"warm": upstream, "warm-echo": echo_addr}))
        router_proc, router_url = proxies.router(redis_url, prefix, log=log_dir / "router.log")
        started.append(router_proc)
        bare_proc, bare_url = proxies.bare_proxy(upstream)
        started.append(bare_proc)
        paths = [
            Path_("direct", f"http://{upstream}/small", None),
            Path_(
                "sessionpool router", f"{router_url}/pools/bench/small?identifier=warm", router_proc
            ),
            Path_("bare aiohttp proxy", f"{bare_url}/small", bare_proc),
        ]
        if "nginx proxy_pass" not in not_run:
            nginx_proc, nginx_url = proxies.nginx_proxy(workdir / "nginx-proxy", upstream)
            started.append(nginx_proc)
            paths.append(Path_("nginx proxy_pass", f"{nginx_url}/small", nginx_proc))
        why = proxies.chp_available()
        if why is None:
            chp_proc, chp_url = proxies.chp(upstream)
            started.append(chp_proc)
            paths.append(Path_("configurable-http-proxy", f"{chp_url}/small", chp_proc))
        else:
            not_run["configurable-http-proxy"] = why

        asyncio.run(_warm_route(paths[1].url))
        res = ProxyResults(upstream=up_name, not_run=not_run)
        for c in connections:  # interleaved: every path at one concurrency before the next
            for p in paths:
                res.runs.setdefault(p.name, {})[c] = wrk(p.url, c, duration_s, p.proc, warmup_s)

        # The representative sandbox: the echo image's own aiohttp app, direct vs through proxies.
        if not rep_connections:
            return res
        bare_echo_proc, bare_echo_url = proxies.bare_proxy(echo_addr)
        started.append(bare_echo_proc)
        rep = [
            Path_("direct", f"http://{echo_addr}/health", None),
            Path_(
                "sessionpool router",
                f"{router_url}/pools/bench/health?identifier=warm-echo",
                router_proc,
            ),
            Path_("bare aiohttp proxy", f"{bare_echo_url}/health", bare_echo_proc),
        ]
        asyncio.run(_warm_route(rep[1].url))
        for c in connections[:rep_connections]:
            for p in rep:
                res.representative.setdefault(p.name, {})[c] = wrk(
                    p.url, c, duration_s, p.proc, warmup_s
                )
        with contextlib.suppress(Exception):
            (log_dir / "router.cpu").write_text(f"{router_proc.cpu()}\n")
        return res
    finally:
        for p in started:
            p.stop()
