"""Test helpers: polling with a deadline, fake sandboxes on loopback, seeding ready sandboxes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from router.pools import Pool
from router.settings import Settings
from router.store import Store
from sessionpool import testing
from sessionpool.testing import Process, wait_until
from workers.probes import tcp_connects as tcp_connects  # the tests' own TCP check too

__all__ = ["FakeSandbox", "add_ready", "make_pool", "open_engine", "pattern_sha", "wait_until"]

ROOT = Path(__file__).resolve().parent.parent
CHUNK = bytes(range(256)) * 256  # 64 KiB of a known pattern
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pattern_sha(size: int) -> str:
    h = hashlib.sha256()
    left = size
    while left > 0:
        h.update(CHUNK[: min(left, len(CHUNK))])
        left -= len(CHUNK)
    return h.hexdigest()


class FakeSandbox:
    """An HTTP server on loopback that plays a session container (like the echo image)."""

    def __init__(self) -> None:
        self.name = f"sbx-{uuid.uuid4().hex[:8]}"
        self.requests: list[dict[str, Any]] = []
        self.sse_release = asyncio.Queue[None]()
        self.slow_started = asyncio.Event()
        self.slow_release = asyncio.Event()
        self.cancelled = asyncio.Event()
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("GET", "/download", self.download)
        app.router.add_route("GET", "/sse", self.sse)
        app.router.add_route("GET", "/ws", self.ws)
        app.router.add_route("GET", "/hang", self.hang)
        app.router.add_route("GET", "/drop", self.drop)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def start(self) -> FakeSandbox:
        await self.server.start_server()
        return self

    async def close(self) -> None:
        await self.server.close()

    async def echo(self, request: web.Request) -> web.Response:
        h = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            size += len(chunk)
        info = {
            "sandbox": self.name,
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_sha256": h.hexdigest(),
            "body_bytes": size,
        }
        self.requests.append(info)
        return web.json_response(info)

    async def download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") != "1":
            resp.content_length = size
        await resp.prepare(request)
        left = size
        while left > 0:
            piece = CHUNK[: min(left, len(CHUNK))]
            await resp.write(piece)
            left -= len(piece)
        await resp.write_eof()
        return resp

    async def sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        for i in range(int(request.query.get("n", "3"))):
            await resp.write(f"id: {i}\ndata: event {i}\n\n".encode())
            await self.sse_release.get()  # the next event only after the client saw this one
        await resp.write_eof()
        return resp

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=["chat"])
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data[6:]), message=b"bye")
                    break
                await ws.send_str(f"{self.name}:{msg.data}")
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        self.requests.append({"ws_close_code": ws.close_code})
        return ws

    async def hang(self, request: web.Request) -> web.StreamResponse:
        self.slow_started.set()
        try:
            await self.slow_release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return web.Response(text="released")

    async def drop(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(0)
        return web.Response(text="unreachable")


def make_pool(
    name: str = "demo",
    *,
    ready: int = 5,
    max_sessions: int = 10,
    cooldown_s: int = 300,
    **props: Any,
) -> Pool:
    return testing.make_pool(
        name, ready=ready, max_sessions=max_sessions, cooldown_s=cooldown_s, **props
    )


async def add_ready(store: Store, pool: Pool, sandbox: FakeSandbox) -> str:
    """Put a running fake sandbox in the ready set exactly as the replenisher does."""
    return await testing.add_ready(store, pool, f"fake-{sandbox.name}", sandbox.addr)


def engine_fixture(*images: str) -> Any:
    """A module-scoped `engine` fixture: a Docker client, with `images` built when missing
    (`engine = engine_fixture(IMAGE)` in a suite). No engine: the tests fail, never skip."""

    @pytest.fixture(scope="module")
    def engine() -> Iterator[Any]:
        client, *others = [open_engine(image) for image in images]
        for other in others:
            other.close()
        yield client
        client.close()

    return engine


def open_engine(image: str) -> Any:
    """A Docker client, with `image` built by deploy/images/build.sh if it is missing. No
    engine: the caller fails here (Docker tests never skip)."""
    import docker

    client = docker.from_env()
    client.ping()
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        name = image.split("/", 1)[1].split(":", 1)[0]  # sessionpool/<name>:<tag>
        subprocess.run(["bash", str(ROOT / "deploy/images/build.sh"), name], check=True)
    return client


def multipart(filename: str, content: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart body with the file name on the wire as given (as `requests` sends it)."""
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + content + tail, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def wait_healthy(http: aiohttp.ClientSession, addr: str, timeout: float = 30.0) -> None:
    """Poll a sandbox's `GET /health` at `addr` (host:port) until it answers 200."""

    async def healthy() -> bool:
        try:
            async with http.get(
                f"http://{addr}/health", timeout=aiohttp.ClientTimeout(total=1)
            ) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    await wait_until(healthy, timeout=timeout)


async def remove_networks(prefix: str) -> None:
    """Remove the sandbox networks docker runtimes with `prefix` made, in either attach mode
    (a suite's teardown)."""
    from workers.docker import DockerRuntime

    for attach in ("engine", "direct"):
        runtime = DockerRuntime(network_prefix=prefix, network_attach=attach)
        try:
            await runtime.remove_networks()
        finally:
            await runtime.close()


@contextlib.asynccontextmanager
async def docker_worker(engine: Any, settings: Settings) -> AsyncIterator[Process]:
    """A docker-runtime worker of `settings`; on exit it is stopped (SIGTERM, then SIGKILL
    after 30 s) and whatever sandboxes of its scope it did not tear down are removed."""
    from workers.runtime import LABEL_SCOPE

    worker = await testing.spawn_worker(settings)
    try:
        yield worker
    finally:
        try:
            await testing.stop_process(worker, grace_s=30)
        finally:
            scope = f"{LABEL_SCOPE}={settings.key_prefix}"
            for c in engine.api.containers(all=True, filters={"label": scope}):
                engine.api.remove_container(c["Id"], force=True)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=300)


def iptables_has(rule: tuple[str, ...]) -> bool:
    """Whether the host's iptables holds `rule` (`-C`; waits up to 5 s for the xtables lock)."""
    return sh("iptables", "-w", "5", "-C", *rule, check=False).returncode == 0


def ensure_image(name: str, label: tuple[str, str] | None = None) -> None:
    """Build sessionpool/<name>:dev with deploy/images/build.sh when it is missing, or when its
    `label` (key, value) says it was built from an older tree."""
    key, want = label or ("", "")
    fmt = f'{{{{index .Config.Labels "{key}"}}}}' if key else "{{.Id}}"
    found = sh(
        "docker", "image", "inspect", "--format", fmt, f"sessionpool/{name}:dev", check=False
    )
    if found.returncode != 0 or (key and found.stdout.strip() != want):
        sh("bash", str(ROOT / "deploy/images/build.sh"), name)


def docker_runtime_fixtures(
    scope: str, prefix: str, ensure_image: Callable[[], None]
) -> tuple[Any, Any]:
    """A docker runtime suite's `engine` (module) and `runtime` fixtures:
    `engine, runtime = docker_runtime_fixtures(SCOPE, PREFIX, ensure_image)`. The engine must
    answer (fail, never skip) and `ensure_image` builds what is missing; afterwards the
    containers of `scope` and the networks of `prefix` are removed."""
    from workers.docker import DockerRuntime
    from workers.runtime import LABEL_SCOPE

    @pytest.fixture(scope="module")
    def engine() -> Iterator[None]:
        info = sh("docker", "info", "--format", "{{.ServerVersion}}", check=False)
        assert info.returncode == 0, f"Docker engine unreachable: {info.stderr.strip()}"
        ensure_image()
        yield
        ps = sh("docker", "ps", "-aq", "--filter", f"label={LABEL_SCOPE}={scope}")
        if left := ps.stdout.split():
            sh("docker", "rm", "-f", *left, check=False)
        asyncio.run(remove_networks(prefix))

    @pytest.fixture
    async def runtime(engine: None) -> AsyncIterator[DockerRuntime]:
        rt = DockerRuntime(network_prefix=prefix)
        yield rt
        await rt.close()

    return engine, runtime


@contextlib.asynccontextmanager
async def recording_server() -> AsyncIterator[tuple[int, list[str]]]:
    """A TCP server on every host address that records who connected and hangs up: (its port,
    the peers' addresses so far). What a sandbox must not reach."""
    peers: list[str] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        writer.close()

    server = await asyncio.start_server(on_connect, "0.0.0.0", 0)
    try:
        yield server.sockets[0].getsockname()[1], peers
    finally:
        server.close()
        await server.wait_closed()


def assert_png(image: dict[str, Any]) -> None:
    """`image` is an image result carrying a PNG."""
    assert image["type"] == "image", image
    assert base64.b64decode(image["base64_data"]).startswith(PNG_MAGIC)


async def hold(started: asyncio.Event, cancelled: asyncio.Event) -> Any:
    """Stand in for a call that never answers (a slow Redis, a hung handler): says when it
    started, and when it is cancelled."""
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancelled.set()
        raise
    raise AssertionError("not reached")
