"""Direct network attach for the docker runtime (`docker_network_attach = "direct"`).

Docker puts a container on a network through libnetwork: an endpoint, a veth pair, and a
prestart hook that re-executes the whole dockerd binary for every container. On a small host
that is most of what starting and removing a sandbox costs the engine (`bench.cold`'s engine
rows: 12 containers that run only `sleep` start at ~7/s on a network, ~24/s with networking
disabled, and their removals at once take ~0.9 s against ~0.25 s). In direct mode a sandbox
is created with its network disabled (its own network namespace holding only `lo`, no hook)
and the worker attaches it to the sandbox network's bridge itself:

- a veth pair: the host end joins the bridge as an *isolated* port (the kernel forwards no
  frame between two isolated ports, whatever the protocol), the other end is the sandbox's
  `eth0`;
- an IPv4 address of the network's subnet. These networks are direct mode's own (their
  names end in `-direct`): the engine never attaches a container to them, so it hands out no
  address there. The host end's name carries the address, so the kernel's unique link names
  are the allocator for every worker on the host, and the address is free again once the
  sandbox's namespace is gone (the kernel deletes the pair with it);
- IPv6 off in the sandbox's namespace; a default route only on egress-enabled networks.

The bridge, Docker's own isolation rules for it and the host firewall rules (docker_firewall)
are the engine mode's, unchanged. The worker runs `ip` and `nsenter` (it must be root on the
Docker host, as the firewall already requires); the commands never execute anything from the
sandbox's filesystem (only the network namespace is entered).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from router.errors import SandboxRuntimeError

TOOLS = ("ip", "nsenter")
CLAIM_TRIES = 32  # random addresses tried before giving up (a taken one fails at once)
COMMAND_TIMEOUT_S = 10.0
TAKEN = "File exists"
FIRST_FAILED = "Command failed -:1\n"  # `ip -batch`: its first command (the claim) failed


@dataclass(frozen=True, slots=True)
class Subnet:
    """A sandbox network's addressing, as the engine made it."""

    bridge: str
    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address

    @classmethod
    def of(cls, bridge: str, info: dict[str, Any]) -> Subnet:
        """From the network's inspect output.

        Raises:
            SandboxRuntimeError: the network has no IPv4 subnet with a gateway.
        """
        for conf in (info.get("IPAM") or {}).get("Config") or []:
            try:
                network = ipaddress.ip_network(conf.get("Subnet", ""))
                gateway = ipaddress.ip_address(conf.get("Gateway", ""))
            except ValueError:
                continue
            if isinstance(network, ipaddress.IPv4Network) and isinstance(
                gateway, ipaddress.IPv4Address
            ):
                return cls(bridge, network, gateway)
        raise SandboxRuntimeError(f"network {info.get('Name')}: no IPv4 subnet with a gateway")

    def link_name(self, address: ipaddress.IPv4Address) -> str:
        """The host end's name for `address`: unique per bridge and address, <= 15 chars."""
        tag = hashlib.sha256(self.bridge.encode()).hexdigest()[:4]
        return f"sv{tag}{int(address) - int(self.network.network_address):x}"

    def pick(self) -> ipaddress.IPv4Address:
        """A random host address of the subnet (not the gateway)."""
        first, last = int(self.network.network_address) + 1, int(self.network.broadcast_address)
        while True:
            address = ipaddress.IPv4Address(random.randrange(first, last))
            if address != self.gateway:
                return address


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


@contextlib.contextmanager
def open_netns(pid: int) -> Iterator[int]:
    """A descriptor of process `pid`'s network namespace, refused if it is this host's own.

    Every command below names the namespace by this descriptor, never by the pid again, so
    the caller can check once (after opening) that the pid is still the sandbox's.

    Raises:
        SandboxRuntimeError: no such process, or it shares this host's network namespace.
    """
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxRuntimeError(f"sandbox process {pid}: {exc.strerror}") from exc
    try:
        mine, theirs = os.stat("/proc/self/ns/net"), os.fstat(fd)
        if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
            raise SandboxRuntimeError(f"process {pid} is in this host's network namespace")
        yield fd
    finally:
        os.close(fd)


def attach(subnet: Subnet, netns: int, egress: bool) -> str:
    """Give the sandbox whose network namespace is open as `netns` (`open_netns`) an `eth0`
    on the subnet's bridge; its address.

    Blocking (runs `ip` and `nsenter`): call it in a thread.

    Raises:
        SandboxRuntimeError: no free address after CLAIM_TRIES, or a command failed (the host
            end, if made, is deleted; the sandbox's end goes with its namespace).
    """
    for _ in range(CLAIM_TRIES):
        address = subnet.pick()
        host_end = subnet.link_name(address)
        # The pair is made with eth0 down: it has no IPv6 address before IPv6 is off below.
        done = _ip_batch(
            netns,
            f"link add {host_end} type veth peer name eth0 netns {_path(netns)}",
            f"link set {host_end} master {subnet.bridge}",
            f"link set dev {host_end} type bridge_slave isolated on",
            f"link set {host_end} up",
        )
        if done.returncode != 0 and FIRST_FAILED in done.stderr:  # the claim itself failed
            if TAKEN in done.stderr:
                continue  # another sandbox holds this address (its link is not ours to touch)
            _check(done, f"create the veth pair {host_end}")  # nothing made, nothing to undo
        break
    else:
        raise SandboxRuntimeError(
            f"bridge {subnet.bridge}: no free address in {subnet.network} after {CLAIM_TRIES} tries"
        )
    inside = [
        f"address add {address}/{subnet.network.prefixlen} dev eth0",
        "link set lo up",
        "link set eth0 up",
    ]
    if egress:
        inside.append(f"route add default via {subnet.gateway}")
    try:
        _check(done, f"put {host_end} on {subnet.bridge}")
        # IPv6 off before eth0 is up, so none of the sandbox's traffic bypasses the IPv4
        # firewall rules; then its address, routes and links in one `ip -batch`.
        configure = ["nsenter", f"--net={_path(netns)}", "sh", "-c", _IPV6_OFF_THEN_IP]
        _check(_exec(configure, "configure eth0", "\n".join(inside), netns), "configure eth0")
    except BaseException:
        with contextlib.suppress(SandboxRuntimeError):
            _exec(["ip", "link", "del", host_end], f"delete {host_end}")
        raise
    return str(address)


def address_of(netns: int) -> str | None:
    """The IPv4 address of the sandbox's eth0 (a retried create adopting its container)."""
    argv = ["nsenter", f"--net={_path(netns)}", "ip", "-4", "-o", "address", "show", "eth0"]
    done = _exec(argv, "read the sandbox's address", fd=netns)
    fields = done.stdout.split()
    if done.returncode != 0 or "inet" not in fields:
        return None
    return fields[fields.index("inet") + 1].split("/")[0]


_IPV6_OFF_THEN_IP = (
    "for c in all default eth0; do f=/proc/sys/net/ipv6/conf/$c/disable_ipv6; "
    'if [ -e "$f" ]; then echo 1 > "$f" || exit 1; fi; done; exec ip -batch -'
)


def ports_on(bridge: str) -> list[str]:
    """The links attached to `bridge` (none when it does not exist)."""
    done = _exec(["ip", "-o", "link", "show", "master", bridge], f"list the ports of {bridge}")
    if done.returncode != 0:
        return []
    return [line.split(":")[1].strip().split("@")[0] for line in done.stdout.splitlines()]


def _path(netns: int) -> str:
    """The namespace descriptor as a path a child process can open (it inherits it)."""
    return f"/proc/self/fd/{netns}"


def _ip_batch(netns: int, *commands: str) -> subprocess.CompletedProcess[str]:
    """One `ip -batch` (in this host's namespace) for several commands; it stops at the
    first that fails."""
    return _exec(["ip", "-batch", "-"], " / ".join(commands), "\n".join(commands), netns)


def _exec(
    argv: list[str], what: str, stdin: str = "", fd: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end (its failure is the caller's to read).

    Raises:
        SandboxRuntimeError: it could not run, or ran past COMMAND_TIMEOUT_S.
    """
    try:
        return subprocess.run(
            argv,
            input=stdin + "\n" if stdin else None,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
            pass_fds=() if fd is None else (fd,),
            env={**os.environ, "LC_ALL": "C"},  # TAKEN and FIRST_FAILED are read in English
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxRuntimeError(f"{what}: {exc}") from exc


def _check(done: subprocess.CompletedProcess[str], what: str) -> None:
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise SandboxRuntimeError(f"{what}: {detail[-1] if detail else done.returncode}")
