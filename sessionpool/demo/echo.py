"""A test session server: echoes requests; SSE, WebSocket, download, exit and network probes.

Runs on Debian's python3-aiohttp (3.8), so nothing newer than that API is used.
"""

import asyncio
import contextlib
import hashlib
import os
import socket

from aiohttp import WSMsgType, web

CHUNK = bytes(range(256)) * 256  # 64 KiB of a known pattern (tests/helpers.py: pattern_sha)
HOSTNAME = socket.gethostname()


def _int(request, name, default):
    try:
        return int(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}: must be an integer\n") from None


async def health(request):
    return web.json_response({"status": "ok", "hostname": HOSTNAME})


async def echo(request):
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():  # streamed: any body size
        digest.update(chunk)
        size += len(chunk)
    return web.json_response(
        {
            "hostname": HOSTNAME,
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_sha256": digest.hexdigest(),
            "body_bytes": size,
        }
    )


async def sse(request):
    n, interval_ms = _int(request, "n", 3), _int(request, "interval_ms", 100)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    for i in range(n):
        if i:
            await asyncio.sleep(interval_ms / 1000)
        await resp.write(f"id: {i}\ndata: event {i}\n\n".encode())
    await resp.write_eof()
    return resp


async def ws(request):
    sock = web.WebSocketResponse(max_msg_size=64 << 20)
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            if msg.data.startswith("close:"):
                await sock.close(code=int(msg.data[6:]), message=b"bye")
                break
            await sock.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sock.send_bytes(msg.data)
    return sock


async def download(request):
    size = _int(request, "size", 0)
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = size
    await resp.prepare(request)
    left = size
    while left > 0:
        piece = CHUNK[: min(left, len(CHUNK))]
        await resp.write(piece)
        left -= len(piece)
    await resp.write_eof()
    return resp


async def exit_(request):
    code = _int(request, "code", 0)
    resp = web.json_response({"exiting": code})
    await resp.prepare(request)
    await resp.write_eof()
    # Leave a moment for the response to flush, then end the process without cleanup:
    # the container exits with exactly this code (the OnContainerExit lifecycle).
    asyncio.get_running_loop().call_later(0.05, os._exit, code)
    return resp


async def sleep(request):
    try:
        seconds = float(request.query.get("s", "1"))
    except ValueError:
        raise web.HTTPBadRequest(text="s: must be a number\n") from None
    await asyncio.sleep(seconds)
    return web.json_response({"slept_s": seconds, "hostname": HOSTNAME})


async def connect(request):
    """Try a TCP connection from inside the sandbox (the network-isolation tests use this)."""
    host = request.query.get("host", "")
    port = _int(request, "port", 80)
    timeout_ms = _int(request, "timeout_ms", 1000)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_ms / 1000)
    except TimeoutError:
        return web.json_response({"connected": False, "error": "timeout"})
    except OSError as e:
        return web.json_response({"connected": False, "error": f"{type(e).__name__}: {e}"})
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return web.json_response({"connected": True, "error": None})


def main():
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", ws)
    app.router.add_get("/download", download)
    app.router.add_route("*", "/exit", exit_)
    app.router.add_get("/sleep", sleep)
    app.router.add_get("/connect", connect)
    app.router.add_route("*", "/{tail:.*}", echo)
    serve(app)


def serve(app):
    """Serve `app` on $HOST:$PORT (0.0.0.0:8080), as every test session image does."""
    web.run_app(
        app,
        host=os.environ.get("HOST", "0.0.0.0"),
        port=int(os.environ.get("PORT", "8080")),
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
