"""Test and benchmark scaffolding: a private redis-server, router/worker processes, pool bodies,
sockets bound to port 0 before use, and `wait_until`.

Used by `tests/` and `bench/`; nothing in the product imports it. Processes are found through
the installed package (`python -m sessionpool.cli`), so the scaffolding works from a wheel too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Any

from router.pools import Pool, parse_pool
from router.sandboxes import MarkReady
from router.settings import ENV_PREFIX, Settings
from router.store import Store
from sessionpool.local_redis import RedisServer, redis_server

__all__ = [
    "ECHO_IMAGE",
    "FAST_WORKER",
    "HEALTH_PROBE",
    "RedisServer",
    "Workers",
    "add_ready",
    "builtin_pool_body",
    "counts_are",
    "echo_pool",
    "make_pool",
    "pool_body",
    "port_of",
    "redis_server",
    "serving_router",
    "settings_env",
    "spawn",
    "spawn_router",
    "spawn_worker",
    "stop_process",
    "unused_port",
    "unused_ports",
    "wait_until",
]

ECHO_IMAGE = "sessionpool/echo:dev"
# The echo app's readiness: what a pool of sessionpool/echo:dev probes before use.
HEALTH_PROBE: dict[str, Any] = {"type": "Startup", "httpGet": {"path": "/health", "port": 8080}}
Process = asyncio.subprocess.Process
PIPE, DEVNULL = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL


async def wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 10.0,  # noqa: ASYNC109 (a polling deadline, not a cancel scope)
    interval: float = 0.02,
) -> Any:
    """Poll `predicate` until it returns something truthy, and return that.

    Raises:
        AssertionError: the deadline passed first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


# Sockets ------------------------------------------------------------------------------------


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def unused_ports(n: int = 1, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports of `host` that are free now, for child programs that must be told
    the port they bind (redis-server, a router restarted on the same address, a worker's
    metrics port, a compose stack). Another socket may take one before the child binds it:
    a listener of this process binds port 0 instead (as `serving_router` does)."""
    socks = [socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [port_of(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def unused_port(host: str = "127.0.0.1") -> int:
    """One of `unused_ports`."""
    return unused_ports(1, host)[0]


# Processes ----------------------------------------------------------------------------------


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This environment plus a `SESSIONPOOL_*` variable for every setting that is not its
    default, so a child process builds the same `Settings`."""
    env = dict(os.environ)
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if f.name == "worker_id" or value != getattr(defaults, f.name):
            text = str(value).lower() if isinstance(value, bool) else str(value)
            env[ENV_PREFIX + f.name.upper()] = text
    return {**env, **extra}


async def spawn(
    command: str, settings: Settings, *args: str, log: Path | None = None, stdout: int = PIPE
) -> Process:
    """`sessionpool <command> <args>` configured by `settings` (stdout piped unless asked;
    stderr to `log` when given, else discarded)."""
    with contextlib.ExitStack() as stack:
        err: IO[bytes] | int = asyncio.subprocess.DEVNULL
        if log is not None:
            err = stack.enter_context(log.open("ab"))
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sessionpool.cli",
            command,
            *args,
            env=settings_env(settings),
            stdout=stdout,
            stderr=err,
        )


async def spawn_router(
    settings: Settings,
    *args: str,
    port: int = 0,
    log: Path | None = None,
    timeout_s: float = 30.0,
) -> tuple[Process, str]:
    """A router process; returns it and its base URL once it listens. On port 0 (the default)
    the router binds a free port itself and prints it: nothing races for the port.

    Raises:
        AssertionError: it exited or did not listen within `timeout_s`.
    """
    proc = await spawn("router", settings.replace(port=port), *args, log=log)
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout_s)).decode()
    except TimeoutError:
        await stop_process(proc)
        raise AssertionError(f"the router did not listen within {timeout_s} s") from None
    if "listening on" not in line:
        await stop_process(proc)
        raise AssertionError(f"the router did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


async def spawn_worker(
    settings: Settings, *args: str, runtime: str = "docker", log: Path | None = None
) -> Process:
    """A worker process of `settings` with `runtime` (each gets a worker id of its own)."""
    settings = settings.replace(runtime=runtime, worker_id=f"w-{uuid.uuid4().hex[:8]}")
    return await spawn("worker", settings, *args, log=log, stdout=DEVNULL)


class Workers:
    """The worker processes of one test, started on demand, each logging to a file of
    `directory` (`logs`); `stop()` sends SIGTERM to those still running and returns their exit
    statuses; `tails()` is what a failure report shows."""

    def __init__(self, settings: Settings, runtime: str, directory: Path) -> None:
        self.settings = settings
        self.runtime = runtime
        self.directory = directory
        self.procs: list[Process] = []
        self.logs: list[Path] = []

    async def start(self, *args: str, **changes: Any) -> Process:
        """One more worker, with `changes` to the group's settings."""
        log = self.directory / f"worker-{len(self.procs)}.log"
        self.logs.append(log)
        settings = self.settings.replace(**changes)
        proc = await spawn_worker(settings, *args, runtime=self.runtime, log=log)
        self.procs.append(proc)
        return proc

    async def __call__(self, *args: str) -> Process:
        return await self.start(*args)

    async def stop(self, grace_s: float = 30.0) -> list[int]:
        running = [p for p in self.procs if p.returncode is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        return [await asyncio.wait_for(p.wait(), grace_s) for p in running]

    def tails(self, lines: int = 40) -> str:
        return "\n".join(
            "\n".join([f"--- {log.name}", *log.read_text().splitlines()[-lines:]])
            for log in self.logs
        )


async def stop_process(proc: Process, grace_s: float = 20.0) -> int:
    """SIGTERM, then SIGKILL after `grace_s`; returns the exit status."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            proc.kill()
    return await proc.wait()


async def counts_are(store: Store, pool: str, **want: int) -> bool:
    """Whether the pool's counts (ready, warming, allocated) are what `want` says."""
    got = await store.counts(pool)
    return all(got[k] == v for k, v in want.items())


@contextlib.asynccontextmanager
async def serving_router(settings: Settings) -> AsyncIterator[str]:
    """A router served in this process as `sessionpool router` serves it (`start_site`: its
    connection bounds and per-connection loop) on a loopback port bound as port 0; its base
    URL."""
    from router.server import start_site

    runner, port = await start_site(settings.replace(host="127.0.0.1", port=0))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# The worker knobs the worker suites turn down so that recovery shows within a test's time.
FAST_WORKER: dict[str, Any] = {
    "reconcile_interval_s": 1,
    "orphan_grace_s": 2,
    "warm_timeout_s": 20,
    "claim_idle_ms": 2000,
}


# Pools --------------------------------------------------------------------------------------


def pool_body(
    *,
    image: str = ECHO_IMAGE,
    ready: int = 5,
    max_sessions: int = 10,
    cooldown_s: int = 300,
    target_port: int = 8080,
    lifecycle: str = "Timed",
    max_alive_s: int | None = None,
    container: dict[str, Any] | None = None,
    **props: Any,
) -> dict[str, Any]:
    """An ARM pool body (`{"properties": ...}`) of one container; `container` adds to it."""
    life: dict[str, Any] = {"lifecycleType": lifecycle, "cooldownPeriodInSeconds": cooldown_s}
    if max_alive_s is not None:
        life["maxAlivePeriodInSeconds"] = max_alive_s
    return {
        "properties": {
            "scaleConfiguration": {
                "maxConcurrentSessions": max_sessions,
                "readySessionInstances": ready,
            },
            "dynamicPoolConfiguration": {"lifecycleConfiguration": life},
            "customContainerTemplate": {
                "containers": [{"name": "main", "image": image, **(container or {})}],
                "ingress": {"targetPort": target_port},
            },
            **props,
        }
    }


def builtin_pool_body(
    container_type: str = "PythonLTS",
    *,
    max_sessions: int = 10,
    ready: int = 1,
    cooldown_s: int = 300,
    **props: Any,
) -> dict[str, Any]:
    """An ARM pool body of a built-in container type (PythonLTS, Shell): no template."""
    return {
        "properties": {
            "containerType": container_type,
            "scaleConfiguration": {
                "maxConcurrentSessions": max_sessions,
                "readySessionInstances": ready,
            },
            "dynamicPoolConfiguration": {
                "lifecycleConfiguration": {
                    "lifecycleType": "Timed",
                    "cooldownPeriodInSeconds": cooldown_s,
                }
            },
            **props,
        }
    }


def make_pool(name: str = "demo", **body: Any) -> Pool:
    """`parse_pool(name, pool_body(**body))`."""
    return parse_pool(name, pool_body(**body))


def echo_pool(
    name: str,
    *,
    ready: int = 2,
    max_sessions: int = 10,
    cooldown_s: int = 300,
    lifecycle: str = "Timed",
    probes: list[dict[str, Any]] | None = None,
) -> Pool:
    """A pool of the echo image as the Docker suites and benchmarks run it (small CPU and
    memory limits, the /health startup probe)."""
    container = {
        "resources": {"cpu": 0.5, "memory": "256Mi"},
        "probes": [HEALTH_PROBE] if probes is None else probes,
    }
    return make_pool(
        name,
        ready=ready,
        max_sessions=max_sessions,
        cooldown_s=cooldown_s,
        lifecycle=lifecycle,
        container=container,
    )


async def add_ready(store: Store, pool: Pool, container: str, addr: str) -> str:
    """Put a running sandbox (`container` at `addr`) in the ready set exactly as the
    replenisher does (RESERVE, SET_CONTAINER, MARK_READY); returns its sandbox id."""
    sid = uuid.uuid4().hex
    assert await store.reserve(pool, "test", [sid]) == [sid], "reserve refused: raise `ready`"
    assert await store.set_container(pool.name, sid, container)
    assert await store.mark_ready(pool.name, sid, container, addr) is MarkReady.READY
    return sid
