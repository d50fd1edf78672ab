"""A local stand-in for session containers: one aiohttp process serving one or more ports.

Routes: `/small` (a 40-byte body, like the nginx upstream), `/download?size=N` (N bytes from
memory), any POST/PUT (the body is read and counted, nothing else), `/ws` (WebSocket echo) and
`/health`.

    python bench/upstream.py COUNT PORTS_FILE

binds COUNT ephemeral ports on 127.0.0.1 and, once all listen, writes them to PORTS_FILE.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

from aiohttp import WSMsgType, web

SMALL = b"0123456789012345678901234567890123456789"
CHUNK = bytes(range(256)) * 1024  # 256 KiB


async def small(request: web.Request) -> web.Response:
    return web.Response(body=SMALL, content_type="text/plain")


async def download(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("size", "0"))
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = size
    await resp.prepare(request)
    left = size
    while left > 0:
        piece = CHUNK if left >= len(CHUNK) else CHUNK[:left]
        await resp.write(piece)
        left -= len(piece)
    await resp.write_eof()
    return resp


async def sink(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    return web.json_response({"body_bytes": size})


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            await sock.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sock.send_bytes(msg.data)
    return sock


async def serve(count: int, ports_file: Path) -> None:
    app = web.Application(client_max_size=1 << 40)
    app.router.add_get("/download", download)
    app.router.add_get("/ws", ws)
    app.router.add_post("/{tail:.*}", sink)
    app.router.add_put("/{tail:.*}", sink)
    app.router.add_get("/{tail:.*}", small)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(count):
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        assert site._server is not None
        assert site._server.sockets
        ports.append(site._server.sockets[0].getsockname()[1])
    tmp = ports_file.with_suffix(".tmp")
    tmp.write_text(" ".join(map(str, ports)))
    tmp.rename(ports_file)
    await asyncio.Event().wait()


def main() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2])))


if __name__ == "__main__":
    main()
