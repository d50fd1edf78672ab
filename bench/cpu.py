"""Where the CPU goes over an interval: processes by role, and the sandboxes' cgroup.

Two snapshots of `/proc/<pid>/stat`, at start() and stop(), so measuring costs nothing in
between. Each process counts its own CPU plus that of the children it reaped meanwhile
(cutime + cstime): a container's shim thereby accounts for the short-lived `runc` calls it made
and for the prestart hook `runc` ran (dockerd re-executed as `libnetwork-setkey` for each
container's network), and dockerd for the tools it ran. The sandboxes' own processes are read
whole from the cpuacct cgroup Docker puts containers under (cgroup v1 `docker/`); processes
inside a container are not counted again. A process that both started and ended between the
snapshots, with no counted parent, is missed (`machine` still has it).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
CGROUP_DOCKER = Path("/sys/fs/cgroup/cpuacct/docker/cpuacct.usage")
ROLES = {
    "dockerd": "dockerd",
    "containerd": "containerd",
    "containerd-shim": "shim + runc + hook",
    "containerd-shim-runc-v2": "shim + runc + hook",
    "redis-server": "redis",
}


@dataclass(frozen=True, slots=True)
class _Proc:
    name: str
    ppid: int
    cpu_s: float  # its own utime + stime, plus its reaped children's


def _snapshot() -> dict[tuple[int, int], _Proc]:
    """(pid, start time) → the process; a reused pid is another process."""
    out: dict[tuple[int, int], _Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = Path(f"/proc/{entry}/stat").read_text()
            name = raw[raw.index("(") + 1 : raw.rindex(")")]
            f = raw[raw.rindex(")") + 2 :].split()
            cpu = sum(int(x) for x in f[11:15]) / CLK_TCK  # utime stime cutime cstime
            out[(int(entry), int(f[19]))] = _Proc(name, int(f[1]), cpu)
    return out


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


def _containers_s() -> float:
    with contextlib.suppress(OSError, ValueError):
        return int(CGROUP_DOCKER.read_text()) / 1e9
    return 0.0


def _in_container(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return ":/docker/" in Path(f"/proc/{pid}/cgroup").read_text()
    return False


def _descends(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    for _ in range(32):
        if pid == ancestor:
            return True
        pid = parents.get(pid, 0)
        if pid <= 1:
            return False
    return False


def _role(pid: int, proc: _Proc, ours: set[int]) -> str:
    """This bench's own processes by what they run (worker, router, this bench); the engine's
    by name; everything else (other runs and tests on the machine) is `other`."""
    if pid == os.getpid():
        return "bench"
    if pid in ours and proc.name.startswith("python"):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            for role in (b"worker", b"router"):
                if role in argv:
                    return role.decode()
    if pid in ours:
        return ROLES.get(proc.name, "bench")
    if proc.name.startswith(("kworker", "ksoftirq")):
        return "kernel threads"
    return ROLES.get(proc.name, "other")


class ProcessCpu:
    """Cores used by each role between start() and stop()."""

    def start(self) -> None:
        self._first = _snapshot()
        self.t0, self.busy0, self.cg0 = time.monotonic(), machine_busy_s(), _containers_s()

    def stop(self) -> dict[str, float]:
        """Cores used over the interval: one entry per role, `sandboxes` from the containers'
        cgroup, `machine` (every core's busy time, whoever used it) and `wall_s`."""
        last = _snapshot()
        wall = time.monotonic() - self.t0
        parents = {pid: proc.ppid for (pid, _), proc in last.items()}
        ours = {pid for pid in parents if _descends(pid, os.getpid(), parents)}
        by: dict[str, float] = defaultdict(float)
        for key, proc in last.items():
            before = self._first.get(key)
            used = proc.cpu_s - (before.cpu_s if before is not None else 0.0)
            if used <= 0 or _in_container(key[0]):
                continue
            by[_role(key[0], proc, ours)] += used / wall
        by["sandboxes"] = (_containers_s() - self.cg0) / wall
        by["machine"] = (machine_busy_s() - self.busy0) / wall
        by["wall_s"] = wall
        return dict(by)
