"""The `docker` runtime: each sandbox is a hardened container of one Docker engine.

The runtime is split by noun: this module creates, lists and removes containers;
`docker_firewall` owns the sandbox networks and the host firewall rules that keep sandboxes
away from the host (its docstring says why they are needed); `docker_attach` puts a sandbox
on its network itself when `docker_network_attach` is `direct`; `docker_events` follows the
engine's event stream for exits; `docker_engine` holds the client and its errors. Only these
modules import `docker`, and every blocking SDK call runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from docker.errors import APIError, ImageNotFound, NotFound
from docker.models.containers import _create_container_args

from router.errors import SandboxRuntimeError
from router.limits import LimitPolicy, Limits
from router.pools import Pool
from router.settings import Settings
from workers import docker_attach
from workers.docker_attach import Subnet
from workers.docker_engine import ENGINE_ERRORS, connect, explain, is_local
from workers.docker_events import ExitFollower
from workers.docker_firewall import SandboxNetworks, bridge_name
from workers.docker_storage import Storage
from workers.runtime import (
    LABEL_SCOPE,
    Exit,
    Handle,
    Observed,
    SandboxSpec,
)

log = logging.getLogger("sessionpool.docker")


class DockerRuntime:
    """Sandboxes as hardened containers of one Docker engine (local socket or `base_url`)."""

    name = "docker"

    def __init__(
        self,
        network_prefix: str = "sessionpool",
        client: Any = None,
        base_url: str | None = None,
        *,
        limits: LimitPolicy | None = None,
        firewall_check_s: float = 10.0,
        insecure_skip_host_firewall: bool = False,
        iptables: str = "iptables",
        network_attach: str = "engine",
    ) -> None:
        self.network_prefix = network_prefix
        self.limits = limits or LimitPolicy()
        self._client: Any = client
        self._base_url = base_url
        self._client_lock = asyncio.Lock()
        # Direct mode has networks of its own: the engine attaches nothing to them, so every
        # address of their subnets is the attach's to hand out (workers/docker_attach.py).
        self._direct = network_attach == "direct"
        self._subnets: dict[bool, Subnet] = {}
        self._networks = SandboxNetworks(
            network_prefix + ("-direct" if self._direct else ""),
            check_s=firewall_check_s,
            skip_firewall=insecure_skip_host_firewall,
            iptables=iptables,
        )
        self._storage = Storage()
        self._exits = ExitFollower()
        self._cleanups: set[asyncio.Task[None]] = set()
        self._engine_id = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerRuntime:
        return cls(
            network_prefix=settings.network_prefix,
            limits=LimitPolicy.from_settings(settings),
            firewall_check_s=settings.firewall_check_s,
            insecure_skip_host_firewall=settings.insecure_skip_host_firewall,
            network_attach=settings.docker_network_attach,
        )

    def network_name(self, egress: bool) -> str:
        return self._networks.name(egress)

    async def ensure_network(self, egress: bool) -> str:
        """The sandbox network for this egress policy, made with its firewall on first use.

        Raises:
            SandboxRuntimeError: the engine is unreachable or refused the network.
        """
        return await self._networks.ensure(await self._docker(), egress)

    async def create(self, spec: SandboxSpec) -> Handle:
        """Create and start a sandbox; return its container id and `<ip>:<target port>`.

        The sandbox starts only once its network's firewall rules are in place and the engine
        reports back every limit it was created with (fail closed).

        Raises:
            SandboxRuntimeError: the image is missing, the engine refused or is unreachable, the
                firewall rules cannot be installed, or a limit is not in force.
        """
        pool = spec.pool
        limits = self.limits.resolve(pool)
        network = await self.ensure_network(pool.egress_enabled)
        client = await self._docker()
        subnet = await self._subnet(client, network, pool.egress_enabled) if self._direct else None
        env = {e.name: e.value for e in pool.env if e.value is not None}
        env.update(spec.env)
        kwargs: dict[str, Any] = {
            "name": f"sp-{spec.scope}-{pool.name}-{spec.sandbox_id[:12]}",
            "labels": spec.labels,
            "environment": env,
            # ACA/Kubernetes semantics: `command` replaces the entrypoint, `args` the cmd.
            # Docker drops the image's CMD when the entrypoint is overridden, as Kubernetes does.
            "entrypoint": list(pool.command) or None,
            "command": list(pool.args) or None,
            "detach": True,
            # Hardening (SPEC §6). No capability is added back: images run as non-root, and
            # Docker already lets unprivileged users bind ports below 1024 in the container.
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "init": True,
            "restart_policy": {"Name": "no"},
            # Limits, always (router/limits.py): the pool's own, else the operator's defaults.
            "nano_cpus": int(limits.cpu * 1e9),
            "mem_limit": limits.memory_bytes,
            "memswap_limit": limits.memory_bytes,  # no swap on top
            "pids_limit": limits.pids,
        }
        if subnet is None:
            kwargs["network"] = network
        else:  # its own empty namespace; attached after start
            kwargs |= {"network_mode": "none", "network_disabled": True}
        if pool.oci_runtime is not None:
            kwargs["runtime"] = pool.oci_runtime
        creating = asyncio.ensure_future(
            asyncio.to_thread(self._create_sync, client, kwargs, network, spec, limits, subnet)
        )
        try:
            ip = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # The thread cannot be stopped: remove the container it makes once it is done.
            creating.add_done_callback(self._remove_abandoned)
            raise
        except SandboxRuntimeError:
            raise
        except ENGINE_ERRORS as exc:
            if isinstance(exc, NotFound) and not isinstance(exc, ImageNotFound):
                self._networks.forget(pool.egress_enabled)  # removed behind our back?
                self._subnets.pop(pool.egress_enabled, None)
            raise _refused(pool, exc) from exc
        return Handle(ip[0], f"{ip[1]}:{pool.target_port}")

    async def _subnet(self, client: Any, network: str, egress: bool) -> Subnet:
        """The direct-mode network's addressing (read once), after checking the attach can
        run here at all.

        Raises:
            SandboxRuntimeError: not root next to a local engine, `ip`/`nsenter` missing, or
                the network has no IPv4 subnet.
        """
        if egress in self._subnets:
            return self._subnets[egress]
        missing = docker_attach.missing_tools()
        if os.geteuid() != 0 or not is_local(client) or missing:
            why = f"missing {', '.join(missing)}" if missing else "not root next to a local engine"
            raise SandboxRuntimeError(
                f"docker_network_attach=direct: the worker attaches sandboxes itself and "
                f"cannot here ({why}); run it as root on the Docker host with iproute2 and "
                f"util-linux, or use docker_network_attach=engine"
            )
        try:
            info = await asyncio.to_thread(client.api.inspect_network, network)
        except ENGINE_ERRORS as exc:
            raise SandboxRuntimeError(f"network {network}: {explain(exc)}") from exc
        bridge = info.get("Options", {}).get("com.docker.network.bridge.name", "")
        self._subnets[egress] = subnet = Subnet.of(bridge, info)
        return subnet

    def _remove_abandoned(self, done: asyncio.Future[tuple[str, str]]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        task = asyncio.get_running_loop().create_task(self.destroy(done.result()[0]))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def _create_sync(
        self,
        client: Any,
        kwargs: dict[str, Any],
        network: str,
        spec: SandboxSpec,
        limits: Limits,
        subnet: Subnet | None,
    ) -> tuple[str, str]:
        """create, inspect, start, inspect (create never pulls: an absent image is an error
        here). The SDK's `containers.create` would add a call (it inspects the new container
        to build its model object), so the same arguments go to the low-level API. The first
        inspect is the fail-closed check: the container starts only with every limit applied."""
        home = kwargs["environment"].get("HOME")
        kwargs |= self._storage.plan(
            client, spec.pool.image, limits.storage_bytes, home, (spec.scope, spec.pool.name)
        )
        try:
            created = client.api.create_container(
                **_create_container_args(
                    {**kwargs, "image": spec.pool.image, "version": client.api._version}
                )
            )
        except APIError as exc:
            if exc.status_code != 409:
                raise
            return self._adopt(client, kwargs["name"], network, spec, exc, subnet)
        cid = str(created["Id"])
        try:
            missing = limits_not_in_force(client.api.inspect_container(cid), kwargs)
            if missing:
                raise SandboxRuntimeError(
                    f"pool {spec.pool.name}: the engine did not apply {', '.join(missing)}: "
                    f"sandbox not started"
                )
            client.api.start(cid)
            info = client.api.inspect_container(cid)
            if subnet is not None:
                ip = self._attach(client, cid, info["State"]["Pid"], subnet, spec)
            else:
                ip = info["NetworkSettings"]["Networks"][network]["IPAddress"]
            if not ip:
                raise SandboxRuntimeError(
                    f"pool {spec.pool.name}: container {cid[:12]} has no address on {network}"
                )
        except BaseException:
            with contextlib.suppress(*ENGINE_ERRORS):
                client.api.remove_container(cid, force=True)
            raise
        return cid, ip

    def _attach(self, client: Any, cid: str, pid: int, subnet: Subnet, spec: SandboxSpec) -> str:
        """Attach the started sandbox (direct mode); its address."""
        with docker_attach.open_netns(pid) as netns:
            # The pid was read before its namespace was opened: still the sandbox's? (After
            # this the namespace is held by descriptor, whatever happens to the pid.)
            state = client.api.inspect_container(cid)["State"]
            if not state["Running"] or state["Pid"] != pid:
                raise SandboxRuntimeError(
                    f"pool {spec.pool.name}: container {cid[:12]} exited while it was attached"
                )
            return docker_attach.attach(subnet, netns, spec.pool.egress_enabled)

    def _adopt(
        self,
        client: Any,
        name: str,
        network: str,
        spec: SandboxSpec,
        exc: APIError,
        subnet: Subnet | None,
    ) -> tuple[str, str]:
        """A retried create of the same sandbox finds its running container: return it."""
        try:
            info = client.api.inspect_container(name)
        except NotFound:
            raise exc from None
        taken = SandboxRuntimeError(
            f"pool {spec.pool.name}: container name {name} is taken by another or a stopped "
            f"container"
        )
        if not spec.owns(info["Config"]["Labels"] or {}) or not info["State"]["Running"]:
            raise taken from exc
        if subnet is None:
            ip = (info["NetworkSettings"]["Networks"].get(network) or {}).get("IPAddress")
        else:
            with docker_attach.open_netns(info["State"]["Pid"]) as netns:
                ip = docker_attach.address_of(netns)
        if not ip:
            raise taken from exc
        return str(info["Id"]), str(ip)

    async def destroy(self, container: str) -> None:
        """Kill and remove a sandbox at once (no stop grace: the session is over)."""
        client = await self._docker()
        try:
            await asyncio.to_thread(client.api.remove_container, container, force=True)
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code == 409 and "already in progress" in str(exc):
                return
            raise SandboxRuntimeError(f"destroy {container[:12]}: {explain(exc)}") from exc
        except ENGINE_ERRORS as exc:
            raise SandboxRuntimeError(f"destroy {container[:12]}: {explain(exc)}") from exc

    async def list(self, scope: str) -> list[Observed]:
        """Every container of this scope, running or not."""
        client = await self._docker()
        try:
            rows = await asyncio.to_thread(
                client.api.containers, all=True, filters={"label": f"{LABEL_SCOPE}={scope}"}
            )
        except ENGINE_ERRORS as exc:
            raise SandboxRuntimeError(f"list: {explain(exc)}") from exc
        out = []
        for row in rows:
            labels = row.get("Labels") or {}
            out.append(
                Observed.of(
                    row["Id"],
                    labels,
                    # Alive unless it exited: a container being started ("created") or
                    # paused (a stall) is not an exit.
                    running=row.get("State") not in ("exited", "dead"),
                    created_s=float(row.get("Created", 0)),
                )
            )
        return out

    async def exits(self, scope: str) -> AsyncIterator[Exit]:
        """Containers of this scope that die, as they die; ends when the runtime closes."""
        client = await self._docker()
        async with contextlib.aclosing(self._exits.follow(client, scope)) as exits:
            async for item in exits:
                yield item

    async def close(self) -> None:
        """End every `exits()` iterator, the firewall check, and the engine connection."""
        await self._exits.close()
        await self._networks.close()
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    async def remove_networks(self) -> None:
        """Remove this prefix's sandbox networks and their firewall rules (tests, uninstall).

        Raises:
            SandboxRuntimeError: a network still has containers attached.
        """
        if self._direct:  # the engine does not know of the sandboxes attached directly
            for egress in (False, True):
                bridge = bridge_name(self._networks.network_prefix, egress)
                if await asyncio.to_thread(docker_attach.ports_on, bridge):
                    raise SandboxRuntimeError(
                        f"remove network {self.network_name(egress)}: sandboxes are attached"
                    )
        await self._networks.remove(await self._docker())

    async def engine_id(self) -> str:
        """`docker:<the engine's ID>` (from `docker info`; kept for the runtime's life)."""
        if self._engine_id:
            return self._engine_id
        client = await self._docker()
        try:
            info = await asyncio.to_thread(client.info)
        except ENGINE_ERRORS as exc:
            raise SandboxRuntimeError(f"docker info: {explain(exc)}") from exc
        self._engine_id = f"docker:{info.get('ID') or info.get('Name', '')}"
        return self._engine_id

    async def _docker(self) -> Any:
        """The SDK client, made on first use (making one asks the engine for its version)."""
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                self._client = await asyncio.to_thread(connect, self._base_url)
            return self._client


def _refused(pool: Pool, exc: BaseException) -> SandboxRuntimeError:
    if isinstance(exc, ImageNotFound):
        return SandboxRuntimeError(
            f"pool {pool.name}: image {pool.image!r} is not on the Docker engine; build it "
            f"(deploy/images/build.sh <name> for sessionpool/<name>:dev) or "
            f"`docker pull {pool.image}`"
        )
    return SandboxRuntimeError(f"pool {pool.name}: docker refused the sandbox: {explain(exc)}")


def limits_not_in_force(info: dict[str, Any], kwargs: dict[str, Any]) -> list[str]:
    """The limits and hardening a created container does not carry, as the engine reports it.

    Read back rather than trusted: an engine or OCI runtime that ignores a setting (no pids
    cgroup, a storage option dropped) must not get a sandbox started without it.
    """
    host = info.get("HostConfig") or {}
    expected = {
        "NanoCpus": kwargs["nano_cpus"],
        "Memory": kwargs["mem_limit"],
        "MemorySwap": kwargs["memswap_limit"],
        "PidsLimit": kwargs["pids_limit"],
        "ReadonlyRootfs": kwargs.get("read_only", False),
    }
    missing = [f"{key}={want}" for key, want in expected.items() if host.get(key) != want]
    if "ALL" not in (host.get("CapDrop") or []):
        missing.append("CapDrop=ALL")
    if not any(o.startswith("no-new-privileges") for o in host.get("SecurityOpt") or []):
        missing.append("no-new-privileges")
    if "storage_opt" in kwargs and (host.get("StorageOpt") or {}) != kwargs["storage_opt"]:
        missing.append(f"StorageOpt={kwargs['storage_opt']}")
    tmpfs = host.get("Tmpfs") or {}
    for path, opts in (kwargs.get("tmpfs") or {}).items():
        if tmpfs.get(path) != opts:
            missing.append(f"Tmpfs {path}")
    return missing
