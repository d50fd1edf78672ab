"""Chaos run with a checked history: real routers, workers, Redis and Docker, faults at random.

    python -m tests.chaos --duration 600 [--seed 7]

Starts its own redis-server (AOF on, so a restart keeps state), two routers and two workers as
real processes, a pool of echo sandboxes, and a bounded client load over many identifiers.
Meanwhile it injects, at random: SIGKILL + restart of a router or a worker, a Redis restart, a
sandbox killed from outside, a sandbox paused (stalls) for a while. Every response is recorded
(identifier, the container hostname the echo image reports, status, times). Afterwards the
checker proves the invariants and prints a summary; the exit status is the violation count.
Traffic goes only to loopback and to the containers the run creates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import docker

from router.errors import StoreUnavailableError
from router.keys import Keys
from router.pools import parse_pool
from router.store import Store, open_redis, wait_redis
from sessionpool.testing import unused_port, unused_ports
from workers.runtime import LABEL_SANDBOX, LABEL_SCOPE

ROOT = Path(__file__).resolve().parent.parent

POOL = "chaos"


@dataclass
class Record:
    ident: str
    host: str | None
    status: int
    start: float
    end: float


@dataclass
class Cluster:
    """The processes under test, each restartable."""

    directory: Path
    prefix: str
    logs: Path | None = None
    redis_port: int = field(default_factory=unused_port)
    router_ports: list[int] = field(default_factory=lambda: unused_ports(2))
    redis: Any = None
    routers: list[Any] = field(default_factory=list)
    workers: list[Any] = field(default_factory=list)

    def log(self, name: str) -> Any:
        """Where a process's stderr goes: a file under --logs, else nowhere."""
        if self.logs is None:
            return asyncio.subprocess.DEVNULL
        self.logs.mkdir(parents=True, exist_ok=True)
        return (self.logs / f"{name}.log").open("ab")

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SESSIONPOOL_REDIS_URL": self.redis_url,
            "SESSIONPOOL_KEY_PREFIX": self.prefix,
            "SESSIONPOOL_AUTH": "none",
            "SESSIONPOOL_RECONCILE_INTERVAL_S": "2",
            "SESSIONPOOL_ORPHAN_GRACE_S": "5",
            # A sandbox whose worker was killed while it started stays `warming` until this
            # much time has passed, then reconciliation retires it: the default (120 s) is
            # longer than the quiescence check waits.
            "SESSIONPOOL_WARM_TIMEOUT_S": "20",
            "SESSIONPOOL_CLAIM_IDLE_MS": "3000",
            "SESSIONPOOL_ALLOCATION_WAIT_S": "20",
            "SESSIONPOOL_LOG_JSON": "true",
        }

    async def start_redis(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.redis = await asyncio.create_subprocess_exec(
            exe,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.redis_port),
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def start_router(self, i: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sessionpool.cli",
            "router",
            "--port",
            str(self.router_ports[i]),
            cwd=ROOT,
            env=self.env(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self.log(f"router-{i}"),
        )
        if i < len(self.routers):
            self.routers[i] = proc
        else:
            self.routers.append(proc)

    async def start_worker(self, i: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sessionpool.cli",
            "worker",
            "--runtime",
            "docker",
            cwd=ROOT,
            env={**self.env(), "SESSIONPOOL_WORKER_ID": f"chaos-w{i}"},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self.log(f"worker-{i}"),
        )
        if i < len(self.workers):
            self.workers[i] = proc
        else:
            self.workers.append(proc)

    async def kill(self, proc: Any) -> None:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def stop_all(self) -> None:
        for proc in [*self.routers, *self.workers]:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.routers, *self.workers]:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                await self.kill(proc)
        await self.kill(self.redis)


class Chaos:
    def __init__(
        self,
        duration_s: float,
        seed: int,
        clients: int,
        identifiers: int,
        logs: Path | None = None,
    ) -> None:
        self.duration_s = duration_s
        self.rng = random.Random(seed)
        self.clients = clients
        self.idents = [f"user-{i:03d}" for i in range(identifiers)]
        self.records: list[Record] = []
        self.faults: Counter[str] = Counter()
        self.recovery: dict[str, list[float]] = defaultdict(list)
        self.prefix = f"chaos{os.getpid()}{self.rng.randrange(1 << 16):04x}"
        self.docker = docker.from_env()
        self.tmp = tempfile.TemporaryDirectory(prefix="sessionpool-chaos-")
        self.cluster = Cluster(Path(self.tmp.name), self.prefix, logs)
        self.stop = asyncio.Event()

    def containers(self) -> list[dict[str, Any]]:
        return list(
            self.docker.api.containers(all=True, filters={"label": f"{LABEL_SCOPE}={self.prefix}"})
        )

    async def client(self, http: aiohttp.ClientSession) -> None:
        c = self.cluster
        while not self.stop.is_set():
            ident = self.rng.choice(self.idents)
            port = self.rng.choice(c.router_ports)
            start = time.monotonic()
            host, status = None, 0
            try:
                async with http.get(
                    f"http://127.0.0.1:{port}/pools/{POOL}/op?identifier={ident}",
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as r:
                    status = r.status
                    if status == 200:
                        body = await r.json()
                        assert body["query"] == f"identifier={ident}"  # the caller's own answer
                        host = body["hostname"]
            except (aiohttp.ClientError, TimeoutError):
                status = -1  # connection refused or cut: a router being killed
            self.records.append(Record(ident, host, status, start, time.monotonic()))
            await asyncio.sleep(self.rng.uniform(0.005, 0.05))

    async def wait_served(self, port: int, deadline_s: float = 30) -> float:
        """Seconds until `port` serves a request again."""
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - t0 < deadline_s:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(
                        f"http://127.0.0.1:{port}/pools/{POOL}/probe?identifier=probe-{port}",
                        timeout=aiohttp.ClientTimeout(total=5),
                    ) as r:
                        if r.status == 200:
                            return time.monotonic() - t0
                await asyncio.sleep(0.05)
        return float("inf")

    async def inject(self) -> None:
        c = self.cluster
        kinds = ["router", "worker", "redis", "kill-sandbox", "pause-sandbox"]
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.rng.uniform(2, 5))
            if self.stop.is_set():
                return
            kind = self.rng.choice(kinds)
            self.faults[kind] += 1
            if kind == "router":
                i = self.rng.randrange(len(c.routers))
                await c.kill(c.routers[i])
                await c.start_router(i)
                self.recovery[kind].append(await self.wait_served(c.router_ports[i]))
            elif kind == "worker":
                i = self.rng.randrange(len(c.workers))
                await c.kill(c.workers[i])
                await c.start_worker(i)
                self.recovery[kind].append(0.0)
            elif kind == "redis":
                await c.kill(c.redis)
                await c.start_redis()
                self.recovery[kind].append(await self.wait_served(c.router_ports[0]))
            else:
                running = [x for x in self.containers() if x["State"] == "running"]
                if not running:
                    continue
                victim = self.rng.choice(running)["Id"]
                with contextlib.suppress(docker.errors.APIError):
                    if kind == "kill-sandbox":
                        self.docker.api.kill(victim)
                    else:
                        self.docker.api.pause(victim)
                        await asyncio.sleep(self.rng.uniform(0.5, 2))
                        self.docker.api.unpause(victim)

    async def run(self) -> int:
        c = self.cluster
        await c.start_redis()
        redis = open_redis(c.redis_url)
        store = Store(redis, Keys(self.prefix))
        await wait_redis(redis, 10.0)
        pool = parse_pool(
            POOL,
            {
                "properties": {
                    "scaleConfiguration": {"maxConcurrentSessions": 60, "readySessionInstances": 4},
                    "dynamicPoolConfiguration": {
                        "lifecycleConfiguration": {
                            "lifecycleType": "Timed",
                            "cooldownPeriodInSeconds": 3,
                        }
                    },
                    "customContainerTemplate": {
                        "containers": [
                            {
                                "name": "main",
                                "image": "sessionpool/echo:dev",
                                "resources": {"cpu": 0.25, "memory": "128Mi"},
                                "probes": [
                                    {
                                        "type": "Startup",
                                        "httpGet": {"path": "/health", "port": 8080},
                                    }
                                ],
                            }
                        ],
                        "ingress": {"targetPort": 8080},
                    },
                }
            },
        )
        await store.put_pool(pool)
        for i in range(2):
            await c.start_router(i)
            await c.start_worker(i)
        t_start = time.monotonic()
        violations: list[str] = []
        try:
            for port in c.router_ports:
                assert await self.wait_served(port, 60) < 60, "the cluster never came up"
            async with aiohttp.ClientSession() as http:
                clients = [asyncio.create_task(self.client(http)) for _ in range(self.clients)]
                faults = asyncio.create_task(self.inject())
                await asyncio.sleep(self.duration_s)
                self.stop.set()
                await asyncio.gather(*clients, faults)
            violations += self.check_history()
            violations += await self.check_quiescence(store)
        finally:
            await c.stop_all()
            for x in self.containers():
                with contextlib.suppress(docker.errors.APIError):
                    self.docker.api.remove_container(x["Id"], force=True)
            await redis.aclose()
            self.tmp.cleanup()
        self.summary(time.monotonic() - t_start, violations)
        return len(violations)

    def check_history(self) -> list[str]:
        """No container answers two identifiers; no identifier returns to a container it left
        (a session is never resumed on an old sandbox); overlapping requests of one identifier
        agree unless the session ended between them."""
        out = []
        owner: dict[str, str] = {}
        for r in self.records:
            if r.host is None:
                continue
            if owner.setdefault(r.host, r.ident) != r.ident:
                out.append(f"container {r.host} answered {owner[r.host]} and {r.ident}")
        by_ident: dict[str, list[Record]] = defaultdict(list)
        for r in sorted(self.records, key=lambda r: r.end):
            if r.host is not None:
                by_ident[r.ident].append(r)
        for ident, recs in by_ident.items():
            left: set[str] = set()
            current = None
            for r in recs:
                if r.host != current:
                    if r.host in left:
                        out.append(f"{ident} went back to container {r.host}")
                    if current is not None:
                        left.add(current)
                    current = r.host
        return out

    async def check_quiescence(self, store: Store) -> list[str]:
        """After the load: containers and records agree, the pool is back at target."""
        deadline = time.monotonic() + 90
        problems: list[str] = []
        while time.monotonic() < deadline:
            problems = []
            try:
                recs = await store.sandboxes(POOL)
                counts = await store.counts(POOL)
            except StoreUnavailableError:
                await asyncio.sleep(0.5)  # our own client met a Redis restart: ask again
                continue
            live = {
                x["Labels"].get(LABEL_SANDBOX) for x in self.containers() if x["State"] == "running"
            }
            every = {x["Labels"].get(LABEL_SANDBOX) for x in self.containers()}
            if set(recs) != live or every != live:
                problems.append(
                    f"records {len(recs)} vs running containers {len(live)} "
                    f"vs all containers {len(every)}"
                )
            if counts["ready"] != 4 or counts["warming"] != 0:
                problems.append(f"pool not at target: {counts}")
            if counts["allocated"] != 0:
                problems.append(f"sessions outlived their cooldown: {counts}")
            if not problems:
                return []
            await asyncio.sleep(0.5)
        return problems

    def summary(self, elapsed: float, violations: list[str]) -> None:
        statuses = Counter(r.status for r in self.records)
        print(
            f"chaos: {elapsed:.0f} s, {len(self.records)} requests, "
            f"{len({r.host for r in self.records if r.host})} containers served, "
            f"statuses {dict(sorted(statuses.items()))}"
        )
        print(f"faults: {dict(self.faults)}")
        for kind, times in sorted(self.recovery.items()):
            finite = sorted(t for t in times if t != float("inf"))
            worst = max(times) if times else 0
            print(
                f"recovery {kind}: n={len(times)} median="
                f"{finite[len(finite) // 2] if finite else float('nan'):.2f}s max={worst:.2f}s"
            )
        print(f"violations: {len(violations)}")
        for v in violations[:20]:
            print(f"  {v}")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load and faults")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--identifiers", type=int, default=30)
    p.add_argument("--logs", type=Path, help="keep routers' and workers' logs here")
    args = p.parse_args()
    chaos = Chaos(args.duration, args.seed, args.clients, args.identifiers, args.logs)
    return asyncio.run(chaos.run())


if __name__ == "__main__":
    sys.exit(main())
