"""Redis high availability: Sentinel fails over under load; routers and workers follow."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from router.app import create_app
from router.errors import StoreUnavailableError
from router.keys import Keys
from router.store import Store, open_redis, wait_redis
from sessionpool.testing import unused_ports
from tests.helpers import wait_until
from tests.worker_rigs import process_pool, process_settings
from workers.main import run
from workers.process import ProcessRuntime

pytestmark = pytest.mark.timeout(180)
MASTER = "spmaster"


class Topology:
    """A primary, a replica and three sentinels on loopback, each a real redis-server."""

    def __init__(self, directory: Path, password: str = "") -> None:
        self.dir = directory
        self.password = password  # as deploy/k8s/20-redis.yaml: on servers and sentinels
        self.ports = unused_ports(2)
        self.sentinel_ports = unused_ports(3)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start_server(self, port: int, replica_of: int | None = None) -> None:
        args = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
        ]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        self.procs[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def start_sentinel(self, port: int) -> None:
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.ports[0]} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        if self.password:
            with conf.open("a") as f:
                f.write(
                    f"requirepass {self.password}\n"
                    f"sentinel auth-pass {MASTER} {self.password}\n"
                    f"sentinel sentinel-pass {self.password}\n"
                )
        self.procs[port] = subprocess.Popen(
            ["redis-server", str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        auth = f":{self.password}@" if self.password else ""
        return f"redis+sentinel://{auth}{hosts}/{MASTER}/0"

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    assert shutil.which("redis-server"), "redis-server is not installed"
    t = Topology(tmp_path)
    t.start_server(t.ports[0])
    t.start_server(t.ports[1], replica_of=t.ports[0])
    for port in t.sentinel_ports:
        t.start_sentinel(port)
    yield t
    t.stop()


async def primary_port(t: Topology) -> int | None:
    s = aioredis.Redis(host="127.0.0.1", port=t.sentinel_ports[0], socket_timeout=1)
    try:
        addr = await s.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
        return int(addr[1]) if addr else None
    except (aioredis.ConnectionError, aioredis.TimeoutError):
        return None
    finally:
        await s.aclose()


async def sentinels_agree(t: Topology) -> bool:
    """Every sentinel knows the replica (as a live replica) and the two other sentinels: until
    then a dead primary has no quorum or nothing to promote, and no failover can start.
    Sentinels learn replicas from the primary's INFO and each other from hello messages, both
    periodic, so this takes seconds after the servers are up."""
    for port in t.sentinel_ports:
        s = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=1, decode_responses=True)
        try:
            replicas = await s.execute_command("SENTINEL", "REPLICAS", MASTER)
            others = await s.execute_command("SENTINEL", "SENTINELS", MASTER)
        except (aioredis.ConnectionError, aioredis.TimeoutError, aioredis.ResponseError):
            return False
        finally:
            await s.aclose()
        live = [r for r in map(_fields, replicas) if not _DEAD & set(r["flags"].split(","))]
        if not any(r.get("port") == str(t.ports[1]) for r in live) or len(others) < 2:
            return False
    return True


_DEAD = {"s_down", "o_down", "disconnected"}


def _fields(reply: list[str] | dict[str, str]) -> dict[str, str]:
    """A SENTINEL listing's entry (a flat name/value list in RESP2) as a dict."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


async def test_failover_under_load(topology: Topology, key_prefix: str) -> None:
    t = topology

    async def replica_synced() -> bool:
        r = aioredis.Redis(host="127.0.0.1", port=t.ports[1], socket_timeout=1)
        try:
            info = await r.info("replication")
            return info.get("master_link_status") == "up"
        except (aioredis.ConnectionError, aioredis.TimeoutError):
            return False
        finally:
            await r.aclose()

    await wait_until(replica_synced, timeout=20)
    await wait_until(lambda: primary_port(t), timeout=20)
    await wait_until(lambda: sentinels_agree(t), timeout=60)
    settings = process_settings(t.url, key_prefix)
    redis = open_redis(t.url)
    store = Store(redis, Keys(key_prefix))
    await store.put_pool(process_pool(ready=2, cooldown_s=300))
    stop = asyncio.Event()
    worker = asyncio.create_task(run(settings, ProcessRuntime(use_bwrap=False), stop))
    server = TestServer(create_app(settings), host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}/pools/proc"
    statuses: list[tuple[float, int]] = []
    try:
        await wait_until(lambda: _ready(store, 2), timeout=30)
        async with aiohttp.ClientSession() as http:

            async def hit(ident: str) -> int:
                try:
                    async with http.get(
                        f"{base}/?identifier={ident}", timeout=aiohttp.ClientTimeout(total=15)
                    ) as r:
                        return r.status
                except (aiohttp.ClientError, TimeoutError):
                    return -1

            assert await hit("before-failover") == 200
            old = await primary_port(t)
            assert old == t.ports[0]
            t.kill(old)  # the primary dies under load
            t_kill = time.monotonic()
            while time.monotonic() - t_kill < 30:
                statuses.append((time.monotonic() - t_kill, await hit("before-failover")))
                if await primary_port(t) == t.ports[1] and statuses[-1][1] == 200:
                    break
                await asyncio.sleep(0.1)
            assert await primary_port(t) == t.ports[1], "sentinel did not fail over"
            recovered = statuses[-1][0]
            assert statuses[-1][1] == 200, statuses[-5:]
            # Meanwhile only clean answers: served (cached or replicated) or 503, never a hang.
            assert {s for _, s in statuses} <= {200, 503}
            # New sessions after the failover: the worker follows the new primary too.
            assert await hit("after-failover") == 200
            await wait_until(lambda: _ready(store, 2), timeout=30)
            print(f"failover: served again {recovered:.1f} s after the primary died")
    finally:
        await server.close()
        stop.set()
        await asyncio.wait_for(worker, 30)
        await redis.aclose()


async def _ready(store: Store, n: int) -> bool:
    try:
        return (await store.counts("proc"))["ready"] == n
    except StoreUnavailableError:
        return False


async def test_password_protected_sentinel_topology(tmp_path: Path) -> None:
    """The k8s shape: servers and sentinels all require the password; a client with it in
    the URL finds the primary and works, one without it gets nothing."""
    t = Topology(tmp_path, password="a-generated-password-0123456789")
    t.start_server(t.ports[0])
    for port in t.sentinel_ports:
        t.start_sentinel(port)
    try:
        client = open_redis(t.url)
        try:
            await wait_redis(client, 10.0)
            await client.set("k", b"v")
            assert await client.get("k") == b"v"
        finally:
            await client.aclose()
        # Without it, neither a sentinel nor the primary tells anything (a raw client: what
        # anyone on the network would get).
        for port, command in (
            (t.sentinel_ports[0], f"SENTINEL get-master-addr-by-name {MASTER}"),
            (t.ports[0], "GET k"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(command.encode() + b"\r\n")
                assert (await reader.readline()).startswith(b"-NOAUTH"), command
            finally:
                writer.close()
                await writer.wait_closed()
    finally:
        t.stop()
