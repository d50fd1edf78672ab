"""Sections 3b and 4, on the Docker engine: cold allocation vs a bare `docker run`, warm claims
of real containers, pool refill rate and teardown lag after expiry.

A worker process (`sessionpool worker --runtime docker`) and a router process run with the
suite's own key prefix; every container carries `io.sessionpool.scope=<prefix>` and is removed
at the end whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import proxies
from bench.allocation import Latencies, percentile
from bench.common import (
    ROOT,
    Proc,
    RedisServer,
    poll,
    python,
    spawn,
    spawn_worker,
    timed_get,
    until_expired,
)
from bench.seed import IMAGE, pool_def
from router.keys import Keys
from router.store import Store, open_redis
from workers.runtime import LABEL_SCOPE


@dataclass
class PoolResults:
    cold: Latencies
    docker_run: Latencies
    warm_docker: Latencies
    refill_n: int
    refill_s: float
    teardown_lag_ms: list[float] = field(default_factory=list)

    @property
    def refill_rate(self) -> float:
        return self.refill_n / self.refill_s

    def to_json(self) -> dict[str, Any]:
        return {
            "cold": self.cold.to_json(),
            "docker_run": self.docker_run.to_json(),
            "warm_docker": self.warm_docker.to_json(),
            "refill_n": self.refill_n,
            "refill_s": self.refill_s,
            "refill_per_s": self.refill_rate,
            "teardown_lag_ms": self.teardown_lag_ms,
            "teardown_p50_ms": percentile(self.teardown_lag_ms, 50),
            "teardown_p99_ms": percentile(self.teardown_lag_ms, 99),
        }


def docker_client() -> Any:
    import docker

    client = docker.from_env()
    client.ping()
    return client


def ensure_image(client: Any) -> None:
    import docker

    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        subprocess.run(
            ["bash", str(ROOT / "deploy/images/build.sh"), "echo"], check=True, timeout=900
        )


@dataclass(frozen=True)
class Deployment:
    """What `deployment` runs: the engine's client, the key prefix (every container's scope),
    the private Redis, the router's URL and the worker's log."""

    client: Any
    prefix: str
    redis_url: str
    router_url: str
    worker_log: Path


@contextlib.contextmanager
def deployment(name: str, out: Path, **worker_env: str) -> Iterator[Deployment]:
    """A private redis-server, one docker-runtime worker (`worker_env`: more SESSIONPOOL_*
    variables) and one router process under a fresh key prefix, logging to
    out/logs/<name>-{worker,router}.log; all stopped and the prefix's containers removed
    afterwards."""
    client = docker_client()
    prefix = f"{name}{uuid.uuid4().hex[:8]}"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    worker_log = logs / f"{name}-worker.log"
    worker_log.unlink(missing_ok=True)
    started: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix=f"sp-{name}-") as tmp:
        redis = RedisServer(Path(tmp)).start()
        env = {
            "SESSIONPOOL_REDIS_URL": redis.url,
            "SESSIONPOOL_KEY_PREFIX": prefix,
            "SESSIONPOOL_WORKER_ID": f"{name}-{prefix}",
            **worker_env,
        }
        try:
            started.append(spawn_worker(env, worker_log))
            router, url = proxies.router(redis.url, prefix, log=logs / f"{name}-router.log")
            started.append(router)
            yield Deployment(client, prefix, redis.url, url, worker_log)
        finally:
            for p in reversed(started):
                p.stop()
            redis.stop()
            remove_scope(client, prefix)
            client.close()


def remove_scope(client: Any, scope: str) -> int:
    found = client.api.containers(all=True, filters={"label": f"{LABEL_SCOPE}={scope}"})
    for c in found:
        client.api.remove_container(c["Id"], force=True)
    return len(found)


async def bare_docker_run(
    http: aiohttp.ClientSession, scope: str, extra: tuple[str, ...] = ()
) -> float:
    """ms from `docker run` until the container's port answers HTTP (then it is removed).

    `extra` goes before the image (e.g. the pool's `--cpus`/`--memory`).
    """
    name = f"spbench-{scope}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    run = await asyncio.create_subprocess_exec(
        "docker",
        "run",
        "-d",
        "--rm",
        "--name",
        name,
        "--label",
        f"{LABEL_SCOPE}={scope}",
        *extra,
        IMAGE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await run.communicate()
    if run.returncode != 0:
        raise RuntimeError(f"docker run: {err.decode()}")
    cid = out.decode().strip()
    try:
        insp = await asyncio.create_subprocess_exec(
            "docker",
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            cid,
            stdout=asyncio.subprocess.PIPE,
        )
        ip = (await insp.communicate())[0].decode().split()[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                async with http.get(f"http://{ip}:8080/health") as r:
                    if r.status == 200:
                        return (time.perf_counter() - t0) * 1000
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("docker run: port never answered")
            await asyncio.sleep(0.01)
    finally:
        rm = await asyncio.create_subprocess_exec(
            "docker",
            "rm",
            "-f",
            cid,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await rm.wait()


async def _phases(
    store: Store, client: Any, router_url: str, scope: str, cold_n: int, refill_n: int
) -> PoolResults:
    timeout = aiohttp.ClientTimeout(total=120, sock_connect=1)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        # (a) A dry pool: each request waits for a container started for it, side by side
        # with a bare `docker run` of the same image.
        cold_pool = pool_def("cold", ready=1, max_sessions=cold_n + 10)
        await store.put_pool(cold_pool)

        async def one_ready() -> bool:
            c = await store.counts("cold")
            return c["ready"] == 1 and c["warming"] == 0

        cold, bare = Latencies("dry pool, via router", []), Latencies("bare docker run", [])
        await poll(one_ready, 120, "first cold-pool sandbox")
        await timed_get(http, f"{router_url}/healthz")
        for i in range(cold_n):
            await poll(one_ready, 60, "cold pool refilled")
            drained = await store.claim(cold_pool, f"drain-{i}")  # takes the one ready
            assert drained.session is not None
            cold.ms.append(
                await timed_get(http, f"{router_url}/pools/cold/health?identifier=cold-{i}")
            )
            await poll(one_ready, 60, "cold pool refilled")
            bare.ms.append(await bare_docker_run(http, scope))
        await store.delete_pool("cold")

        # (b) Refill: an empty pool asked for `refill_n` ready sandboxes.
        refill = pool_def("refill", ready=refill_n, max_sessions=2 * refill_n + 10, cooldown_s=1)
        t0 = time.monotonic()
        await store.put_pool(refill)

        async def full() -> bool:
            return (await store.counts("refill"))["ready"] >= refill_n

        refill_s = await poll(full, 300, "refill") - t0

        # (c) Warm claims of real containers (target set to 0 so none are made meanwhile).
        await store.put_pool(
            pool_def("refill", ready=0, max_sessions=2 * refill_n + 10, cooldown_s=1)
        )
        idents = [f"warm-{i}" for i in range(refill_n)]
        warm = Latencies("warm pool, docker containers, one at a time", [])
        for ident in idents:
            warm.ms.append(
                await timed_get(http, f"{router_url}/pools/refill/health?identifier={ident}")
            )

        # (d) Teardown lag: cooldown 1 s; container destroyed (docker event) - expiresAt.
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        records, expires = await until_expired(store, "refill", idents, 0.02)
        containers = {ident: rec["container"] for ident, rec in records.items()}
        wanted = set(containers.values())

        async def all_gone() -> bool:
            ids = {
                c["Id"]
                for c in client.api.containers(
                    all=True, filters={"label": f"{LABEL_SCOPE}={scope}"}
                )
            }
            return not (ids & wanted)

        await poll(all_gone, 60, "containers destroyed", interval=0.1)
        until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        destroyed: dict[str, float] = {}
        for ev in client.events(
            since=since,
            until=until,
            decode=True,
            filters={"type": "container", "event": "destroy", "label": f"{LABEL_SCOPE}={scope}"},
        ):
            destroyed[ev["id"]] = ev["timeNano"] / 1e6
        lags = [
            destroyed[containers[i]] - expires[i] for i in containers if containers[i] in destroyed
        ]
        return PoolResults(cold, bare, warm, refill_n, refill_s, lags)


def run(redis_url: str, prefix: str, cold_n: int, refill_n: int, log_dir: Path) -> PoolResults:
    client = docker_client()
    ensure_image(client)
    started: list[Proc] = []
    try:
        env = {
            "SESSIONPOOL_REDIS_URL": redis_url,
            "SESSIONPOOL_KEY_PREFIX": prefix,
            "SESSIONPOOL_WORKER_ID": f"bench-{prefix}",
            # A dry pool stays dry: no demand-following warm sandboxes between cold requests.
            "SESSIONPOOL_DEMAND_WINDOW_S": "0.001",
            "SESSIONPOOL_AUTH": "none",
        }
        worker = spawn(
            "worker",
            [
                python(),
                "-m",
                "sessionpool.cli",
                "worker",
                "--runtime",
                "docker",
                "--log-level",
                "WARNING",
            ],
            env=env,
            log=log_dir / "worker.log",
        )
        started.append(worker)
        router, url = proxies.router(redis_url, prefix, log=log_dir / "router-docker.log")
        started.append(router)

        async def go() -> PoolResults:
            redis = open_redis(redis_url)
            try:
                return await _phases(
                    Store(redis, Keys(prefix)), client, url, prefix, cold_n, refill_n
                )
            finally:
                await redis.aclose()

        return asyncio.run(go())
    finally:
        for p in started:
            p.stop()
        remove_scope(client, prefix)
        client.close()
