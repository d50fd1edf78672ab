"""Sandbox networks of the docker runtime and the host firewall rules that go with them.

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
sandbox opens towards the host, metadata services or private networks is dropped.

Fail closed: where the rules cannot be installed (not root, no NET_ADMIN, no iptables, a
remote engine) no sandbox starts, and the error lists the exact commands. The rules are
re-checked every `firewall_check_s` and put back when something removed them (a firewall
reload, an operator's flush); if they cannot be put back, new sandboxes are refused until
they can. The only way around this is `insecure_skip_host_firewall`, which says what it gives
up, and is warned about at every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from typing import Any

from docker.errors import APIError, NotFound

from router.errors import SandboxRuntimeError
from workers.docker_engine import ENGINE_ERRORS, explain, is_local

log = logging.getLogger("sessionpool.docker")

LINK_LOCAL = "169.254.0.0/16"
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
INSERT_TRIES = 4
RACE_WAIT_S = 5.0  # how long a losing network create waits to see the winner's network
NOT_REPLY = ("-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED", "-j", "DROP")


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


class SandboxNetworks:
    """The two sandbox networks of one `network_prefix`, each made once with its firewall."""

    def __init__(
        self,
        network_prefix: str,
        *,
        check_s: float = 10.0,
        skip_firewall: bool = False,
        iptables: str = "iptables",
    ) -> None:
        self.network_prefix = network_prefix
        self._ids: dict[bool, str] = {}  # egress enabled → network id
        self._locks = {True: asyncio.Lock(), False: asyncio.Lock()}
        self._check_s = check_s
        self._skip = skip_firewall
        self._iptables = iptables
        self._guarded: dict[bool, str] = {}  # egress → bridge whose rules are kept in place
        self._watch: asyncio.Task[None] | None = None
        if skip_firewall:
            log.warning(
                "insecure_skip_host_firewall is set: sandboxes start without host firewall "
                "rules and can reach this host's services and metadata addresses"
            )

    def name(self, egress: bool) -> str:
        return f"{self.network_prefix}-egress-{'enabled' if egress else 'disabled'}"

    def forget(self, egress: bool) -> None:
        """The network was removed behind our back: make it again on next use."""
        self._ids.pop(egress, None)

    async def ensure(self, client: Any, egress: bool) -> str:
        """The sandbox network for this policy, created (with its firewall) on first use.

        Raises:
            SandboxRuntimeError: the engine refused the network.
        """
        if egress in self._ids:
            return self.name(egress)
        async with self._locks[egress]:
            if egress in self._ids:
                return self.name(egress)
            name = self.name(egress)
            bridge = bridge_name(self.network_prefix, egress)
            try:
                net_id = await asyncio.to_thread(self._network_sync, client, name, bridge, egress)
            except ENGINE_ERRORS as exc:
                raise SandboxRuntimeError(f"network {name}: {explain(exc)}") from exc
            if self._skip:
                log.warning("sandbox network %s: no host firewall rules (insecure)", bridge)
            else:
                await self._install_firewall(client, bridge, egress)
                self._guarded[egress] = bridge
                if self._watch is None:
                    self._watch = asyncio.create_task(self._keep_rules(), name="firewall-check")
            self._ids[egress] = net_id
            return name

    async def close(self) -> None:
        """Stop re-checking the rules (they stay installed: sandboxes may outlive a worker)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    async def check_rules(self) -> None:
        """Put back any rule of a guarded network that has gone missing; when one cannot be
        put back, forget the network so that no new sandbox starts until it can."""
        for egress, bridge in list(self._guarded.items()):
            missing = await self._missing(bridge, egress)
            if not missing:
                continue
            failed = await self._insert(missing)
            if failed:
                log.error(
                    "sandbox network %s: firewall rules missing and not restorable: %s; "
                    "new sandboxes are refused until they are back",
                    bridge,
                    _commands(failed),
                )
                self._ids.pop(egress, None)
                self._guarded.pop(egress, None)
            else:
                log.warning(
                    "sandbox network %s: firewall rules had gone missing, restored: %s",
                    bridge,
                    _commands(missing),
                )

    async def _keep_rules(self) -> None:
        while True:
            await asyncio.sleep(self._check_s)
            try:
                await self.check_rules()
            except OSError as exc:  # iptables vanished: say so every round, keep trying
                log.error("firewall check: cannot run %s: %s", self._iptables, exc)

    async def _insert(self, rules: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        """Insert each rule; return those still absent after a few tries. With the nf_tables
        backend a write can fail while another process (the engine, another worker) is
        changing the same table, so a failure is retried before it counts."""
        failed = []
        for rule in rules:
            for attempt in range(INSERT_TRIES):
                if await self._run("-I", *rule) == 0 or await self._run("-C", *rule) == 0:
                    break
                await asyncio.sleep(0.1 * (attempt + 1))
            else:
                failed.append(rule)
        return failed

    async def _missing(self, bridge: str, egress: bool) -> list[tuple[str, ...]]:
        return [r for r in firewall_rules(bridge, egress) if await self._run("-C", *r) != 0]

    async def remove(self, client: Any) -> None:
        """Remove this prefix's sandbox networks and their firewall rules (tests, uninstall).

        Raises:
            SandboxRuntimeError: a network still has containers attached.
        """
        for egress in (False, True):
            name = self.name(egress)
            try:
                await asyncio.to_thread(client.api.remove_network, name)
            except NotFound:
                pass
            except ENGINE_ERRORS as exc:
                raise SandboxRuntimeError(f"remove network {name}: {explain(exc)}") from exc
            self._ids.pop(egress, None)
            self._guarded.pop(egress, None)
            if self._can_firewall(client):
                bridge = bridge_name(self.network_prefix, egress)
                for rule in firewall_rules(bridge, egress):
                    while await self._run("-C", *rule) == 0:
                        await self._run("-D", *rule)

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
            # The engine claims the bridge before the winner's network is listed, so look for it
            # for a moment before giving up.
            deadline = time.monotonic() + RACE_WAIT_S
            while (found := _find_network(client, name)) is None:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)  # a worker thread (asyncio.to_thread), not the event loop
            return found

    async def _install_firewall(self, client: Any, bridge: str, egress: bool) -> None:
        """Install the bridge's rules, or refuse: no sandbox starts on an unguarded network.

        Raises:
            SandboxRuntimeError: the rules are not in place; the message has the commands.
        """
        rules = firewall_rules(bridge, egress)
        if self._can_firewall(client):
            rules = await self._insert(await self._missing(bridge, egress))
            if not rules:
                return
            why = "iptables refused them"
        else:
            why = "not root, no iptables, or the Docker engine is not local"
        raise SandboxRuntimeError(
            f"sandbox network {bridge}: host firewall rules not installed ({why}); no sandbox "
            f"starts without them. Give the worker root with NET_ADMIN and NET_RAW on the "
            f"Docker host, or install them there: {_commands(rules)} and run the worker "
            f"with insecure_skip_host_firewall (sandboxes can then reach this host when the "
            f"rules go missing)"
        )

    def _can_firewall(self, client: Any) -> bool:
        return is_local(client) and os.geteuid() == 0 and shutil.which(self._iptables) is not None

    async def _run(self, *args: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            self._iptables,
            "-w",
            "5",
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait()


def _commands(rules: list[tuple[str, ...]]) -> str:
    return "; ".join("iptables -I " + " ".join(rule) for rule in rules)


def _find_network(client: Any, name: str) -> str | None:
    """The id of the network called exactly `name` (the engine's filter matches substrings)."""
    rows = client.api.networks(names=[name])
    matches = sorted((r.get("Created", ""), r["Id"]) for r in rows if r.get("Name") == name)
    return str(matches[0][1]) if matches else None
