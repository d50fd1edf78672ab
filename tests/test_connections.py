"""Connection bounds, from the attacker's side: raw sockets against a served router."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from aiohttp import web

from router.app import create_app
from router.connections import BoundedRunner, requests_inline_supported
from router.server import start_site
from router.settings import Settings
from tests.helpers import hold, wait_until

Start = Callable[..., Awaitable[tuple[BoundedRunner, int]]]


@pytest.fixture
async def serve(settings: Settings) -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def start(**changes: Any) -> tuple[BoundedRunner, int]:
        runner, port = await start_site(settings.replace(port=0, **changes))
        runners.append(runner)
        assert isinstance(runner, BoundedRunner)
        return runner, port

    yield start
    for runner in runners:
        await runner.cleanup()


async def exchange(port: int, raw: bytes) -> bytes:
    """Send `raw` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def served(port: int) -> bool:
    answer = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
    return answer.startswith(b"HTTP/1.1 200")


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        return True


async def test_slow_headers_are_cut_off_while_others_are_served(serve: Start) -> None:
    runner, port = await serve(header_timeout_s=0.5)
    slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
    for _, writer in slow:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: r\r\nX-Slow: ")  # and never the rest
    # A client trickling one header byte at a time is cut off too: bytes are not progress.
    trickle_reader, trickle = await asyncio.open_connection("127.0.0.1", port)
    trickle.write(b"GET /healthz HTTP/1.1\r\n")

    async def dribble() -> None:
        while not trickle.is_closing():
            trickle.write(b"X-A: b\r\n")
            await asyncio.sleep(0.05)

    dribbler = asyncio.create_task(dribble())
    assert await served(port)  # everyone else is served meanwhile
    for reader, _ in slow:
        assert await closed_by_server(reader)
    assert await closed_by_server(trickle_reader)
    dribbler.cancel()
    assert runner.bounds.metrics.header_timeouts._value.get() >= 21
    assert await served(port)
    for _, writer in slow:
        writer.close()
    trickle.close()


async def test_an_idle_keepalive_connection_gets_a_fresh_header_timeout(serve: Start) -> None:
    _, port = await serve(header_timeout_s=0.5, keepalive_timeout_s=30.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /healthz HTTP/1.1\r\nHost: r\r\n\r\n"
    for _ in range(2):
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        # Idle for longer than the header timeout: idling is the keep-alive timer's business.
        await asyncio.sleep(1.0)
    writer.close()


async def cap_scenario(runner: BoundedRunner, port: int) -> None:
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    await wait_until(lambda: runner.bounds.open == 3)
    answer = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: r\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert b"\r\nRetry-After: 1" in head
    assert b'"ServerBusy"' in body
    assert runner.bounds.metrics.refused_connections._value.get() == 1
    held[0][1].close()
    await wait_until(lambda: runner.bounds.open == 2)
    assert await served(port)
    for _, writer in held[1:]:
        writer.close()


async def test_past_the_connection_cap_new_clients_get_503_and_retry_after(
    serve: Start,
) -> None:
    await cap_scenario(*await serve(max_connections=3))


def test_the_connection_cap_on_uvloop(settings: Settings) -> None:
    """The router serves on uvloop, whose transports are not asyncio.Transport subclasses."""

    async def scenario() -> None:
        runner, port = await start_site(settings.replace(port=0, max_connections=3))
        try:
            assert isinstance(runner, BoundedRunner)
            await cap_scenario(runner, port)
        finally:
            await runner.cleanup()

    uvloop.run(scenario())


async def test_malformed_requests_are_counted_and_logged_once_per_interval(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    _, port = await serve()
    bad = [
        b"GET / HTTP/1.1\r\nHost: r\r\nBad Header Line\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: r\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: r\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n",
    ] * 5
    with caplog.at_level(logging.DEBUG):
        for raw in bad:
            answer = await exchange(port, raw)
            assert answer.split(b" ", 2)[1] == b"400", answer
        assert await served(port)
        metrics = await exchange(
            port, b"GET /metrics HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
        )
    assert b"sessionpool_malformed_requests_total 20.0" in metrics
    ours = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(ours) == 1, [r.getMessage() for r in ours]
    assert ours[0].exc_info is None  # one line, no traceback
    noisy = [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.INFO]
    assert not noisy, [r.getMessage() for r in noisy]


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_requests_run_in_their_connections_task(settings: Settings, run: Any) -> None:
    """`run_requests_inline`: on Python < 3.12 a handler runs in its connection's task (no task
    per request), and still gets what a handler in a task of its own got: errors answered,
    a disconnect cancelling it, other tasks made as before."""
    inline = requests_inline_supported()
    seen: list[tuple[asyncio.Task[Any] | None, asyncio.Task[Any] | None]] = []
    cancelled = asyncio.Event()
    waiting = asyncio.Event()

    async def whoami(request: web.Request) -> web.Response:
        seen.append((asyncio.current_task(), request.task))
        # A task the handler makes is a real task, not run inline.
        child = asyncio.create_task(asyncio.sleep(0, "ok"))
        assert isinstance(child, asyncio.Task)
        return web.Response(text=await child)

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("handler failed")

    async def hang(request: web.Request) -> web.Response:
        return await hold(waiting, cancelled)

    async def scenario() -> None:
        cancelled.clear()
        waiting.clear()
        app = create_app(settings)
        app.router.add_get("/t/whoami", whoami)
        app.router.add_get("/t/boom", boom)
        app.router.add_get("/t/hang", hang)
        runner, port = await start_site(settings.replace(port=0), app)
        try:
            factory = asyncio.get_running_loop().get_task_factory()
            assert (factory is not None) == inline
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /t/whoami HTTP/1.1\r\nHost: r\r\n\r\n" * 2)
            writer.write(b"GET /t/boom HTTP/1.1\r\nHost: r\r\n\r\n")
            answers = await asyncio.wait_for(reader.read(), 10)  # boom closes the connection
            writer.close()
            assert answers.count(b"HTTP/1.1 200 OK") == 2, answers
            assert answers.count(b"HTTP/1.1 500") == 1, answers
            (first, conn), (second, conn2) = seen[-2:]
            assert conn is conn2 and first is not None
            # Inline: the handler runs in the connection's own task, both times.
            assert (first is conn and second is conn) == inline
            assert (first is not second) == (not inline)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /t/hang HTTP/1.1\r\nHost: r\r\n\r\n")
            await asyncio.wait_for(waiting.wait(), 10)
            writer.transport.abort()  # the caller leaves: the handler is cancelled
            await asyncio.wait_for(cancelled.wait(), 10)
            assert await served(port)
        finally:
            await runner.cleanup()

    run(scenario())
