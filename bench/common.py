"""Shared plumbing: processes, their CPU and memory, ports, a private redis-server, requirements,
and the polls the benchmarks time with."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from router.store import Store
from sessionpool.local_redis import RedisServer as RedisServer  # the suite's private Redis

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
GiB = 1 << 30


class MissingRequirement(RuntimeError):
    """Something bench/README.md lists as needed is not installed."""


def require_python(module: str, hint: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise MissingRequirement(f"python module {module!r} is missing: {hint}") from None


def which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found is None and Path(f"/usr/sbin/{tool}").exists():
        return f"/usr/sbin/{tool}"
    return found


def wait_port(port: int, timeout_s: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")
        time.sleep(0.02)


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (from /proc/<pid>/stat), in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            raw = Path(f"/proc/{pid}/stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def status_kib(pid: int, name: str) -> int:
    """A field of /proc/<pid>/status in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            for child in (task / "children").read_text().split():
                out.append(int(child))
                out += children(int(child))
    return out


@contextlib.contextmanager
def one_core(pids: Iterable[int], cpu: int = 0) -> Iterator[None]:
    """Run `pids` (every thread of each) and this process (so the load generator it starts)
    on one CPU, then give them back every CPU this process had.

    At c=1 only one process of the chain has work at any moment, so one core is enough for
    all of them; spread over a virtual machine's CPUs, each hop from one process to the next
    may wake another virtual CPU, whose wake-up (an inter-processor interrupt through the
    hypervisor) costs tens of microseconds on this kind of host: that measures the host, not
    the proxy. The bench prints c=1 both ways."""
    ours = os.sched_getaffinity(0)
    tids = [os.getpid()]
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            tids += [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, {cpu})
    try:
        yield
    finally:
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, ours)


@dataclass
class Proc:
    """A process the suite started; `pids` are those whose CPU counts as the proxy's."""

    name: str
    popen: subprocess.Popen[bytes]
    extra_pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return [self.pid, *children(self.pid), *self.extra_pids]

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(
    name: str, argv: Sequence[str], env: dict[str, str] | None = None, log: Path | None = None
) -> Proc:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    popen = subprocess.Popen(
        list(argv),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    if log:
        assert not isinstance(out, int)
        out.close()
    return Proc(name, popen)


@contextlib.contextmanager
def stopping(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


def python() -> str:
    return sys.executable


def spawn_worker(env: dict[str, str], log: Path) -> Proc:
    """A docker-runtime worker process (`env` names its Redis, key prefix and id)."""
    argv = [python(), "-m", "sessionpool.cli", "worker", "--runtime", "docker"]
    return spawn("worker", argv, env=env, log=log)


async def poll(
    predicate: Callable[[], Awaitable[bool]], limit_s: float, what: str, interval: float = 0.02
) -> float:
    """Poll an async predicate; returns the monotonic time it first held."""
    deadline = time.monotonic() + limit_s
    while True:
        if await predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {limit_s} s")
        await asyncio.sleep(interval)


async def timed_get(http: aiohttp.ClientSession, url: str) -> float:
    """GET `url`, read the body; milliseconds taken (anything but 200 is an error)."""
    t0 = time.perf_counter()
    async with http.get(url) as r:
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {body[:300]!r}")
    return (time.perf_counter() - t0) * 1000


async def until_expired(
    store: Store, pool: str, idents: Iterable[str], interval: float
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Watch sessions until each has ended (60 s at most): each one's last session record and
    its last expiresAt (Redis ms)."""
    k = store.pk(pool)
    records: dict[str, dict[str, Any]] = {}
    expires: dict[str, float] = {}
    live = set(idents)
    deadline = time.monotonic() + 60
    while live and time.monotonic() < deadline:
        async with store.redis.pipeline(transaction=False) as pipe:
            for ident in live:
                pipe.hget(k.sessions, ident)
                pipe.zscore(k.expiry, ident)
            got = await pipe.execute()
        for ident, raw, score in zip(list(live), got[::2], got[1::2], strict=True):
            if raw is None or score is None:
                live.discard(ident)
                continue
            expires[ident] = float(score)
            records[ident] = orjson.loads(raw)
        await asyncio.sleep(interval)
    return records, expires
