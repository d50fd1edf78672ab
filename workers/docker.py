"""The `docker` runtime: each sandbox is a hardened container on a per-policy bridge network.

Every sandbox joins one of two user-defined bridge networks per `network_prefix`:
`<prefix>-egress-disabled` (`internal`: no route out) or `<prefix>-egress-enabled`, both with
inter-container traffic off. The router reaches a sandbox at its container IP on that network
and the pool's target port (`Handle.addr`), which is routable from the Docker host itself: run
the router on the host, or in a container with `network_mode: host`. No ports are published.

Docker's `internal` and `enable_icc` settings do not stop a container from connecting to the
host through its bridge's gateway (that traffic meets the host's INPUT chain, not FORWARD), so
when it runs as root next to a local engine this runtime also installs, per sandbox bridge:

    iptables -I INPUT -i <bridge> -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP
    iptables -I DOCKER-USER -i <bridge> -d 169.254.0.0/16 \
        -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP
    # egress-enabled bridge only, for each of 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16
    # 100.64.0.0/10:
    iptables -I DOCKER-USER -i <bridge> -d <range> -m conntrack ! --ctstate ESTABLISHED,RELATED \
        -j DROP

Connections the host opens to a sandbox keep working (their replies are ESTABLISHED); what a
sandbox opens towards the host, metadata services or private networks is dropped. Where the
rules cannot be installed, a warning lists the exact commands for the operator.

This is the only module that imports `docker`; every blocking SDK call runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from workers.runtime import (
    LABEL_POOL,
    LABEL_SANDBOX,
    LABEL_SCOPE,
    LABEL_VERSION,
    Exit,
    Handle,
    Observed,
    RuntimeError_,
    SandboxSpec,
)

log = logging.getLogger("sessionpool.docker")
T = TypeVar("T")

LINK_LOCAL = "169.254.0.0/16"
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
NOT_REPLY = ("-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED", "-j", "DROP")
# requests' connection errors (engine down) are OSErrors, not DockerExceptions.
ENGINE_ERRORS = (DockerException, OSError)
TMP_MAX_BYTES = 256 << 20
EVENT_RETRY_MAX_S = 2.0


def bridge_name(network_prefix: str, egress: bool) -> str:
    """The Linux bridge of a sandbox network: fixed, so firewall rules can name it (≤15 chars)."""
    digest = hashlib.sha256(network_prefix.encode()).hexdigest()[:9]
    return f"spb-{digest}{'e' if egress else 'i'}"


def firewall_rules(bridge: str, egress: bool) -> list[tuple[str, ...]]:
    """The iptables rules (chain first) that keep a sandbox bridge away from the host."""
    rules = [
        ("INPUT", "-i", bridge, *NOT_REPLY),
        ("DOCKER-USER", "-i", bridge, "-d", LINK_LOCAL, *NOT_REPLY),
    ]
    if egress:
        rules += [("DOCKER-USER", "-i", bridge, "-d", net, *NOT_REPLY) for net in PRIVATE_RANGES]
    return rules


class DockerRuntime:
    """Sandboxes as hardened containers of one Docker engine (local socket or `base_url`)."""

    name = "docker"

    def __init__(
        self, network_prefix: str = "sessionpool", client: Any = None, base_url: str | None = None
    ) -> None:
        self.network_prefix = network_prefix
        self._client: Any = client
        self._base_url = base_url
        self._client_lock = asyncio.Lock()
        self._networks: dict[bool, str] = {}  # egress enabled → network id
        self._network_locks = {True: asyncio.Lock(), False: asyncio.Lock()}
        self._streams: set[Any] = set()  # open event streams, closed by close()
        self._stops: set[threading.Event] = set()  # one per exits() iterator
        self._closed = False
        self._cleanups: set[asyncio.Task[None]] = set()

    def network_name(self, egress: bool) -> str:
        return f"{self.network_prefix}-egress-{'enabled' if egress else 'disabled'}"

    # Runtime ----------------------------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> Handle:
        """Create and start a sandbox; return its container id and `<ip>:<target port>`.

        Raises:
            RuntimeError_: the image is missing, the engine refused or is unreachable.
        """
        pool = spec.pool
        network = await self._ensure_network(pool.egress_enabled)
        env = {e.name: e.value for e in pool.env if e.value is not None}
        env.update(spec.env)
        labels = {
            LABEL_SCOPE: spec.scope,
            LABEL_POOL: pool.name,
            LABEL_SANDBOX: spec.sandbox_id,
            LABEL_VERSION: pool.version,
        }
        tmp_bytes = min(
            TMP_MAX_BYTES, pool.memory_bytes // 2 if pool.memory_bytes else TMP_MAX_BYTES
        )
        kwargs: dict[str, Any] = {
            "name": f"sp-{spec.scope}-{pool.name}-{spec.sandbox_id[:12]}",
            "labels": labels,
            "environment": env,
            # ACA/Kubernetes semantics: `command` replaces the entrypoint, `args` the cmd.
            # Docker drops the image's CMD when the entrypoint is overridden, as Kubernetes does.
            "entrypoint": list(pool.command) or None,
            "command": list(pool.args) or None,
            "network": network,
            "detach": True,
            # Hardening (SPEC §6). No capability is added back: images run as non-root, and
            # Docker already lets unprivileged users bind ports below 1024 in the container.
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "pids_limit": pool.pids_limit,
            "init": True,
            "restart_policy": {"Name": "no"},
            "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={tmp_bytes}"},
        }
        if pool.memory_bytes is not None:
            kwargs["mem_limit"] = pool.memory_bytes
            kwargs["memswap_limit"] = pool.memory_bytes  # no swap on top
        if pool.cpu is not None:
            kwargs["nano_cpus"] = int(pool.cpu * 1e9)
        if pool.oci_runtime is not None:
            kwargs["runtime"] = pool.oci_runtime
        client = await self._docker()
        creating = asyncio.ensure_future(
            asyncio.to_thread(self._create_sync, client, kwargs, network, spec)
        )
        try:
            ip = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # The thread cannot be stopped: remove the container it makes once it is done.
            creating.add_done_callback(self._remove_abandoned)
            raise
        except RuntimeError_:
            raise
        except ImageNotFound as exc:
            raise RuntimeError_(
                f"pool {pool.name}: image {pool.image!r} is not on the Docker engine; build it "
                f"(deploy/images/build.sh <name> for sessionpool/<name>:dev) or "
                f"`docker pull {pool.image}`"
            ) from exc
        except ENGINE_ERRORS as exc:
            if isinstance(exc, NotFound):
                self._networks.pop(pool.egress_enabled, None)  # removed behind our back?
            raise RuntimeError_(
                f"pool {pool.name}: docker refused the sandbox: {_explain(exc)}"
            ) from exc
        return Handle(ip[0], f"{ip[1]}:{pool.target_port}")

    def _remove_abandoned(self, done: asyncio.Future[tuple[str, str]]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        task = asyncio.get_running_loop().create_task(self.destroy(done.result()[0]))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def _create_sync(
        self, client: Any, kwargs: dict[str, Any], network: str, spec: SandboxSpec
    ) -> tuple[str, str]:
        """containers.create + start (create never pulls: an absent image is an error here)."""
        try:
            container = client.containers.create(spec.pool.image, **kwargs)
        except APIError as exc:
            if exc.status_code != 409:
                raise
            return self._adopt(client, kwargs["name"], network, spec, exc)
        try:
            container.start()
            info = client.api.inspect_container(container.id)
            ip = info["NetworkSettings"]["Networks"][network]["IPAddress"]
            if not ip:
                raise RuntimeError_(
                    f"pool {spec.pool.name}: container {container.id[:12]} "
                    f"has no address on {network}"
                )
        except BaseException:
            with contextlib.suppress(*ENGINE_ERRORS):
                client.api.remove_container(container.id, force=True)
            raise
        return container.id, ip

    def _adopt(
        self, client: Any, name: str, network: str, spec: SandboxSpec, exc: APIError
    ) -> tuple[str, str]:
        """A retried create of the same sandbox finds its running container: return it."""
        try:
            info = client.api.inspect_container(name)
        except NotFound:
            raise exc from None
        labels = info["Config"]["Labels"] or {}
        net = info["NetworkSettings"]["Networks"].get(network) or {}
        if (
            labels.get(LABEL_SCOPE) != spec.scope
            or labels.get(LABEL_SANDBOX) != spec.sandbox_id
            or not info["State"]["Running"]
            or not net.get("IPAddress")
        ):
            raise RuntimeError_(
                f"pool {spec.pool.name}: container name {name} is taken by "
                f"another or a stopped container"
            ) from exc
        return str(info["Id"]), str(net["IPAddress"])

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
            raise RuntimeError_(f"destroy {container[:12]}: {_explain(exc)}") from exc
        except ENGINE_ERRORS as exc:
            raise RuntimeError_(f"destroy {container[:12]}: {_explain(exc)}") from exc

    async def list(self, scope: str) -> list[Observed]:
        """Every container of this scope, running or not."""
        client = await self._docker()
        try:
            rows = await asyncio.to_thread(
                client.api.containers, all=True, filters={"label": f"{LABEL_SCOPE}={scope}"}
            )
        except ENGINE_ERRORS as exc:
            raise RuntimeError_(f"list: {_explain(exc)}") from exc
        out = []
        for row in rows:
            labels = row.get("Labels") or {}
            out.append(
                Observed(
                    container=row["Id"],
                    pool=labels.get(LABEL_POOL, ""),
                    sandbox_id=labels.get(LABEL_SANDBOX, ""),
                    version=labels.get(LABEL_VERSION, ""),
                    # Alive unless it exited: a container being started ("created") or
                    # paused (a stall) is not an exit.
                    running=row.get("State") not in ("exited", "dead"),
                    created_s=float(row.get("Created", 0)),
                )
            )
        return out

    async def exits(self, scope: str) -> AsyncIterator[Exit]:
        """Containers of this scope that die, as they die; ends when the runtime closes.

        A thread follows Docker's event stream and hands events to the loop. When the stream
        breaks (engine restart) it reconnects with `since` the last event, so none is lost in
        between (one may come twice: consumers are idempotent).
        """
        client = await self._docker()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Exit | None] = asyncio.Queue()
        stop = threading.Event()
        self._stops.add(stop)
        if self._closed:
            stop.set()
        opened = threading.Event()
        current: list[Any] = []  # the follower's open stream, for closing it from outside
        filters = {"type": "container", "event": "die", "label": f"{LABEL_SCOPE}={scope}"}

        def deliver(item: Exit | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def follow() -> None:
            since: str | None = None
            delay_s = 0.1
            try:
                while not stop.is_set():
                    try:
                        stream = client.api.events(decode=True, filters=filters, since=since)
                    except ENGINE_ERRORS as exc:
                        log.warning("docker events (scope %s): %s", scope, _explain(exc))
                        opened.set()
                        stop.wait(delay_s)
                        delay_s = min(EVENT_RETRY_MAX_S, delay_s * 2)
                        continue
                    if since is None:  # resume point should the stream break before an event
                        since = f"{time.time() - 1:.9f}"
                    # Register, then check: close() and the iterator's end either see the
                    # stream here or this thread sees their flag.
                    current.append(stream)
                    self._streams.add(stream)
                    opened.set()
                    try:
                        if stop.is_set():
                            break
                        for event in stream:
                            delay_s = 0.1
                            nanos = int(event.get("timeNano") or 0)
                            if nanos:
                                since = f"{nanos // 10**9}.{nanos % 10**9:09d}"
                            attrs = (event.get("Actor") or {}).get("Attributes") or {}
                            deliver(
                                Exit(
                                    str(event.get("id", "")),
                                    attrs.get(LABEL_POOL, ""),
                                    attrs.get(LABEL_SANDBOX, ""),
                                )
                            )
                    finally:
                        current.remove(stream)
                        self._streams.discard(stream)
                        _close_stream(stream)
                    stop.wait(delay_s)
            finally:
                opened.set()
                deliver(None)

        thread = threading.Thread(target=follow, name=f"docker-events-{scope}", daemon=True)
        thread.start()
        # Subscribed before the first item is awaited: a later exit is never missed.
        await asyncio.to_thread(opened.wait, 10.0)
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            stop.set()
            self._stops.discard(stop)
            for stream in list(current):
                _close_stream(stream)
            await asyncio.to_thread(thread.join, 5.0)

    async def close(self) -> None:
        """End every `exits()` iterator and release the engine connection."""
        self._closed = True
        for stop in list(self._stops):
            stop.set()
        for stream in list(self._streams):
            await asyncio.to_thread(_close_stream, stream)
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    # Networks ---------------------------------------------------------------------------------

    async def remove_networks(self) -> None:
        """Remove this prefix's sandbox networks and their firewall rules (tests, uninstall).

        Raises:
            RuntimeError_: a network still has containers attached.
        """
        client = await self._docker()
        for egress in (False, True):
            name = self.network_name(egress)
            try:
                await asyncio.to_thread(client.api.remove_network, name)
            except NotFound:
                pass
            except ENGINE_ERRORS as exc:
                raise RuntimeError_(f"remove network {name}: {_explain(exc)}") from exc
            self._networks.pop(egress, None)
            if self._can_firewall(client):
                bridge = bridge_name(self.network_prefix, egress)
                for rule in firewall_rules(bridge, egress):
                    while await _iptables("-C", *rule) == 0:
                        await _iptables("-D", *rule)

    async def _ensure_network(self, egress: bool) -> str:
        """The sandbox network for this policy, created (with its firewall) on first use."""
        if egress in self._networks:
            return self.network_name(egress)
        async with self._network_locks[egress]:
            if egress in self._networks:
                return self.network_name(egress)
            client = await self._docker()
            name = self.network_name(egress)
            bridge = bridge_name(self.network_prefix, egress)
            try:
                net_id = await asyncio.to_thread(self._network_sync, client, name, bridge, egress)
            except ENGINE_ERRORS as exc:
                raise RuntimeError_(f"network {name}: {_explain(exc)}") from exc
            await self._install_firewall(client, bridge, egress)
            self._networks[egress] = net_id
            return name

    def _network_sync(self, client: Any, name: str, bridge: str, egress: bool) -> str:
        found = _find_network(client, name)
        if found is not None:
            return found
        try:
            created = client.api.create_network(
                name,
                driver="bridge",
                internal=not egress,
                check_duplicate=True,
                options={
                    "com.docker.network.bridge.enable_icc": "false",
                    "com.docker.network.bridge.name": bridge,
                },
                labels={"io.sessionpool.network-prefix": self.network_prefix},
            )
            return str(created["Id"])
        except APIError:
            # Another worker won the race (same name, or the same bridge name): use its network.
            found = _find_network(client, name)
            if found is None:
                raise
            return found

    def _can_firewall(self, client: Any) -> bool:
        local = str(getattr(client.api, "base_url", "")).startswith("http+docker://")
        return local and os.geteuid() == 0 and shutil.which("iptables") is not None

    async def _install_firewall(self, client: Any, bridge: str, egress: bool) -> None:
        rules = firewall_rules(bridge, egress)
        if self._can_firewall(client):
            failed = []
            for rule in rules:
                if await _iptables("-C", *rule) != 0 and await _iptables("-I", *rule) != 0:
                    failed.append(rule)
            if not failed:
                return
            rules = failed
            why = "iptables refused them"
        else:
            why = "not root, no iptables, or the Docker engine is not local"
        commands = "; ".join("iptables -I " + " ".join(rule) for rule in rules)
        log.warning(
            "sandbox network %s: firewall rules not installed (%s); sandboxes can "
            "reach this host's services until the operator runs on the Docker host: %s",
            bridge,
            why,
            commands,
        )

    # Client -----------------------------------------------------------------------------------

    async def _docker(self) -> Any:
        """The SDK client, made on first use (making one asks the engine for its version)."""
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                make: Callable[[], Any] = (
                    (lambda: docker.DockerClient(base_url=self._base_url))
                    if self._base_url
                    else docker.from_env
                )
                try:
                    self._client = await asyncio.to_thread(make)
                except ENGINE_ERRORS as exc:
                    raise RuntimeError_(f"docker engine unreachable: {_explain(exc)}") from exc
            return self._client


def _find_network(client: Any, name: str) -> str | None:
    """The id of the network called exactly `name` (the engine's filter matches substrings)."""
    rows = client.api.networks(names=[name])
    matches = sorted((r.get("Created", ""), r["Id"]) for r in rows if r.get("Name") == name)
    return str(matches[0][1]) if matches else None


def _close_stream(stream: Any) -> None:
    with contextlib.suppress(*ENGINE_ERRORS, AttributeError):
        stream.close()


async def _iptables(*args: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        "iptables",
        "-w",
        "5",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait()


def _explain(exc: BaseException) -> str:
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__
