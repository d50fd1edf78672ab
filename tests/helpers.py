"""Test helpers: polling with a deadline, fake sandboxes on loopback, seeding ready sandboxes."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import uuid
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from router.pools import Pool
from router.store import Store
from sessionpool import testing
from sessionpool.testing import wait_until

__all__ = ["FakeSandbox", "add_ready", "make_pool", "open_engine", "pattern_sha", "wait_until"]

ROOT = Path(__file__).resolve().parent.parent
CHUNK = bytes(range(256)) * 256  # 64 KiB of a known pattern


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
