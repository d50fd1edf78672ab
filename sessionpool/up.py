"""`sessionpool up`: Redis, a router and a worker on this machine, in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from router.addresses import is_loopback
from router.errors import SandboxRuntimeError
from router.keys import Keys
from router.limits import LimitPolicy
from router.pools import parse_pool
from router.server import start_site
from router.settings import Settings
from router.store import Store, open_redis, wait_redis
from sessionpool.local_redis import RedisServer
from sessionpool.poolfile import apply_file
from workers.context import REDIS_ERRORS
from workers.main import open_runtime
from workers.main import run as run_worker
from workers.runtime import Runtime

log = logging.getLogger("sessionpool.up")
# The demo app ships inside the package, so `up --runtime process` works from a wheel too.
ECHO = Path(__file__).resolve().parent / "demo" / "echo.py"


def without_password(url: str) -> str:
    """`url` with its credentials left out (for printing)."""
    parts = urlsplit(url)
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}{query}"


async def open_docker_runtime(settings: Settings) -> Runtime | None:
    """The docker runtime when an engine answers, else None (through the runtime: only
    runtime modules import an engine's SDK)."""
    runtime = open_runtime(settings.replace(runtime="docker"))
    try:
        await runtime.list(settings.key_prefix)
    except SandboxRuntimeError:
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
        for ident in await store.session_ids(name):
            await store.stop(name, ident, "stopped")
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
    redis_server = None
    if own_redis:
        # A private redis-server: a unix socket, nothing persisted, a random password (a
        # process-runtime sandbox is a host process); a session of its own, so Ctrl-C does
        # not stop Redis before the sandboxes are removed.
        if shutil.which("redis-server") is None:
            raise SystemExit(
                "sessionpool up: redis-server not found (apt-get install redis-server), "
                "or pass --redis-url"
            )
        redis_server = RedisServer(Path(tmp.name), password=True).start(new_session=True)
        settings = settings.replace(redis_url=redis_server.url)
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
        elif await store.get_pool("demo") is None or redis_server is not None:
            await store.put_pool(parse_pool("demo", demo_pool(runtime_name)))
        runner, port = await start_site(settings)
        worker = asyncio.create_task(run_worker(settings, runtime, stop))
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        url = f"{'https' if settings.tls_cert else 'http'}://{host}:{port}"
        pools = await store.pool_names()
        print(
            f"sessionpool is up: router {url} (runtime {runtime_name}, "
            f"redis {without_password(settings.redis_url)})",
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
        if redis_server is not None:
            redis_server.stop()
        tmp.cleanup()
        print("sessionpool stopped; no sandbox left behind.", flush=True)
    return 0
