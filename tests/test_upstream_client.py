"""The router's keep-alive upstream client (router/upstream.py behind proxy.HttpForwarder)
against raw TCP servers that answer with exactly the bytes each test scripts."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from router import proxy, upstream
from router.errors import SessionPoolError
from router.target import Target
from router.upstream import Clients
from tests.helpers import wait_until


@dataclass
class Seen:
    """One request as it arrived on the wire."""

    conn: int  # which connection (0, 1, …) carried it
    head: bytes
    body: bytes
    reader: asyncio.StreamReader


@dataclass
class Raw:
    """A loopback HTTP/1.1 server whose answers are scripted bytes: `answer(seen)` writes
    to the stream and says whether the connection stays open."""

    answer: Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed: int = 0  # connections whose client end closed or dropped
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def addr(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> Raw:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await _read_body(reader, head)
                seen = Seen(index, head, body, reader)
                self.seen.append(seen)
                if not await self.answer(seen, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self.closed += 1
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return body
            body += data[:-2]
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    return b""


def headers_of(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode().split("\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines if ln)]


def ok(body: bytes, extra: str = "") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra.encode(), body)


@dataclass
class Edge:
    """An aiohttp server forwarding every request to `target` with HttpForwarder."""

    clients: Clients
    base: str
    target: list[str]


@pytest.fixture
async def edge() -> AsyncIterator[Callable[..., Awaitable[Edge]]]:
    servers: list[TestServer] = []
    made: list[Clients] = []

    async def start(
        max_body_bytes: int = 1 << 30,
        idle_timeout_s: float = 30.0,
        max_idle: int = 8,
        pool_idle_s: float = 30.0,
        max_open: int = 64,
        connect_timeout_s: float = 2.0,
        long_exchange_s: float = upstream.LONG_EXCHANGE_S,
    ) -> Edge:
        clients = Clients(
            connect_timeout_s, idle_timeout_s, max_idle, pool_idle_s, max_open, long_exchange_s
        )
        made.append(clients)
        target: list[str] = []

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                forwarder = proxy.HttpForwarder(clients, max_body_bytes)
                return await forwarder.forward(
                    request, target[0], Target.whole("", request.raw_path)
                )
            except SessionPoolError as exc:
                return web.Response(status=exc.status, text=exc.code)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        return Edge(clients, f"http://127.0.0.1:{server.port}", target)

    yield start
    for server in servers:
        await server.close()
    for clients in made:
        clients.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


Answer = Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]


async def raw_server(answer: Answer) -> Raw:
    return await Raw(answer).start()


async def edge_to(
    edge: Callable[..., Awaitable[Edge]], answer: Answer, **options: Any
) -> tuple[Raw, Edge]:
    """A raw server scripted by `answer` and an edge (made with `options`) in front of it."""
    up = await raw_server(answer)
    e = await edge(**options)
    e.target.append(up.addr)
    return up, e


def answers_ok(body: bytes, held: asyncio.Event | None = None) -> Answer:
    """Every request answered 200 with `body` (once `held` is set, if given), the connection
    kept open."""

    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        if held is not None:
            await held.wait()
        w.write(ok(body))
        await w.drain()
        return True

    return answer


async def test_framings_are_relayed_and_only_clean_ends_are_reused(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        path = seen.head.split(b" ")[1]
        if path == b"/length":
            w.write(ok(b"0123456789"))
        elif path == b"/chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            w.write(b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
        elif path == b"/continue":
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after 100"))
        elif path == b"/empty":
            w.write(b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n")
        elif path == b"/head":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        elif path == b"/close":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
            await w.drain()
            return False
        elif path == b"/gzip":
            w.write(ok(b"\x1f\x8b not really gzip", "Content-Encoding: gzip\r\n"))
        await w.drain()
        return True

    up, e = await edge_to(edge, answer)
    expected = {
        "/length": (200, b"0123456789"),
        "/chunked": (200, b"hello world"),
        "/continue": (200, b"after 100"),
        "/empty": (204, b""),
        "/gzip": (200, b"\x1f\x8b not really gzip"),
    }
    for path, (status, body) in expected.items():
        async with http.get(e.base + path) as r:
            assert (r.status, await r.read()) == (status, body), path
            if path == "/gzip":
                assert r.headers["Content-Encoding"] == "gzip"  # relayed, not decoded
            if path == "/length":
                assert r.headers["Content-Length"] == "10"
    # Every clean keep-alive answer left the one connection for the next request.
    assert up.connections == 1
    assert {s.conn for s in up.seen} == {0}

    async with http.head(e.base + "/head") as r:
        assert (r.status, r.headers["Content-Length"], await r.read()) == (200, "1000", b"")
    async with http.get(e.base + "/close") as r:
        assert (r.status, await r.read()) == (200, b"until the end")
    async with http.get(e.base + "/length") as r:
        assert await r.read() == b"0123456789"
    # HEAD's connection is not trusted again; the until-close answer ended its connection.
    assert up.connections == 3
    await up.close()


async def test_header_hygiene_and_body_framing_on_the_wire(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        w.write(ok(hashlib.sha256(seen.body).hexdigest().encode(), "Connection: close\r\n"))
        await w.drain()
        return False

    up, e = await edge_to(edge, answer)
    sent = {
        "Connection": "keep-alive, X-Secret",
        "X-Secret": "hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic x",
        "Authorization": "Bearer caller-token",
        "X-Custom": "kept",
    }
    own = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")  # the caller sends none
    post = http.post(e.base + "/up?q=1", data=b"x" * 1000, headers=sent, skip_auto_headers=own)
    async with post as r:
        assert await r.read() == hashlib.sha256(b"x" * 1000).hexdigest().encode()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * 70_000

    async with http.put(e.base + "/stream", data=chunks()) as r:
        assert await r.read() == hashlib.sha256(b"y" * 210_000).hexdigest().encode()
    async with http.post(e.base + "/nobody") as r:
        assert r.status == 200

    declared, streamed, empty = up.seen
    assert declared.head.startswith(b"POST /up?q=1 HTTP/1.1\r\n")
    names = [k for k, _ in headers_of(declared.head)]
    assert names.count("host") == 1 and dict(headers_of(declared.head))["host"] == up.addr
    assert names.count("content-length") == 1
    assert dict(headers_of(declared.head))["content-length"] == "1000"
    assert dict(headers_of(declared.head))["x-custom"] == "kept"
    for dropped in ("connection", "x-secret", "keep-alive", "te", "upgrade", "authorization"):
        assert dropped not in names, dropped
    assert "proxy-authorization" not in names
    assert dict(headers_of(streamed.head))["transfer-encoding"] == "chunked"
    assert "content-length" not in [k for k, _ in headers_of(streamed.head)]
    assert streamed.body == b"y" * 210_000
    assert dict(headers_of(empty.head))["content-length"] == "0"
    # Nothing the client library would invent on its own.
    for invented in ("user-agent", "accept-encoding", "content-type"):
        assert invented not in names
    await up.close()


async def pooled_after_first(
    edge: Callable[..., Awaitable[Edge]],
    http: aiohttp.ClientSession,
    then: Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]],
) -> tuple[Raw, Edge]:
    """An edge in front of a raw server that answers `/first` (leaving that connection in the
    router's idle pool) and hands every later request to `then`."""

    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        if b"/first" in seen.head:
            w.write(ok(b"first"))
            await w.drain()
            return True
        return await then(seen, w)

    up, e = await edge_to(edge, answer)
    async with http.get(e.base + "/first") as r:
        assert await r.read() == b"first"
    return up, e


async def test_a_stale_pooled_connection_is_retried_once_only_when_idempotent(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    async def again(seen: Seen, w: asyncio.StreamWriter) -> bool:
        if seen.conn == 0:  # a kept-alive connection the session drops when used again
            return False
        w.write(ok(b"again"))
        await w.drain()
        return True

    up, e = await pooled_after_first(edge, http, again)
    async with http.get(e.base + "/second") as r:
        assert (r.status, await r.read()) == (200, b"again")
    assert up.connections == 2
    assert [(s.conn, s.head.split(b" ")[1]) for s in up.seen] == [
        (0, b"/first"),
        (0, b"/second"),
        (1, b"/second"),
    ]
    await up.close()


async def test_post_on_a_stale_connection_is_not_repeated(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    async def drop(seen: Seen, w: asyncio.StreamWriter) -> bool:
        return False  # the POST's connection drops before any byte of an answer

    up, e = await pooled_after_first(edge, http, drop)
    async with http.post(e.base + "/second", data=b"once") as r:
        assert (r.status, await r.text()) == (502, "SessionUnreachable")
    assert [s.head.split(b" ")[1] for s in up.seen] == [b"/first", b"/second"]
    await up.close()


async def test_client_disconnect_discards_the_half_read_connection(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    dropped = asyncio.Event()

    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        if b"/slow" in seen.head:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
            await w.drain()
            # A router that pooled this half-read connection would send the next request
            # here; read() returns only at the router's close.
            assert await seen.reader.read() == b""
            dropped.set()
            return False
        w.write(ok(b"whole"))
        await w.drain()
        return True

    up, e = await edge_to(edge, answer)
    async with http.get(e.base + "/slow") as r:
        assert await r.content.readexactly(4) == b"half"
    # The caller left: the router closes the sandbox connection instead of pooling it.
    await asyncio.wait_for(dropped.wait(), 10)
    async with http.get(e.base + "/next") as r:
        assert (r.status, await r.read()) == (200, b"whole")
    assert [s.conn for s in up.seen] == [0, 1]
    await up.close()


async def test_timeouts_and_a_refused_connect(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        if b"/stall-body" in seen.head:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
            await w.drain()
        await asyncio.sleep(30)
        return False

    up, e = await edge_to(edge, answer, idle_timeout_s=0.3)
    async with http.get(e.base + "/stall-head") as r:
        assert (r.status, await r.text()) == (504, "SessionTimeout")
    async with http.get(e.base + "/stall-body") as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()  # cut: the declared length never arrives
    await up.close()  # nothing listens there any more
    async with http.get(e.base + "/refused") as r:
        assert (r.status, await r.text()) == (502, "SessionUnreachable")


async def test_body_cap_on_a_streamed_upload(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    up, e = await edge_to(edge, answers_ok(b"never"), max_body_bytes=100_000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"z" * 50_000

    async with http.post(e.base + "/big", data=chunks()) as r:
        assert (r.status, await r.text()) == (413, "RequestTooLarge")
    await up.close()


async def test_a_slow_reader_pauses_the_sandbox(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    size = 64 << 20
    sent = 0
    writers: list[asyncio.StreamWriter] = []

    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        nonlocal sent
        writers.append(w)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"b" * (1 << 20)
        while sent < size:
            w.write(block)
            sent += len(block)
            await w.drain()
        return True

    up, e = await edge_to(edge, answer)
    async with http.get(e.base + "/big", read_bufsize=1 << 16) as r:
        assert await r.content.readexactly(1 << 16) == b"b" * (1 << 16)
        # The caller stopped reading: the sandbox is held back (its socket fills up) by the
        # kernel buffers and the router's bounded buffer, far short of the whole body.
        await wait_until(
            lambda: sent >= size or writers[0].transport.get_write_buffer_size() > 0,
            timeout=20,
        )
        assert sent < size // 2
        got = 1 << 16
        while chunk := await r.content.read(1 << 20):
            got += len(chunk)
        assert got == size
    await up.close()


async def test_idle_connections_are_bounded_in_count_and_time(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    arrived = 0
    all_in = asyncio.Event()

    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        nonlocal arrived
        arrived += 1
        if arrived == 3:
            all_in.set()
        await all_in.wait()  # three requests in flight at once: three connections
        w.write(ok(b"fine"))
        await w.drain()
        return True

    up, e = await edge_to(edge, answer, max_idle=1, pool_idle_s=0.5)

    async def get() -> bytes:
        async with http.get(e.base + "/x") as r:
            return await r.read()

    assert await asyncio.gather(get(), get(), get()) == [b"fine"] * 3
    assert up.connections == 3
    # One is kept for the next request; the two over the bound are closed at once.
    await wait_until(lambda: up.closed == 2, timeout=5)
    assert [len(p.idle) for p in e.clients.pools.values()] == [1]
    # And the kept one is closed once idle for pool_idle_s.
    await wait_until(lambda: up.closed == 3, timeout=10)
    assert not e.clients.pools
    await up.close()


async def test_a_caller_who_leaves_before_the_answer_leaves_a_reusable_connection(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()

    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        if b"/slow" in seen.head:
            await release.wait()  # answered only after the caller gave up
        w.write(ok(b"done"))
        await w.drain()
        return True

    up, e = await edge_to(edge, answer)

    async def slow() -> bytes:
        async with http.get(e.base + "/slow") as r:
            return await r.read()

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slow(), 0.5)
    await wait_until(lambda: len(up.seen) == 1, timeout=5)
    release.set()
    # The router read the answer nobody waits for and pooled the connection again.
    await wait_until(lambda: sum(len(p.idle) for p in e.clients.pools.values()) == 1, timeout=5)
    async with http.get(e.base + "/next") as r:
        assert (r.status, await r.read()) == (200, b"done")
    assert up.connections == 1 and up.closed == 0
    assert [s.conn for s in up.seen] == [0, 0]
    await up.close()


async def test_connects_to_one_sandbox_are_bounded_and_waiters_take_released_connections(
    monkeypatch: pytest.MonkeyPatch,
    edge: Callable[..., Awaitable[Edge]],
    http: aiohttp.ClientSession,
) -> None:
    monkeypatch.setattr(upstream, "MAX_CONNECTING", 2)
    opening = most = 0
    real_open = Clients.open

    async def slow_open(self: Clients, pool: upstream.Pool) -> upstream.Connection:
        nonlocal opening, most
        opening += 1
        most = max(most, opening)
        try:
            await asyncio.sleep(0.05)
            return await real_open(self, pool)
        finally:
            opening -= 1

    monkeypatch.setattr(Clients, "open", slow_open)

    up, e = await edge_to(edge, answers_ok(b"fine"), max_idle=64)

    async def get() -> bytes:
        async with http.get(e.base + "/x") as r:
            return await r.read()

    assert await asyncio.gather(*(get() for _ in range(20))) == [b"fine"] * 20
    assert most == 2  # never more than MAX_CONNECTING connects at once
    assert up.connections < 20  # later callers took connections the first ones released
    await up.close()


async def test_connections_to_one_sandbox_are_capped_and_callers_wait_in_line(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    up, e = await edge_to(edge, answers_ok(b"fine", release), max_open=2)

    async def get() -> bytes:
        async with http.get(e.base + "/x") as r:
            return await r.read()

    calls = [asyncio.create_task(get()) for _ in range(6)]
    await wait_until(lambda: len(up.seen) == 2, timeout=5)
    pool = e.clients.pools[up.addr]
    await wait_until(lambda: len(pool.waiters) == 4, timeout=5)  # the rest wait, unsent
    assert up.connections == 2 and len(up.seen) == 2
    release.set()
    assert await asyncio.gather(*calls) == [b"fine"] * 6
    assert up.connections == 2  # the four waiters took the two released connections
    assert not pool.waiters
    await up.close()


async def test_nobody_waits_behind_long_requests_and_the_cap_holds_for_short_ones(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()

    async def answer(seen: Seen, w: asyncio.StreamWriter) -> bool:
        if seen.head.startswith(b"GET /long "):
            await release.wait()  # a long poll: answered when the test says
        w.write(ok(b"fine"))
        await w.drain()
        return True

    up, e = await edge_to(edge, answer, max_open=2, long_exchange_s=0.3, connect_timeout_s=30)

    async def get(path: str) -> tuple[int, bytes]:
        async with http.get(e.base + path) as r:
            return r.status, await r.read()

    longs = [asyncio.create_task(get("/long")) for _ in range(2)]
    await wait_until(lambda: len(up.seen) == 2, timeout=5)
    pool = e.clients.pools[up.addr]
    # Both connections the cap allows are held by long polls: a short request still gets
    # through (before the long ones end, and long before the 30 s wait would run out).
    assert await get("/short") == (200, b"fine")
    assert pool.long == 2 and not any(t.done() for t in longs)
    # The cap still holds for short requests: at most 2 more connections carry them.
    assert await asyncio.gather(*(get("/short") for _ in range(8))) == [(200, b"fine")] * 8
    assert up.connections <= 4
    release.set()
    assert await asyncio.gather(*longs) == [(200, b"fine")] * 2
    assert pool.long == 0  # ended exchanges count again
    assert len(pool.live) == up.connections - up.closed
    await up.close()


async def test_a_caller_waiting_for_a_connection_past_the_connect_timeout_gets_504(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    up, e = await edge_to(edge, answers_ok(b"fine", release), max_open=1, connect_timeout_s=0.3)
    first = asyncio.create_task(http.get(e.base + "/first"))
    await wait_until(lambda: len(up.seen) == 1, timeout=5)
    async with http.get(e.base + "/second") as r:
        assert (r.status, await r.text()) == (504, "SessionTimeout")
    release.set()
    async with await first as r:
        assert (r.status, await r.read()) == (200, b"fine")
    assert up.connections == 1 and len(up.seen) == 1
    assert not e.clients.pools[up.addr].waiters
    await up.close()


async def test_a_waiter_who_leaves_passes_its_turn_on(
    edge: Callable[..., Awaitable[Edge]], http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    up, e = await edge_to(edge, answers_ok(b"fine", release), max_open=1)

    async def get(path: str) -> bytes:
        async with http.get(e.base + path) as r:
            return await r.read()

    first = asyncio.create_task(get("/first"))
    await wait_until(lambda: len(up.seen) == 1, timeout=5)
    pool = e.clients.pools[up.addr]
    with pytest.raises(TimeoutError):  # the caller leaves while in line
        await asyncio.wait_for(get("/leaves"), 0.3)
    third = asyncio.create_task(get("/third"))
    await wait_until(lambda: sum(not w.done() for _, w in pool.waiters) == 1, timeout=5)
    release.set()
    assert await asyncio.gather(first, third) == [b"fine", b"fine"]
    assert [s.head.split(b" ")[1] for s in up.seen] == [b"/first", b"/third"]
    assert up.connections == 1
    await up.close()


def digest_answer(seen: Seen, w: asyncio.StreamWriter) -> Awaitable[bool]:
    """200 with the sha256 of the body the sandbox received; the connection kept open."""

    async def answer() -> bool:
        w.write(ok(hashlib.sha256(seen.body).hexdigest().encode()))
        await w.drain()
        return True

    return answer()


async def test_a_large_declared_body_goes_up_whole_and_the_callers_connection_closes_after(
    edge: Callable[..., Awaitable[Edge]],
) -> None:
    """A body of at least RAW_BODY_MIN goes from the caller's socket to the sandbox's
    (`proxy.RawBody`): every byte arrives, bytes after it (a pipelined request) are not
    served, the caller's connection closes after the answer, the sandbox's is reused."""
    up, e = await edge_to(edge, digest_answer)
    body = bytes(range(256)) * (3 * proxy.RAW_BODY_MIN // 256 + 7)
    port = int(e.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: e\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 100_000):  # in pieces, as a network would deliver them
        writer.write(body[i : i + 100_000])
        await writer.drain()
    writer.write(b"GET /pipelined HTTP/1.1\r\nHost: e\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)  # until the router closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert answer.endswith(hashlib.sha256(body).hexdigest().encode())
    assert answer.count(b"HTTP/1.1") == 1  # the pipelined request was not served
    assert [s.head.split(b" ")[1] for s in up.seen] == [b"/up"]
    # The exchange ended cleanly: the sandbox's connection serves the next caller.
    async with (
        aiohttp.ClientSession() as http,
        http.post(e.base + "/again", data=io.BytesIO(body)) as r,
    ):
        assert r.headers["Connection"] == "close"
        assert await r.read() == hashlib.sha256(body).hexdigest().encode()
    assert up.connections == 1
    await up.close()


async def test_a_large_upload_answered_early_or_abandoned_ends_cleanly(
    edge: Callable[..., Awaitable[Edge]],
) -> None:
    """The sandbox answers before reading a large body: the caller gets the answer at once
    (aiohttp does not wait for the body it never saw) and the sandbox's connection, with
    the body half sent, is not reused. A caller who leaves mid-body: the sandbox's
    connection closes and the router serves on."""
    heads: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                if head.startswith(b"POST /early "):
                    w.write(ok(b"too big for me", "Connection: close\r\n"))
                    await w.drain()
                while await reader.read(1 << 16):  # never answers /slow; reads to the end
                    pass
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    e = await edge()
    e.target.append(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
    port = int(e.base.rsplit(":", 1)[1])
    size = 8 * proxy.RAW_BODY_MIN

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /early HTTP/1.1\r\nHost: e\r\nContent-Length: %d\r\n\r\n" % size)
    writer.write(b"x" * (size // 4))
    answer = b""
    while not answer.endswith(b"too big for me"):  # the answer, without the rest of the body
        answer += await asyncio.wait_for(reader.read(1 << 16), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in answer

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /slow HTTP/1.1\r\nHost: e\r\nContent-Length: %d\r\n\r\n" % size)
    writer.write(b"y" * (size // 4))
    await writer.drain()
    await wait_until(lambda: len(heads) == 2, timeout=10)
    writer.transport.abort()  # the caller leaves, three quarters of its body unsent
    await wait_until(lambda: all(w.transport.is_closing() for w in writers), timeout=10)
    pool = e.clients.pools.get(e.target[0])
    assert pool is None or not pool.idle  # neither half-used connection went back
    server.close()


async def test_a_large_upload_to_a_sandbox_that_does_not_read_holds_the_caller_back(
    edge: Callable[..., Awaitable[Edge]],
) -> None:
    size = 64 << 20
    sent = 0
    release = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await release.wait()  # reads nothing of the body until told to
        body = await _read_body(reader, head)
        w.write(ok(hashlib.sha256(body).hexdigest().encode()))
        await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    e = await edge()
    e.target.append(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
    block = b"q" * (1 << 20)

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < size:
            sent += len(block)
            yield block

    async with aiohttp.ClientSession() as http:
        length = {"Content-Length": str(size)}  # declared: the raw body path (`RawBody`)
        call = asyncio.create_task(http.post(e.base + "/up", data=chunks(), headers=length))
        await wait_until(lambda: sent >= 4 << 20 and e.target[0] in e.clients.pools, timeout=10)
        pool = e.clients.pools[e.target[0]]
        await wait_until(lambda: len(pool.live) == 1, timeout=10)
        (conn,) = pool.live
        # The sandbox reads nothing: the router pauses the caller rather than buffer the body.
        assert conn.transport is not None
        await wait_until(lambda: conn.transport.get_write_buffer_size() > 0, timeout=10)
        assert sent < size // 2
        assert conn.transport.get_write_buffer_size() < 8 << 20
        release.set()
        async with await call as r:
            assert (
                await r.read() == hashlib.sha256(block * (size // len(block))).hexdigest().encode()
            )
    server.close()


async def test_a_large_body_after_100_continue_goes_up_whole(
    edge: Callable[..., Awaitable[Edge]],
) -> None:
    """curl sends `Expect: 100-continue` before a large body and waits for the 100."""
    up, e = await edge_to(edge, digest_answer)
    body = b"c" * (2 * proxy.RAW_BODY_MIN + 3)
    port = int(e.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"PUT /file HTTP/1.1\r\nHost: e\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
        % len(body)
    )
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(body)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(hashlib.sha256(body).hexdigest().encode())
    assert b"Connection: close\r\n" in answer
    await up.close()
