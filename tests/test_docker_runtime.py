"""The docker runtime against the real engine: hardening, lifecycle, exit events, isolation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.errors import SandboxRuntimeError
from router.pools import Pool
from tests.helpers import (
    docker_runtime_fixtures,
    ensure_image,
    iptables_has,
    make_pool,
    recording_server,
    remove_networks,
    sh,
    tcp_connects,
    wait_healthy,
    wait_until,
)
from workers import runtime as labels
from workers.docker import DockerRuntime
from workers.docker_firewall import bridge_name, firewall_rules
from workers.runtime import Exit, Handle, SandboxSpec

pytestmark = pytest.mark.docker

IMAGE = "sessionpool/echo:dev"
SCOPE = f"t{uuid.uuid4().hex[:8]}"
PREFIX = f"sptest{uuid.uuid4().hex[:6]}"
READY_S = 30.0


def inspect(container: str) -> dict[str, Any]:
    return dict(json.loads(sh("docker", "inspect", container).stdout)[0])


def scope_containers() -> list[str]:
    out = sh("docker", "ps", "-aq", "--no-trunc", "--filter", f"label={labels.LABEL_SCOPE}={SCOPE}")
    return out.stdout.split()


engine, runtime = docker_runtime_fixtures(SCOPE, PREFIX, lambda: ensure_image("echo"))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def echo_pool(
    name: str = "echo", *, egress: bool = False, port: int = 8080, **container: Any
) -> Pool:
    return make_pool(
        name,
        customContainerTemplate={
            "containers": [{"name": "main", "image": IMAGE, **container}],
            "ingress": {"targetPort": port},
        },
        sessionNetworkConfiguration={"status": "EgressEnabled" if egress else "EgressDisabled"},
        sandboxConfiguration={"pidsLimit": 64},
    )


def spec(pool: Pool, **env: str) -> SandboxSpec:
    return SandboxSpec(scope=SCOPE, pool=pool, sandbox_id=uuid.uuid4().hex, env=env)


async def get_json(http: aiohttp.ClientSession, handle: Handle, path: str) -> Any:
    async with http.get(f"http://{handle.addr}{path}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def wait_ready(http: aiohttp.ClientSession, handle: Handle) -> None:
    await wait_healthy(http, handle.addr, READY_S)


async def test_create_is_hardened_listed_and_destroyed(
    runtime: DockerRuntime, http: aiohttp.ClientSession
) -> None:
    pool = echo_pool(
        "hardened",
        resources={"cpu": 0.5, "memory": "256Mi"},
        env=[{"name": "FROM_POOL", "value": "plain"}, {"name": "OVERRIDDEN", "value": "pool"}],
    )
    s = spec(pool, SECRET_TOKEN="s3cret", OVERRIDDEN="spec")
    started = time.monotonic()
    handle = await runtime.create(s)
    created_s = time.monotonic() - started
    await wait_ready(http, handle)
    ready_s = time.monotonic() - started
    print(f"create {created_s * 1000:.0f} ms, ready {ready_s * 1000:.0f} ms", file=sys.stderr)

    info = inspect(handle.container)
    host = info["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["PidsLimit"] == 64
    assert host["Memory"] == 256 << 20
    assert host["MemorySwap"] == 256 << 20
    assert host["NanoCpus"] == 500_000_000
    assert host["Init"] is True
    assert host["RestartPolicy"]["Name"] == "no"
    assert not host["Privileged"]
    assert not host["Binds"]
    assert "/tmp" in host["Tmpfs"]
    assert not info["Mounts"]  # no volumes, no host paths (the /tmp tmpfs is not a mount)
    assert "docker.sock" not in json.dumps(info)
    assert info["Config"]["User"] == "1000:1000"
    assert info["Name"] == f"/sp-{SCOPE}-hardened-{s.sandbox_id[:12]}"
    assert (
        info["Config"]["Labels"].items()
        >= {
            labels.LABEL_SCOPE: SCOPE,
            labels.LABEL_POOL: "hardened",
            labels.LABEL_SANDBOX: s.sandbox_id,
            labels.LABEL_VERSION: pool.version,
        }.items()
    )
    env = info["Config"]["Env"]
    assert {"FROM_POOL=plain", "SECRET_TOKEN=s3cret", "OVERRIDDEN=spec"} <= set(env)
    assert list(info["NetworkSettings"]["Networks"]) == [f"{PREFIX}-egress-disabled"]
    ip = info["NetworkSettings"]["Networks"][f"{PREFIX}-egress-disabled"]["IPAddress"]
    assert handle.addr == f"{ip}:8080"

    echoed = await get_json(http, handle, "/some/path?a=1&b=2")
    assert echoed["hostname"] == handle.container[:12]
    assert (echoed["path"], echoed["query"]) == ("/some/path", "a=1&b=2")

    [observed] = [o for o in await runtime.list(SCOPE) if o.container == handle.container]
    assert (observed.pool, observed.sandbox_id, observed.version) == (
        "hardened",
        s.sandbox_id,
        pool.version,
    )
    assert observed.running
    assert abs(observed.created_s - time.time()) < 120

    started = time.monotonic()
    await runtime.destroy(handle.container)
    destroy_s = time.monotonic() - started
    print(f"destroy {destroy_s * 1000:.0f} ms", file=sys.stderr)
    assert destroy_s < 5, "destroy must not wait for a stop grace period"
    assert sh("docker", "inspect", handle.container, check=False).returncode != 0
    await runtime.destroy(handle.container)  # already gone: fine
    assert handle.container not in {o.container for o in await runtime.list(SCOPE)}


async def test_create_again_returns_the_same_sandbox(
    runtime: DockerRuntime, http: aiohttp.ClientSession
) -> None:
    s = spec(echo_pool("retried"))
    first = await runtime.create(s)
    assert await runtime.create(s) == first  # a retried create adopts its running container
    other = SandboxSpec(scope=SCOPE, pool=s.pool, sandbox_id=s.sandbox_id[:12] + "f" * 20)
    with pytest.raises(SandboxRuntimeError, match="is taken"):
        await runtime.create(other)  # same name, another sandbox: refused, not adopted
    await wait_ready(http, first)
    await runtime.destroy(first.container)


async def test_command_replaces_entrypoint_and_args_the_cmd(
    runtime: DockerRuntime, http: aiohttp.ClientSession
) -> None:
    pool = echo_pool(
        "cmdargs",
        port=9090,
        command=["/usr/bin/env", "PORT=9090"],
        args=["python3", "/opt/echo/echo.py"],
    )
    handle = await runtime.create(spec(pool))
    assert handle.addr.endswith(":9090")
    await wait_ready(http, handle)
    config = inspect(handle.container)["Config"]
    assert config["Entrypoint"] == ["/usr/bin/env", "PORT=9090"]
    assert config["Cmd"] == ["python3", "/opt/echo/echo.py"]
    await runtime.destroy(handle.container)


async def test_exits_reports_own_exits_and_outside_kills(
    runtime: DockerRuntime, http: aiohttp.ClientSession
) -> None:
    pool = echo_pool("exits")
    exiting, killed = await asyncio.gather(runtime.create(spec(pool)), runtime.create(spec(pool)))
    await asyncio.gather(wait_ready(http, exiting), wait_ready(http, killed))
    seen: list[Exit] = []

    async def collect() -> None:
        async for ex in runtime.exits(SCOPE):
            seen.append(ex)

    task = asyncio.create_task(collect())
    # Only once a canary's death shows up do we know the event stream is live.
    canary = await runtime.create(spec(pool))
    await runtime.destroy(canary.container)
    await wait_until(lambda: any(e.container == canary.container for e in seen), timeout=15)

    async with http.get(f"http://{exiting.addr}/exit?code=3") as resp:
        assert resp.status == 200
    sh("docker", "kill", killed.container)
    await wait_until(
        lambda: {exiting.container, killed.container} <= {e.container for e in seen}, timeout=15
    )
    by_id = {e.container: e for e in seen}
    assert by_id[exiting.container].pool == "exits"
    assert (
        by_id[killed.container].sandbox_id
        == inspect(killed.container)["Config"]["Labels"][labels.LABEL_SANDBOX]
    )
    assert inspect(exiting.container)["State"]["ExitCode"] == 3
    observed = {o.container: o for o in await runtime.list(SCOPE)}
    assert not observed[exiting.container].running  # exited, still listed for reconciliation

    started = time.monotonic()
    await runtime.close()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 5
    # A fresh runtime for cleanup: this one is closed.
    rt = DockerRuntime(network_prefix=PREFIX)
    try:
        await asyncio.gather(rt.destroy(exiting.container), rt.destroy(killed.container))
    finally:
        await rt.close()


async def test_exits_iterator_can_be_abandoned(runtime: DockerRuntime) -> None:
    events = runtime.exits(SCOPE)
    waiting = asyncio.create_task(anext(events))
    await asyncio.sleep(0)  # let the iterator subscribe
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    started = time.monotonic()
    await asyncio.wait_for(events.aclose(), 5)
    assert time.monotonic() - started < 5


async def test_missing_image_is_a_clear_error_leaving_nothing(runtime: DockerRuntime) -> None:
    image = f"sessionpool/missing-{uuid.uuid4().hex[:8]}:dev"
    pool = make_pool(
        "missing",
        customContainerTemplate={
            "containers": [{"name": "main", "image": image}],
            "ingress": {"targetPort": 8080},
        },
    )
    before = set(scope_containers())
    s = spec(pool)
    with pytest.raises(SandboxRuntimeError, match="not on the Docker engine") as err:
        await runtime.create(s)
    assert image in str(err.value)
    assert "build.sh" in str(err.value)
    assert set(scope_containers()) == before
    name = f"sp-{SCOPE}-missing-{s.sandbox_id[:12]}"
    assert sh("docker", "inspect", name, check=False).returncode != 0


async def test_cancelled_create_leaves_no_container(runtime: DockerRuntime) -> None:
    await runtime.ensure_network(False)
    s = spec(echo_pool("cancelled"))
    since = f"{time.time() - 1:.3f}"
    task = asyncio.create_task(runtime.create(s))
    await asyncio.sleep(0)  # into the engine call, which a cancel cannot stop
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    def destroyed() -> bool:
        events = sh(
            "docker",
            "events",
            "--since",
            since,
            "--until",
            f"{time.time():.3f}",
            "--filter",
            f"label={labels.LABEL_SANDBOX}={s.sandbox_id}",
            "--filter",
            "event=destroy",
            "--format",
            "{{.ID}}",
        )
        return bool(events.stdout.strip())

    await wait_until(destroyed, timeout=15)
    labelled = sh("docker", "ps", "-aq", "--filter", f"label={labels.LABEL_SANDBOX}={s.sandbox_id}")
    assert labelled.stdout.strip() == ""


async def test_networks_are_created_once_under_concurrency(engine: None) -> None:
    prefix = f"sptest{uuid.uuid4().hex[:6]}"
    runtimes = [DockerRuntime(network_prefix=prefix) for _ in range(3)]
    try:
        names = await asyncio.gather(
            *(rt.ensure_network(e) for rt in runtimes for e in (True, False))
        )
        assert set(names) == {f"{prefix}-egress-enabled", f"{prefix}-egress-disabled"}
        for egress in (True, False):
            rows = json.loads(
                sh(
                    "docker",
                    "network",
                    "inspect",
                    f"{prefix}-egress-{'enabled' if egress else 'disabled'}",
                ).stdout
            )
            assert len(rows) == 1
            [net] = rows
            assert net["Internal"] is (not egress)
            assert net["Options"]["com.docker.network.bridge.enable_icc"] == "false"
            assert net["Options"]["com.docker.network.bridge.name"] == bridge_name(prefix, egress)
        if os.geteuid() == 0:
            for egress in (True, False):
                for rule in firewall_rules(bridge_name(prefix, egress), egress):
                    assert iptables_has(rule), rule
    finally:
        for rt in runtimes:
            await rt.close()
        await remove_networks(prefix)
    assert (
        sh("docker", "network", "inspect", f"{prefix}-egress-enabled", check=False).returncode != 0
    )
    for egress in (True, False):
        for rule in firewall_rules(bridge_name(prefix, egress), egress):
            assert not iptables_has(rule), rule


# Network isolation -------------------------------------------------------------------------


def host_addresses() -> list[str]:
    out = sh("ip", "-4", "-o", "addr", "show").stdout
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return [a for a in addrs if not a.startswith("127.")]


@pytest.fixture
def fake_remote() -> Iterator[tuple[str, str, str, int]]:
    """A TCP server in its own network namespace at a link-local, a private and a public address.

    They stand in for a cloud metadata service, a machine on the operator's private network and
    the internet, all reached *through* the host (FORWARD chain) as real ones would be, so the
    engine's and the runtime's firewall rules decide. No traffic leaves this machine.
    """
    tag = uuid.uuid4().hex[:6]
    ns, host_end, ns_end = f"spt{tag}", f"spt{tag}a", f"spt{tag}b"
    a, b = random.randint(1, 250), random.randint(1, 250)
    link_local, private, public = f"169.254.{a}.{b}", f"10.255.{a}.{b}", f"198.51.100.{b}"
    port = 8080
    in_ns = ("ip", "netns", "exec", ns)
    server = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        sh("ip", "link", "set", ns_end, "netns", ns)
        sh("ip", "link", "set", host_end, "up")
        Path(f"/proc/sys/net/ipv4/conf/{host_end}/proxy_arp").write_text("1")
        for addr in (link_local, private, public):
            sh("ip", "route", "add", f"{addr}/32", "dev", host_end)
            sh(*in_ns, "ip", "addr", "add", f"{addr}/32", "dev", ns_end)
        sh(*in_ns, "ip", "link", "set", "lo", "up")
        sh(*in_ns, "ip", "link", "set", ns_end, "up")
        sh(*in_ns, "ip", "route", "add", "default", "dev", ns_end)
        code = (
            f"import socket\ns = socket.create_server(('0.0.0.0', {port}))\n"
            "while True:\n    s.accept()[0].close()\n"
        )
        server = subprocess.Popen([*in_ns, sys.executable, "-c", code])
        yield link_local, private, public, port
    finally:
        if server is not None:
            server.kill()
            server.wait()
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", host_end, check=False)


async def test_sandboxes_reach_neither_each_other_nor_the_host_nor_metadata(
    runtime: DockerRuntime,
    http: aiohttp.ClientSession,
    fake_remote: tuple[str, str, str, int],
) -> None:
    link_local, private, public, remote_port = fake_remote
    # "The host's services" (Redis, the router's admin API): a server on all host addresses.
    async with recording_server() as (host_port, served):
        closed_pool, open_pool = echo_pool("closed"), echo_pool("open", egress=True)
        a, b, c, d = await asyncio.gather(
            runtime.create(spec(closed_pool)),
            runtime.create(spec(closed_pool)),
            runtime.create(spec(open_pool)),
            runtime.create(spec(open_pool)),
        )
        # The host (this test process) reaches every sandbox.
        await asyncio.gather(*(wait_ready(http, h) for h in (a, b, c, d)))
        addrs = host_addresses()
        gateways = {
            h.container: inspect(h.container)["NetworkSettings"]["Networks"] for h in (a, c)
        }
        gateway_a = gateways[a.container][f"{PREFIX}-egress-disabled"]["Gateway"]
        gateway_c = gateways[c.container][f"{PREFIX}-egress-enabled"]["Gateway"]
        assert {gateway_a, gateway_c} <= set(addrs)
        # Controls: every target is really listening (seen from the host) ...
        for addr in addrs:
            assert await tcp_connects(addr, host_port), addr
        await wait_until(lambda: tcp_connects(link_local, remote_port), timeout=10)
        assert await tcp_connects(private, remote_port)
        assert await tcp_connects(public, remote_port)
        # ... and /connect from inside a sandbox does connect where nothing is in the way.
        for h in (a, c):
            ok = await get_json(http, h, "/connect?host=127.0.0.1&port=8080&timeout_ms=2000")
            assert ok == {"connected": True, "error": None}
        served.clear()

        def ip(h: Handle) -> str:
            return h.addr.split(":")[0]

        targets: dict[str, list[tuple[str, int]]] = {}
        for h, peers in ((a, (b, c)), (c, (d, a))):
            targets[h.container] = [
                *((ip(p), 8080) for p in peers),
                *([(public, remote_port)] if h is a else []),  # EgressDisabled: no way out
                *((addr, host_port) for addr in addrs),
                ("169.254.169.254", 80),
                (link_local, remote_port),
                (private, remote_port),
            ]

        async def attempt(h: Handle, host: str, port: int) -> tuple[str, int, Any]:
            got = await get_json(http, h, f"/connect?host={host}&port={port}&timeout_ms=1500")
            return host, port, got

        results = await asyncio.gather(
            *(attempt(h, host, port) for h in (a, c) for host, port in targets[h.container])
        )
        reached = [(host, port) for host, port, got in results if got["connected"]]
        assert reached == [], f"sandboxes reached {reached}"
        assert served == [], "the host service saw a connection from a sandbox"

        # EgressEnabled: the "internet" (a public address, here on this machine) is reachable.
        out = await get_json(http, c, f"/connect?host={public}&port={remote_port}&timeout_ms=3000")
        assert out == {"connected": True, "error": None}
        await asyncio.gather(*(runtime.destroy(h.container) for h in (a, b, c, d)))
