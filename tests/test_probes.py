"""The startup probe (no Docker): polled until the port accepts, then the probe itself, and a
sandbox is started only when the probe passes, not when its port merely accepts."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from aiohttp import web

from sessionpool.testing import make_pool
from workers.probes import wait_started


def _closed_port() -> tuple[socket.socket, int]:
    """A bound, not yet listening socket: connects to its port are refused until listen()."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock, int(sock.getsockname()[1])


async def test_http_probe_waits_for_the_port_then_for_a_passing_answer() -> None:
    sock, port = _closed_port()
    answers = [503, 503, 200]
    seen: list[int] = []

    async def health(request: web.Request) -> web.Response:
        status = answers[min(len(seen), len(answers) - 1)]
        seen.append(status)
        return web.Response(status=status)

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    probe = {"type": "Startup", "httpGet": {"path": "/health", "port": port}}
    pool = make_pool("probed", target_port=port, container={"probes": [probe]})
    async with aiohttp.ClientSession() as http:
        started = asyncio.create_task(wait_started(http, f"127.0.0.1:{port}", pool))
        await asyncio.sleep(0.05)  # the scenario: the probe meets a closed port first
        assert not started.done()
        sock.listen(16)
        await web.SockSite(runner, sock).start()
        try:
            assert await asyncio.wait_for(started, 30)
        finally:
            await runner.cleanup()
    # The port accepting did not make it ready: each 503 was seen, then the 200 passed.
    assert seen == [503, 503, 200]


async def test_tcp_probe_passes_once_the_port_accepts() -> None:
    sock, port = _closed_port()
    probe = {"type": "Startup", "tcpSocket": {"port": port}}
    pool = make_pool("probed", target_port=port, container={"probes": [probe]})
    async with aiohttp.ClientSession() as http:
        started = asyncio.create_task(wait_started(http, f"127.0.0.1:{port}", pool))
        await asyncio.sleep(0.05)
        assert not started.done()
        sock.listen(16)
        try:
            assert await asyncio.wait_for(started, 30)
        finally:
            sock.close()
