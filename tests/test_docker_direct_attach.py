"""The docker runtime's direct network attach (`docker_network_attach = "direct"`): sandboxes
with their network disabled, put on the sandbox bridge by the worker itself. What must hold is
what engine mode gives: an address each, reachable from the host, and no way from one sandbox
to another; plus what direct mode adds: IPv6 off, isolated bridge ports, nothing left behind.
(The attacker's side, with a router and a worker, is test_hostile_sessions in both modes.)"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from router.errors import SandboxRuntimeError
from router.pools import Pool
from tests.helpers import (
    docker_runtime_fixtures,
    ensure_image,
    make_pool,
    sh,
    wait_healthy,
    wait_until,
)
from workers.docker import DockerRuntime
from workers.docker_attach import Subnet, open_netns, ports_on
from workers.runtime import Handle, SandboxSpec

pytestmark = pytest.mark.docker

IMAGE = "sessionpool/echo:dev"
SCOPE = f"t{uuid.uuid4().hex[:8]}"
PREFIX = f"spdirect{uuid.uuid4().hex[:6]}"

engine, _ = docker_runtime_fixtures(SCOPE, PREFIX, lambda: ensure_image("echo"))


@pytest.fixture
async def runtime(engine: None) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(network_prefix=PREFIX, network_attach="direct")
    yield rt
    await rt.close()


def echo_pool(name: str, *, egress: bool) -> Pool:
    return make_pool(
        name,
        customContainerTemplate={
            "containers": [{"name": "main", "image": IMAGE}],
            "ingress": {"targetPort": 8080},
        },
        sessionNetworkConfiguration={"status": "EgressEnabled" if egress else "EgressDisabled"},
    )


def spec(pool: Pool) -> SandboxSpec:
    return SandboxSpec(scope=SCOPE, pool=pool, sandbox_id=uuid.uuid4().hex)


def inspect(container: str) -> dict[str, Any]:
    return dict(json.loads(sh("docker", "inspect", container).stdout)[0])


def inside(container: str, *argv: str) -> str:
    """Run a host tool in the sandbox's network namespace only (nothing of its filesystem)."""
    pid = str(inspect(container)["State"]["Pid"])
    return sh("nsenter", "-t", pid, "-n", *argv).stdout


def host_ends(bridge: str) -> set[str]:
    """The links enslaved to `bridge` on the host."""
    return set(ports_on(bridge))


async def connects(http: aiohttp.ClientSession, frm: Handle, to: str) -> Any:
    url = f"http://{frm.addr}/connect?host={to}&port=8080&timeout_ms=1500"
    async with http.get(url) as r:
        assert r.status == 200
        return await r.json()


async def test_direct_sandboxes_are_addressed_reachable_isolated_and_leave_nothing(
    runtime: DockerRuntime,
) -> None:
    disabled, enabled = echo_pool("direct-i", egress=False), echo_pool("direct-e", egress=True)
    specs = [spec(disabled) for _ in range(6)] + [spec(enabled) for _ in range(2)]
    handles = await asyncio.gather(*(runtime.create(s) for s in specs))
    handle_pool = {h.container: s.pool for h, s in zip(handles, specs, strict=True)}
    ips = [h.addr.split(":")[0] for h in handles]
    assert len(set(ips)) == len(ips), ips  # one address each, however many start at once

    async with aiohttp.ClientSession() as http:
        for handle in handles:  # the host (the router) reaches every one
            await wait_healthy(http, handle.addr)

        bridges = {}
        for egress, handle in ((False, handles[0]), (True, handles[-1])):
            name = runtime.network_name(egress)
            assert name.endswith(f"-direct-egress-{'enabled' if egress else 'disabled'}")
            net = json.loads(sh("docker", "network", "inspect", name).stdout)[0]
            subnet = Subnet.of(net["Options"]["com.docker.network.bridge.name"], net)
            bridges[egress] = subnet.bridge
            assert ipaddress.ip_address(handle.addr.split(":")[0]) in subnet.network
            assert not net["Containers"]  # the engine attached nothing: every address is ours

            info = inspect(handle.container)
            assert info["HostConfig"]["NetworkMode"] == "none"
            assert info["Config"]["NetworkDisabled"] is True
            # Only the network differs from engine attach: the same hardening and limits.
            host = info["HostConfig"]
            limits = runtime.limits.resolve(handle_pool[handle.container])
            assert host["CapDrop"] == ["ALL"] and host["CapAdd"] in (None, [])
            assert "no-new-privileges" in host["SecurityOpt"]
            assert (host["PidsLimit"], host["Memory"], host["MemorySwap"]) == (
                limits.pids,
                limits.memory_bytes,
                limits.memory_bytes,
            )
            assert host["NanoCpus"] == int(limits.cpu * 1e9)
            # IPv6 off, so nothing bypasses the IPv4 rules; a default route only with egress.
            assert inside(handle.container, "cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6") == (
                "1\n"
            )
            assert "inet6" not in inside(handle.container, "ip", "address", "show", "eth0")
            routes = inside(handle.container, "ip", "route", "show", "default")
            assert (f"via {subnet.gateway}" in routes) is egress, routes

        # Every host end is an isolated port of its bridge.
        ends = host_ends(bridges[False]) | host_ends(bridges[True])
        assert len(ends) >= len(handles)
        for end in ends:
            assert "isolated on" in sh("ip", "-d", "link", "show", end).stdout, end

        with pytest.raises(SandboxRuntimeError, match="sandboxes are attached"):
            await runtime.remove_networks()  # not from under running sandboxes

        # No sandbox reaches another, on either network; each reaches its own port.
        a, b, e1, e2 = handles[0], handles[1], handles[-2], handles[-1]
        for frm, to in ((a, b), (b, a), (e1, e2), (e2, a)):
            got = await connects(http, frm, to.addr.split(":")[0])
            assert got["connected"] is False, (frm.addr, to.addr, got)
        assert (await connects(http, a, "127.0.0.1"))["connected"] is True

    # Removal takes the pair along with the namespace: no link and no address left.
    await asyncio.gather(*(runtime.destroy(h.container) for h in handles))
    await wait_until(lambda: not (host_ends(bridges[False]) | host_ends(bridges[True])))


async def test_a_retried_create_adopts_its_attached_sandbox(runtime: DockerRuntime) -> None:
    s = spec(echo_pool("direct-retry", egress=False))
    first = await runtime.create(s)
    try:
        assert await runtime.create(s) == first  # the address read back from its eth0
    finally:
        await runtime.destroy(first.container)


async def test_without_its_tools_direct_mode_refuses_to_start_anything(
    monkeypatch: pytest.MonkeyPatch, engine: None
) -> None:
    rt = DockerRuntime(network_prefix=PREFIX, network_attach="direct")
    await rt.ensure_network(False)  # its firewall rules need iptables: in place before
    monkeypatch.setenv("PATH", "/nonexistent")  # no `ip`, no `nsenter`
    try:
        with pytest.raises(SandboxRuntimeError, match="missing ip, nsenter"):
            await rt.create(spec(echo_pool("direct-notools", egress=False)))
    finally:
        monkeypatch.undo()
        await rt.close()
    out = sh("docker", "ps", "-aq", "--filter", "name=direct-notools").stdout
    assert out.split() == []


async def test_an_address_held_elsewhere_is_skipped_and_left_alone(
    monkeypatch: pytest.MonkeyPatch, runtime: DockerRuntime
) -> None:
    """The host end's name is the claim: a taken one (another worker's sandbox) makes the
    attach try another address, and the holder's link is not touched."""
    pool = echo_pool("direct-taken", egress=False)
    name = runtime.network_name(False)
    await runtime.ensure_network(False)
    net = json.loads(sh("docker", "network", "inspect", name).stdout)[0]
    subnet = Subnet.of(net["Options"]["com.docker.network.bridge.name"], net)
    taken, free = subnet.network.network_address + 7, subnet.network.network_address + 9
    holder = subnet.link_name(taken)
    sh("ip", "link", "add", holder, "type", "veth", "peer", "name", f"{holder[:12]}p")
    picks = iter([taken, free])
    monkeypatch.setattr(Subnet, "pick", lambda self: next(picks))
    try:
        handle = await runtime.create(spec(pool))
        assert handle.addr == f"{free}:8080"
        assert sh("ip", "link", "show", holder, check=False).returncode == 0  # untouched
        await runtime.destroy(handle.container)
    finally:
        sh("ip", "link", "del", holder, check=False)


def test_the_hosts_own_namespace_is_never_configured() -> None:
    """A pid that is not in a sandbox (a recycled one, say) must not point the attach at the
    host: IPv6 off, a new eth0 and a default route would be the host's."""
    with pytest.raises(SandboxRuntimeError, match="this host's network namespace"):
        with open_netns(os.getpid()):
            pass
