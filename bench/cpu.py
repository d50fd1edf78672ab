"""Where the CPU goes over an interval: processes by role, and the sandboxes' cgroups.

A thread samples `/proc/<pid>/stat` (utime + stime) every SAMPLE_S, so a short-lived process
(runc, the engine's network hook, iptables) counts for what it used up to its last sample: the
per-role figures are lower bounds. The sandboxes' own processes are read whole from the cpuacct
cgroup Docker puts containers under (cgroup v1 `docker/`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

SAMPLE_S = 0.025
CLK_TCK = os.sysconf("SC_CLK_TCK")
CGROUP_DOCKER = Path("/sys/fs/cgroup/cpuacct/docker/cpuacct.usage")
ROLES = {
    "dockerd": "dockerd",
    "containerd": "containerd",
    "containerd-shim": "shim + runc",
    "runc": "shim + runc",
    "runc:[0:PARENT]": "shim + runc",
    "runc:[1:CHILD]": "shim + runc",
    "runc:[2:INIT]": "shim + runc",
    # dockerd re-executed as the container's prestart hook (libnetwork-setkey)
    "exe": "dockerd hook",
    "iptables": "iptables",
    "redis-server": "redis",
}
Key = tuple[int, int]  # (pid, start time): a reused pid is another process


def _stat_all() -> dict[Key, tuple[str, int, float]]:
    """(pid, start time) → (name, parent pid, CPU seconds so far)."""
    out: dict[Key, tuple[str, int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = Path(f"/proc/{entry}/stat").read_text()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            out[(int(entry), int(fields[19]))] = (comm, int(fields[1]), cpu)
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


def _python_role(pid: int) -> str | None:
    """The bench's own python processes by what they run (worker, router, this bench)."""
    if pid == os.getpid():
        return "bench"
    with contextlib.suppress(OSError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"sessionpool.cli" in argv:
            for role in (b"worker", b"router"):
                if role in argv:
                    return role.decode()
    return None


class ProcessCpu:
    """Cores used by each role between start() and stop()."""

    def __init__(self) -> None:
        self._first: dict[Key, float] = {}
        self._last: dict[Key, tuple[str, int, float]] = {}
        self._contained: dict[Key, bool] = {}  # counted with the sandboxes' cgroup
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        seen = _stat_all()
        self._first = {k: v[2] for k, v in seen.items()}
        self._last = seen
        self.t0, self.busy0, self.cg0 = time.monotonic(), machine_busy_s(), _containers_s()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._update(_stat_all())

    def _update(self, seen: dict[Key, tuple[str, int, float]]) -> None:
        for key in seen.keys() - self._last.keys():
            self._contained[key] = _in_container(key[0])
        self._last.update(seen)

    def stop(self) -> dict[str, float]:
        """Cores used over the interval: one entry per role, `sandboxes` from the containers'
        cgroup, `machine` (every core's busy time, whoever used it) and `wall_s`."""
        self._stop.set()
        self._thread.join()
        self._update(_stat_all())
        wall = time.monotonic() - self.t0
        by: dict[str, float] = defaultdict(float)
        for key, (comm, _, cpu) in self._last.items():
            used = cpu - self._first.get(key, 0.0)
            if used <= 0 or self._contained.get(key):
                continue
            role = (
                (_python_role(key[0]) if comm.startswith("python") else None)
                or ROLES.get(comm)
                or ("kernel threads" if comm.startswith(("kworker", "ksoftirq")) else "other")
            )
            by[role] += used / wall
        by["sandboxes"] = (_containers_s() - self.cg0) / wall
        by["machine"] = (machine_busy_s() - self.busy0) / wall
        by["wall_s"] = wall
        return dict(by)
