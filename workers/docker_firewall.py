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
sandbox opens towards the host, metadata services or private networks is dropped. Where the
rules cannot be installed, a warning lists the exact commands for the operator.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from typing import Any

from docker.errors import APIError, NotFound

from workers.docker_engine import ENGINE_ERRORS, explain, is_local
from workers.runtime import RuntimeError_

log = logging.getLogger("sessionpool.docker")

LINK_LOCAL = "169.254.0.0/16"
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
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

    def __init__(self, network_prefix: str) -> None:
        self.network_prefix = network_prefix
        self._ids: dict[bool, str] = {}  # egress enabled → network id
        self._locks = {True: asyncio.Lock(), False: asyncio.Lock()}

    def name(self, egress: bool) -> str:
        return f"{self.network_prefix}-egress-{'enabled' if egress else 'disabled'}"

    def forget(self, egress: bool) -> None:
        """The network was removed behind our back: make it again on next use."""
        self._ids.pop(egress, None)

    async def ensure(self, client: Any, egress: bool) -> str:
        """The sandbox network for this policy, created (with its firewall) on first use.

        Raises:
            RuntimeError_: the engine refused the network.
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
                raise RuntimeError_(f"network {name}: {explain(exc)}") from exc
            await self._install_firewall(client, bridge, egress)
            self._ids[egress] = net_id
            return name

    async def remove(self, client: Any) -> None:
        """Remove this prefix's sandbox networks and their firewall rules (tests, uninstall).

        Raises:
            RuntimeError_: a network still has containers attached.
        """
        for egress in (False, True):
            name = self.name(egress)
            try:
                await asyncio.to_thread(client.api.remove_network, name)
            except NotFound:
                pass
            except ENGINE_ERRORS as exc:
                raise RuntimeError_(f"remove network {name}: {explain(exc)}") from exc
            self._ids.pop(egress, None)
            if _can_firewall(client):
                bridge = bridge_name(self.network_prefix, egress)
                for rule in firewall_rules(bridge, egress):
                    while await _iptables("-C", *rule) == 0:
                        await _iptables("-D", *rule)

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

    async def _install_firewall(self, client: Any, bridge: str, egress: bool) -> None:
        rules = firewall_rules(bridge, egress)
        if _can_firewall(client):
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


def _can_firewall(client: Any) -> bool:
    return is_local(client) and os.geteuid() == 0 and shutil.which("iptables") is not None


def _find_network(client: Any, name: str) -> str | None:
    """The id of the network called exactly `name` (the engine's filter matches substrings)."""
    rows = client.api.networks(names=[name])
    matches = sorted((r.get("Created", ""), r["Id"]) for r in rows if r.get("Name") == name)
    return str(matches[0][1]) if matches else None


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
