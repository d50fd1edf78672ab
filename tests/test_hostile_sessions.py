"""Hostile sessions: attacks from inside a sandbox, with a real worker, Docker and router.

Each test runs a worker process (docker runtime, its own sandbox networks), a router in this
process listening on every address (so its admin API is a target), and a Redis on TCP
0.0.0.0:<port> (another target). A hostile-image session attacks; another session
of the same pool must keep serving meanwhile, and afterwards the hostile session is ended and
its container gone.

What a sandbox is allowed, reported from inside it, and fail-closed: tests/test_containment.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from router.app import create_app
from router.keys import Keys
from router.pools import Pool, parse_pool
from router.settings import Settings
from router.store import Store, open_redis
from sessionpool.testing import spawn_worker, stop_process, unused_port
from tests.helpers import (
    open_engine,
    recording_server,
    remove_networks,
    tcp_connects,
    wait_until,
)
from workers.runtime import LABEL_SCOPE

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]
IMAGE = "sessionpool/hostile:dev"
NETWORK_PREFIX = f"sphost{uuid.uuid4().hex[:6]}"
MEMORY_MIB = 128
PIDS = 64


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    client = open_engine(IMAGE)
    yield client
    asyncio.run(_remove_networks())
    client.close()


async def _remove_networks() -> None:
    await remove_networks(NETWORK_PREFIX)


@pytest.fixture(scope="module")
def tcp_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server on 0.0.0.0:<port>, without protected mode: reachable if not firewalled."""
    exe = shutil.which("redis-server")
    assert exe is not None, "redis-server is not installed"
    port = unused_port("0.0.0.0")
    proc = subprocess.Popen(
        [
            *(exe, "--bind", "0.0.0.0", "--port", str(port), "--protected-mode", "no"),
            *("--save", "", "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.02)
    yield port
    proc.kill()
    proc.wait()


def hostile_pool(name: str = "hostile", *, ready: int = 2, egress: bool = False) -> Pool:
    return parse_pool(
        name,
        {
            "properties": {
                "scaleConfiguration": {"maxConcurrentSessions": 10, "readySessionInstances": ready},
                "dynamicPoolConfiguration": {
                    "lifecycleConfiguration": {
                        "lifecycleType": "Timed",
                        "cooldownPeriodInSeconds": 300,
                    }
                },
                "customContainerTemplate": {
                    "containers": [
                        {
                            "name": "main",
                            "image": IMAGE,
                            "resources": {"cpu": 0.5, "memory": f"{MEMORY_MIB}Mi"},
                            "probes": [
                                {"type": "Startup", "httpGet": {"path": "/health", "port": 8080}}
                            ],
                        }
                    ],
                    "ingress": {"targetPort": 8080},
                },
                "sessionNetworkConfiguration": {
                    "status": "EgressEnabled" if egress else "EgressDisabled"
                },
                "sandboxConfiguration": {"pidsLimit": PIDS},
            }
        },
    )


class Cluster:
    """A worker process, a router on 0.0.0.0 and the store, for one test."""

    def __init__(self, engine: Any, store: Store, router_port: int, redis_port: int) -> None:
        self.engine = engine
        self.store = store
        self.router_port = router_port
        self.redis_port = redis_port
        self.base = f"http://127.0.0.1:{router_port}"
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))

    @property
    def scope(self) -> str:
        return self.store.keys.prefix

    def containers(self) -> dict[str, str]:
        """Container id → state, of this test's scope."""
        rows = self.engine.api.containers(
            all=True, filters={"label": f"{LABEL_SCOPE}={self.scope}"}
        )
        return {r["Id"]: r.get("State", "") for r in rows}

    async def get(self, pool: str, path: str, ident: str) -> Any:
        sep = "&" if "?" in path else "?"
        async with self.http.get(f"{self.base}/pools/{pool}{path}{sep}identifier={ident}") as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def post(self, pool: str, path: str, ident: str) -> Any:
        sep = "&" if "?" in path else "?"
        async with self.http.post(f"{self.base}/pools/{pool}{path}{sep}identifier={ident}") as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def container_of(self, pool: str, ident: str) -> str:
        session = await self.store.get_session(pool, ident)
        assert session is not None and session.container
        return session.container

    async def addr_of(self, pool: str, ident: str) -> str:
        session = await self.store.get_session(pool, ident)
        assert session is not None
        return session.addr

    async def stop(self, pool: str, ident: str) -> None:
        url = f"{self.base}/pools/{pool}/.management/stopSession?identifier={ident}"
        async with self.http.post(url) as r:
            assert r.status in (200, 404), await r.text()  # 404: it ended on its own already

    async def wait_gone(self, pool: str, ident: str, container: str, timeout: float) -> None:
        async def gone() -> bool:
            return await self.store.get_session(pool, ident) is None

        await wait_until(gone, timeout=timeout, interval=0.05)
        await wait_until(lambda: container not in self.containers(), timeout=timeout, interval=0.05)

    async def bystander_serves(self, pool: str = "hostile") -> None:
        assert (await self.get(pool, "/health", "bystander"))["status"] == "ok"


@pytest.fixture
async def cluster(
    request: pytest.FixtureRequest, engine: Any, tcp_redis: int, settings: Settings
) -> AsyncIterator[Cluster]:
    """A router and a worker; `indirect` parametrization picks the docker network attach."""
    redis_url = f"redis://127.0.0.1:{tcp_redis}/0"
    worker = await spawn_worker(
        settings.replace(
            redis_url=redis_url,
            network_prefix=NETWORK_PREFIX,
            docker_network_attach=getattr(request, "param", "engine"),
            reconcile_interval_s=1,
            orphan_grace_s=2,
            warm_timeout_s=30,
            claim_idle_ms=2000,
        )
    )
    router_settings = settings.replace(redis_url=redis_url, allocation_wait_s=30.0)
    server = TestServer(create_app(router_settings), host="0.0.0.0", handler_cancellation=True)
    await server.start_server()
    redis = open_redis(redis_url)
    store = Store(redis, Keys(settings.key_prefix))
    c = Cluster(engine, store, server.port, tcp_redis)
    try:
        yield c
    finally:
        await c.http.close()
        await server.close()
        await stop_process(worker, grace_s=30)
        for container in c.containers():
            engine.api.remove_container(container, force=True)
        await redis.aclose()


async def warm(c: Cluster, pool: Pool) -> None:
    await c.store.put_pool(pool)

    async def ready() -> bool:
        return (await c.store.counts(pool.name))["ready"] >= pool.ready_instances

    await wait_until(ready, timeout=90, interval=0.1)
    await c.bystander_serves(pool.name)


async def attacker_in(c: Cluster, pool: Pool) -> str:
    """Warm `pool` and give the attacker a session in it; that session's container."""
    await warm(c, pool)
    await c.get(pool.name, "/health", "attacker")
    return await c.container_of(pool.name, "attacker")


def host_addresses() -> list[str]:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


# Network -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", ["engine", "direct"], indirect=True)
@pytest.mark.parametrize("egress", [False, True], ids=["EgressDisabled", "EgressEnabled"])
async def test_a_session_reaches_nothing_it_must_not(
    request: pytest.FixtureRequest, cluster: Cluster, egress: bool
) -> None:
    c = cluster
    # "The outside" under EgressDisabled, and any other host service: a server on every
    # host address that records who connected.
    async with recording_server() as (outside_port, seen):
        await warm(c, hostile_pool(ready=3, egress=egress))
        await c.get("hostile", "/health", "attacker")
        attacker = await c.container_of("hostile", "attacker")
        mode = c.engine.api.inspect_container(attacker)["HostConfig"]["NetworkMode"]
        assert (mode == "none") is (request.node.callspec.params["cluster"] == "direct"), mode
        peer = (await c.addr_of("hostile", "bystander")).split(":")[0]
        addrs = host_addresses()
        ports = {"redis": c.redis_port, "router": c.router_port, "outside": outside_port}
        # Controls: every target answers from the host, and /connect works in the sandbox.
        for addr in addrs:
            for port in ports.values():
                assert await tcp_connects(addr, port), (addr, port)
        assert await tcp_connects(peer, 8080)
        ok = await c.get("hostile", "/connect?host=127.0.0.1&port=8080", "attacker")
        assert ok == {"connected": True, "error": None}
        seen.clear()

        targets = [(peer, 8080), ("169.254.169.254", 80), ("169.254.169.254", 8080)]
        targets += [(addr, port) for addr in addrs for port in ports.values()]
        targets += [(addr, 2375) for addr in addrs]  # a Docker engine on TCP, were there one

        async def attempt(host: str, port: int) -> tuple[str, int, Any]:
            path = f"/connect?host={host}&port={port}&timeout_ms=1500"
            return host, port, await c.get("hostile", path, "attacker")

        results = await asyncio.gather(*(attempt(h, p) for h, p in targets))
        reached = [(h, p, got) for h, p, got in results if got["connected"]]
        assert reached == [], f"the session reached {reached}"
        assert seen == [], "a host service saw a connection from the session"
        for sock in ("/var/run/docker.sock", "/run/docker.sock"):
            got = await c.get("hostile", f"/exists?path={sock}", "attacker")
            assert got == {"exists": False}, sock
        # The admin API through the router is the router's to refuse: the session never
        # got a TCP connection to it above, whatever address it tried.
        await c.bystander_serves()
        container = await c.container_of("hostile", "attacker")
        await c.stop("hostile", "attacker")
        await c.wait_gone("hostile", "attacker", container, timeout=15)


# Processes ---------------------------------------------------------------------------------


async def pids_current(c: Cluster, container: str) -> int:
    stats = await asyncio.to_thread(c.engine.api.stats, container, stream=False)
    return int(stats["pids_stats"]["current"])


async def test_fork_bomb_is_held_by_the_pids_limit(cluster: Cluster) -> None:
    c = cluster
    container = await attacker_in(c, hostile_pool(ready=2))
    await c.post("hostile", "/forkbomb", "attacker")
    await wait_until(lambda: _at_least(c, container, PIDS - 2), timeout=20, interval=0.2)
    deadline = time.monotonic() + 3  # the bomb keeps trying; everything else goes on
    while time.monotonic() < deadline:
        assert await pids_current(c, container) <= PIDS
        await c.bystander_serves()
        assert subprocess.run(["true"], check=False).returncode == 0  # the host still forks
    started = time.monotonic()
    await c.stop("hostile", "attacker")
    await c.wait_gone("hostile", "attacker", container, timeout=20)
    print(f"fork bomb: container gone {time.monotonic() - started:.1f} s after stop")
    await c.bystander_serves()


async def _at_least(c: Cluster, container: str, n: int) -> bool:
    return await pids_current(c, container) >= n


async def test_process_ignoring_sigterm_does_not_delay_teardown(cluster: Cluster) -> None:
    c = cluster
    container = await attacker_in(c, hostile_pool(ready=2))
    await c.post("hostile", "/stubborn", "attacker")
    await c.post("hostile", "/stubborn", "attacker")
    top = await asyncio.to_thread(c.engine.api.top, container)
    assert sum("signal.SIG_IGN" in " ".join(p) for p in top["Processes"]) >= 2
    await c.bystander_serves()
    started = time.monotonic()
    await c.stop("hostile", "attacker")
    await c.wait_gone("hostile", "attacker", container, timeout=15)
    took = time.monotonic() - started
    print(f"SIGTERM-ignoring session: container gone {took:.1f} s after stop")
    assert took < 5, "destroy waited for a stop grace period"
    await c.bystander_serves()


# Memory and disk ---------------------------------------------------------------------------


async def test_memory_bomb_is_killed_inside_its_limit(cluster: Cluster) -> None:
    c = cluster
    await warm(c, hostile_pool(ready=3))
    # In a child process: the OOM killer takes the child, the session's server survives.
    await c.get("hostile", "/health", "child-bomber")
    container = await c.container_of("hostile", "child-bomber")
    since = time.time() - 1
    before = await c.post("hostile", "/membomb", "child-bomber")
    await wait_until(lambda: _oom_kills(c, container, since), timeout=20, interval=0.2)
    assert (await c.get("hostile", "/health", "child-bomber"))["status"] == "ok"
    await c.bystander_serves()
    stats = await asyncio.to_thread(c.engine.api.stats, container, stream=False)
    assert stats["memory_stats"]["limit"] == MEMORY_MIB << 20
    assert stats["memory_stats"]["usage"] <= MEMORY_MIB << 20
    assert before["started"]
    await c.stop("hostile", "child-bomber")
    await c.wait_gone("hostile", "child-bomber", container, timeout=15)

    # In the server itself: the container's main process dies, the session ends on its own.
    await c.get("hostile", "/health", "self-bomber")
    container = await c.container_of("hostile", "self-bomber")
    await c.post("hostile", "/membomb?self=1", "self-bomber")
    await c.bystander_serves()
    await c.wait_gone("hostile", "self-bomber", container, timeout=30)
    log = await c.store.redis.xrange(c.store.pk("hostile").log)
    assert any(b'"exited"' in e[1][b"data"] and b"self-bomber" in e[1][b"data"] for e in log)
    await c.bystander_serves()


def _oom_kills(c: Cluster, container: str, since: float) -> bool:
    """The engine reported an OOM kill in the container (any process of its cgroup)."""
    events = c.engine.api.events(
        since=since,
        until=time.time(),
        decode=True,
        filters={"container": container, "event": "oom"},
    )
    return any(True for _ in events)


async def test_disk_and_memory_bombs_in_one_session_leave_the_pool_serving(
    cluster: Cluster,
) -> None:
    c = cluster
    await warm(c, hostile_pool(ready=2))
    await c.get("hostile", "/health", "filler")
    container = await c.container_of("hostile", "filler")
    cap = (MEMORY_MIB << 20) // 2  # no ephemeralStorage: at most half the memory
    # The full file stays: each writable path has this cap, all of them live in the memory.
    got = await c.post("hostile", "/fill?path=/var/tmp/fill&max_mb=1024&keep=1", "filler")
    assert got["written"] <= cap and "No space left" in (got["error"] or ""), got
    await c.bystander_serves()
    got = await c.post("hostile", "/fill?path=/opt/fill&max_mb=1024", "filler")
    assert got["written"] == 0 and "Read-only" in (got["error"] or ""), got
    # Then a memory bomb on top of the full disk, in the same session.
    since = time.time() - 1
    await c.post("hostile", "/membomb", "filler")
    await wait_until(lambda: _oom_kills(c, container, since), timeout=20, interval=0.2)
    await c.bystander_serves()
    await c.stop("hostile", "filler")
    await c.wait_gone("hostile", "filler", container, timeout=15)
    await c.bystander_serves()
