"""`sessionpool up`: Redis, a router and a worker on this machine, in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from router.addresses import is_loopback
from router.keys import Keys
from router.limits import LimitPolicy
from router.pools import parse_pool
from router.server import start_site
from router.settings import Settings
from router.store import Store, open_redis, text, wait_redis
from sessionpool.poolfile import apply_file
from workers.context import REDIS_ERRORS
from workers.main import open_runtime
from workers.main import run as run_worker
from workers.runtime import Runtime, RuntimeError_

log = logging.getLogger("sessionpool.up")
# The demo app ships inside the package, so `up --runtime process` works from a wheel too.
ECHO = Path(__file__).resolve().parent / "demo" / "echo.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on a free loopback port, nothing persisted, with a random
    password (in a 0600 file of `directory`, never on a command line): a process-runtime
    sandbox shares the host's network and could otherwise reach it."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit(
            "sessionpool up: redis-server not found (apt-get install "
            "redis-server), or pass --redis-url"
        )
    port = _free_port()
    password = secrets.token_urlsafe(24)
    conf = directory / "redis.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"requirepass {password}\n")
    proc = subprocess.Popen(
        [
            exe,
            str(conf),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # Ctrl-C must not stop Redis before sandboxes are removed
    return proc, f"redis://:{password}@127.0.0.1:{port}/0"


async def open_docker_runtime(settings: Settings) -> Runtime | None:
    """The docker runtime when an engine answers, else None (through the runtime: only
    runtime modules import an engine's SDK)."""
    runtime = open_runtime(settings.replace(runtime="docker"))
    try:
        await runtime.list(settings.key_prefix)
    except RuntimeError_:
        await runtime.close()
        return None
    return runtime


def demo_pool(runtime: str) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": "sessionpool/echo:dev",
        "probes": [{"type": "Startup", "httpGet": {"path": "/health", "port": 8080}}],
    }
    if runtime == "process":
        container.update(
            image="local",
            command=[sys.executable],
            args=[str(ECHO)],
            env=[{"name": "HOST", "value": "127.0.0.1"}],
        )
    return {
        "properties": {
            "scaleConfiguration": {"maxConcurrentSessions": 10, "readySessionInstances": 2},
            "dynamicPoolConfiguration": {
                "lifecycleConfiguration": {"lifecycleType": "Timed", "cooldownPeriodInSeconds": 300}
            },
            "customContainerTemplate": {"containers": [container], "ingress": {"targetPort": 8080}},
        }
    }


async def clean_up(store: Store, runtime: Runtime, scope: str) -> None:
    """End every session and destroy every sandbox of this scope; pool definitions stay."""
    for name in await store.pool_names():
        for ident in await store.redis.hkeys(store.pk(name).sessions):
            await store.stop(name, text(ident), "stopped")
        for sid in await store.sandboxes(name):
            await store.retire(name, sid, "shutdown")
            await store.forget(name, sid)
    for obs in await runtime.list(scope):
        await runtime.destroy(obs.container)


def up_settings(settings: Settings, auth: str | None) -> Settings:
    """`up`'s settings: auth `required` when a credential source is configured, else `none`
    (unless `auth` says), and an open stack only ever on a loopback address.

    Raises:
        ValueError: auth is off and the listener is not loopback (the message says what to do).
    """
    if auth is None:
        has_credentials = settings.api_keys_file or settings.jwt_hs256_secret or settings.jwt_jwks
        auth = "required" if has_credentials else "none"
    settings = settings.replace(auth=auth)
    if auth == "none" and not is_loopback(settings.host):
        raise ValueError(
            f"up: refusing --host {settings.host} with auth off: anyone who reaches it could "
            "run code in sessions and use the admin API. Bind 127.0.0.1, or turn auth on: "
            "`sessionpool new-key me --role admin --role executor --file keys.yaml`, then "
            f"`sessionpool up --host {settings.host} --api-keys-file keys.yaml`"
        )
    return settings


async def up(
    settings: Settings, file: Path | None, runtime_name: str | None, own_redis: bool = True
) -> int:
    """Run Redis (when `own_redis`), a router and a worker until SIGINT/SIGTERM, then remove
    every sandbox. `runtime_name` None means docker when an engine answers, else process
    (on a loopback listener only: the process runtime is no security boundary).

    Raises:
        ValueError: no Docker engine answers and the listener is not loopback.
    """
    public = not is_loopback(settings.host)
    runtime: Runtime | None = None
    if runtime_name is None:
        runtime = await open_docker_runtime(settings)
        if runtime is None and public:
            raise ValueError(
                f"up: no Docker engine reachable, and the process runtime (sandboxes as host "
                f"processes, sharing the host's network) is never chosen by itself for "
                f"--host {settings.host}: start Docker, bind 127.0.0.1, or pass "
                "--runtime process to accept that"
            )
        if runtime is None:
            log.warning(
                "no Docker engine reachable: using the process runtime (NOT a security "
                "boundary; for development only)"
            )
    elif runtime_name == "process" and public:
        log.warning(
            "the process runtime serves %s: sessions run as host processes on the host's "
            "network (NOT a security boundary)",
            settings.host,
        )
    runtime_name = runtime_name or ("docker" if runtime is not None else "process")
    settings = settings.replace(runtime=runtime_name)
    tmp = tempfile.TemporaryDirectory(prefix="sessionpool-")
    redis_proc = None
    if own_redis:
        redis_proc, redis_url = start_redis(Path(tmp.name))
        settings = settings.replace(redis_url=redis_url)
    if settings.auth == "none":
        log.warning("auth is off: anyone who can reach %s can run sessions", settings.host)
    redis = open_redis(settings.redis_url)
    store = Store(redis, Keys(settings.key_prefix))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime = runtime or open_runtime(settings)
    worker = None
    runner = None
    try:
        await wait_redis(redis, 10.0)
        if file is not None:
            for name, change in await apply_file(
                store,
                file,
                settings.code_interpreter_image,
                settings.shell_image,
                limits=LimitPolicy.from_settings(settings),
            ):
                print(f"pool {name}: {change}", flush=True)
        elif await store.get_pool("demo") is None or redis_proc is not None:
            await store.put_pool(parse_pool("demo", demo_pool(runtime_name)))
        runner, port = await start_site(settings)
        worker = asyncio.create_task(run_worker(settings, runtime, stop))
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        url = f"{'https' if settings.tls_cert else 'http'}://{host}:{port}"
        redis_at = urlsplit(settings.redis_url).netloc.rpartition("@")[2]  # no password shown
        pools = await store.pool_names()
        print(
            f"sessionpool is up: router {url} (runtime {runtime_name}, "
            f"redis {urlsplit(settings.redis_url)._replace(netloc=redis_at).geturl()})",
            flush=True,
        )
        for name in pools:
            print(f"  pool {name}: {url}/pools/{name}", flush=True)
        if pools:
            key = ' -H "Authorization: Bearer $KEY"' if settings.auth == "required" else ""
            print(f"try:  curl{key} '{url}/pools/{pools[0]}/hello?identifier=me-1'", flush=True)
        print("Ctrl-C stops everything and removes every sandbox.", flush=True)
        done, _ = await asyncio.wait(
            {worker, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if worker in done:
            worker.result()  # a crashed worker is an error, not a quiet exit
    finally:
        stop.set()
        if runner is not None:
            await runner.cleanup()
        if worker is not None and not worker.done():
            await worker  # closes its runtime; sandboxes are removed below through a new one
        cleanup_runtime = open_runtime(settings) if runtime_name == "docker" else runtime
        with contextlib.suppress(*REDIS_ERRORS):
            await clean_up(store, cleanup_runtime, settings.key_prefix)
        if cleanup_runtime is not runtime:
            await cleanup_runtime.close()
        await redis.aclose()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait()
        tmp.cleanup()
        print("sessionpool stopped; no sandbox left behind.", flush=True)
    return 0
