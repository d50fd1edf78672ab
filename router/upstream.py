"""A keep-alive HTTP/1.1 client for the router's hop to a sandbox, on asyncio protocols and
httptools' llhttp parser: one pool of idle connections per sandbox address, the request head in
one send, both bodies streamed with backpressure, nothing decompressed or re-encoded.

A connection goes back to its pool only after a whole response was read, the whole request
body was sent and both sides said keep-alive; anything else (a cancel, an error, a HEAD, bytes
after the response) closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterable

import httptools
from multidict import CIMultiDict

HIGH_WATER = 256 * 1024  # response bytes buffered before the sandbox is paused
LOW_WATER = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # a response's status line and headers
MAX_CONNECTING = 32  # connects in progress to one sandbox at once
DRAIN_BYTES = 64 * 1024  # what is read of an answer its caller left, before giving up on it
DRAIN_S = 1.0
# An exchange that has gone on this long (a stream, a long poll, a slow answer) no longer
# counts against `Clients.max_open`, so callers of a session never wait behind its long
# requests; the line is looked at this often while anyone waits in it.
LONG_EXCHANGE_S = 1.0
LINE_CHECK_S = 0.25
_FRAMING_NAMES = frozenset({b"transfer-encoding", b"content-length", b"connection"})


class UpstreamError(Exception):
    """The connection failed; `before_response`: no byte of the response had arrived."""

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class ConnectError(UpstreamError):
    pass


class IdleTimeout(UpstreamError):
    pass


class Response:
    """The status line and headers of an answer; its body is `Connection.body()`. `raw` holds
    the header lines as they arrived (bytes), `connection` the values of its Connection
    headers (the hop-by-hop names they add)."""

    __slots__ = ("_headers", "connection", "keep_alive", "raw", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: str,
        raw: list[tuple[bytes, bytes]],
        keep_alive: bool,
        connection: list[bytes] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.raw = raw
        self.keep_alive = keep_alive
        self.connection = connection or []
        self._headers: CIMultiDict[str] | None = None

    @property
    def headers(self) -> CIMultiDict[str]:
        if self._headers is None:
            self._headers = CIMultiDict((_text(n), _text(v)) for n, v in self.raw)
        return self._headers


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


class Connection(asyncio.Protocol):
    """One TCP connection to a sandbox, serving one exchange at a time.

    One timer per connection, armed when it opens and re-armed at most every
    `Clients.granule_s`, checks both the exchange's idle timeout and the pool's idle time:
    an exchange starting or ending touches no timer.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self._writable: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._tick_handle: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._started = 0.0  # when the exchange began
        self.long = False  # its exchange is past `Clients.long_exchange_s` (`Pool.long`)
        # Kept across exchanges: llhttp starts the next message where the last one ended.
        self._parser = httptools.HttpResponseParser(self)
        self._drain_handle: asyncio.TimerHandle | None = None
        self._draining = False
        self._reset(head_request=False)

    def _reset(self, head_request: bool) -> None:
        self._head_request = head_request
        self._active = False
        self._got_bytes = False
        self._head_bytes = 0
        self._reason = ""
        self._head_done = False
        self._keep_alive = False
        self._raw: list[tuple[bytes, bytes]] = []
        self._connection: list[bytes] = []
        self._chunked = False
        self._length = False
        self._response: asyncio.Future[Response] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = 0.0
        self._until_close = False
        self._extra = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self.transport = transport  # type: ignore[assignment]
        self._idle_since = now = self.loop.time()
        self._tick_handle = self.loop.call_at(now + self.pool.clients.granule_s, self._tick)

    def data_received(self, data: bytes) -> None:
        if not self._active or self._complete:
            self.close()  # a byte nobody asked for: the connection cannot be trusted again
            return
        self._got_bytes = True
        self._last_read = self.loop.time()
        if not self._head_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the session switched protocols", not self._headers_done))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed response: {exc}", not self._headers_done))
        if not self._headers_done and self._head_bytes > MAX_HEAD_BYTES and self._error is None:
            self._fail(UpstreamError("response headers too large", True))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        self._cancel_timers()
        if self._active and not self._complete:
            if self._headers_done and self._until_close and self._error is None:
                self._complete = True  # the body's end is the connection's end
                self._wake()
            else:
                self._fail(UpstreamError("the session closed the connection", not self._got_bytes))
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)  # the writer sees `closed`

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # httptools callbacks

    @property
    def _headers_done(self) -> bool:
        return self._head_done

    def on_message_begin(self) -> None:
        if self._headers_done:  # a second answer to one request: never trusted again
            self._extra = True

    def on_status(self, status: bytes) -> None:
        if not self._headers_done:
            self._reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return
        low = name.lower()
        if low in _FRAMING_NAMES:
            if low == b"transfer-encoding":
                self._chunked = self._chunked or b"chunked" in value.lower()
            elif low == b"content-length":
                self._length = True
            else:
                self._connection.append(value)
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # 1xx before the answer (101 is refused by feed_data)
            self._raw = []
            self._connection = []
            self._chunked = self._length = False
            self._reason = ""
            return
        self._head_done = True
        keep_alive = self._keep_alive = (
            bool(self._parser.should_keep_alive()) and not self._head_request
        )
        self._until_close = not (
            self._chunked or self._length or status in (204, 304) or self._head_request
        )
        if self._head_request:
            self._complete = True  # no body follows an answer to HEAD
        if self._response is not None and not self._response.done():
            self._response.set_result(
                Response(status, self._reason, self._raw, keep_alive, self._connection)
            )

    def on_body(self, body: bytes) -> None:
        if self._extra:
            return
        if self._draining:
            self._buffered += len(body)
            if self._buffered > DRAIN_BYTES:
                self.close()
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._headers_done and not self._extra:
            self._complete = True
            if self._draining:
                self.loop.call_soon(self._drained)
            self._wake()

    # the exchange

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        if self._response is not None and not self._response.done():
            self._response.set_exception(error)
        self._wake()
        self.close()

    def _tick(self) -> None:
        """The one timer: an exchange silent for the idle timeout fails, a pooled connection
        idle for the pool's idle time closes; otherwise it comes back by the next due time."""
        self._tick_handle = None
        if self.closed:
            return
        clients = self.pool.clients
        now = self.loop.time()
        if self._active:
            if self._complete or self._error is not None:
                due = now + clients.granule_s
            else:
                due = self._last_read + clients.idle_timeout_s
                if now >= due:
                    self._fail(IdleTimeout("the session sent nothing in time", not self._got_bytes))
                    return
        else:
            due = self._idle_since + clients.idle_s
            if now >= due:
                self.close()
                return
        self._tick_handle = self.loop.call_at(min(due, now + clients.granule_s), self._tick)

    def _cancel_timers(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None

    def start(self, head: bytes, head_request: bool) -> asyncio.Future[Response]:
        """Send the request head; the returned future is the response's head."""
        self._reset(head_request)
        self._active = True
        self._last_read = self._started = self.loop.time()
        self._response = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(head)
        return self._response

    def send(self, pieces: list[bytes]) -> asyncio.Future[None] | None:
        """Send request body bytes (in one vectored write); while the sandbox does not read
        them, returns the future of when it does again (None: go on).

        Raises:
            ConnectionResetError: the connection is closed.
        """
        if self.closed or self.transport is None:
            raise ConnectionResetError("the session closed")
        self.transport.writelines(pieces)
        self._last_read = self.loop.time()  # a long upload is not an idle session
        writable = self._writable
        return writable if writable is not None and not writable.done() else None

    async def write(self, pieces: list[bytes]) -> None:
        """`send`, waiting while the sandbox does not read."""
        writable = self.send(pieces)
        if writable is not None:
            await writable
            if self.closed:
                raise ConnectionResetError("the session closed")

    def take_buffered(self) -> bytes:
        """What of the body has arrived already, at once."""
        if not self._chunks:
            return b""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused_reading and self.transport:
            self._paused_reading = False
            self.transport.resume_reading()
        return data

    @property
    def complete(self) -> bool:
        """The whole answer has arrived (what `take_buffered` returns is all of it)."""
        return self._complete and self._error is None

    async def body(self) -> AsyncIterator[bytes]:
        """The response body's bytes as they arrive (de-chunked, not decompressed).

        Raises:
            UpstreamError: the body was cut short, or nothing arrived for the idle timeout.
        """
        chunks = self._chunks
        while True:
            while chunks:
                chunk = chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused_reading and self._buffered < LOW_WATER and self.transport:
                    self._paused_reading = False
                    self.transport.resume_reading()
                yield chunk
            if self._error is not None:
                raise self._error
            if self._complete:
                return
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def finish(self, reusable: bool) -> None:
        """The exchange is over: back to the pool when it ended cleanly, else closed."""
        ok = (
            reusable
            and self._complete
            and self._error is None
            and not self._chunks
            and not self._until_close
            and not self._extra
            and not self.closed
            and self._head_done
            and self._keep_alive
        )
        self._active = False
        if self.long:
            self.pool.counted(self)
        if ok:
            self.pool.release(self)
        else:
            self.close()

    def abandon(self) -> None:
        """The caller left while the request was fully sent: read the rest of the answer
        (at most `DRAIN_BYTES`, for at most `DRAIN_S`) and pool the connection, instead of
        closing it and opening another for the next caller; anything else closes it."""
        if self.closed:
            return
        if self._error is not None or self._until_close or self._head_request or not self._active:
            self.close()
            return
        self._buffered = sum(len(c) for c in self._chunks)
        self._chunks.clear()
        if self._complete:
            self.finish(True)
            return
        if self._buffered > DRAIN_BYTES:
            self.close()
            return
        self._draining = True
        if self._paused_reading and self.transport:
            self._paused_reading = False
            self.transport.resume_reading()
        self._drain_handle = self.loop.call_later(DRAIN_S, self.close)

    def _drained(self) -> None:
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        self._draining = False
        if self._response is not None and not self._response.done():
            self._response.cancel()  # nobody waits for it any more
        self.finish(True)

    def close(self) -> None:
        self._cancel_timers()
        self._draining = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()  # connection_lost follows and forgets it
        self.closed = True
        self.pool.forget(self)


class Pool:
    """Keep-alive connections to one sandbox address: the idle ones (newest reused first),
    at most `Clients.max_open` open at once (a thousand callers share a few dozen
    connections instead of opening a thousand), and at most `MAX_CONNECTING` connects in
    progress (a burst of callers does not overflow the sandbox's listen backlog, whose
    dropped SYNs would stall for seconds). A caller finding neither an idle connection nor
    room for a new one waits in line: a released connection goes straight to the first.

    A connection whose exchange has lasted `Clients.long_exchange_s` (a stream, a long
    poll) leaves the count until the exchange ends (`long`): the cap shares connections
    among short requests and never makes anyone wait behind long ones. The line is looked
    at every `LINE_CHECK_S` while anyone waits: exchanges that became long make room, and
    callers past their deadline fail."""

    def __init__(self, clients: Clients, host: str, port: int, key: str) -> None:
        self.clients = clients
        self.host = host
        self.port = port
        self.key = key
        self.idle: deque[Connection] = deque()
        self.live: set[Connection] = set()  # open (idle or in use), not yet lost
        self.connecting = 0
        self.long = 0  # live connections whose exchange became long (not counted)
        # Callers in line, with their deadlines: each gets a released connection, or None
        # (room for a new one: try again), or IdleTimeout once its deadline passed.
        self.waiters: deque[tuple[float, asyncio.Future[Connection | None]]] = deque()
        self._check_handle: asyncio.TimerHandle | None = None

    def acquire(self) -> Connection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    def release(self, conn: Connection) -> None:
        clients = self.clients
        pool = clients.pools.setdefault(self.key, self)
        if pool is not self:  # this one was dropped when it emptied
            conn.pool = pool
            pool.live.add(conn)
            pool.release(conn)
            return
        if clients.closed:
            conn.close()
            return
        conn._idle_since = conn.loop.time()
        waiters = self.waiters
        while waiters:
            _, waiter = waiters.popleft()
            if not waiter.done():
                conn.reused = True
                waiter.set_result(conn)
                return
        if len(self.idle) >= clients.max_idle:
            conn.close()
            return
        self.idle.append(conn)

    def forget(self, conn: Connection) -> None:
        """`conn` closed: out of the idle list and the count, room for a waiter."""
        if conn not in self.live:
            return
        self.live.discard(conn)
        if conn.long:
            self.counted(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self._wake_one()
        self._drop_if_unused()

    def _drop_if_unused(self) -> None:
        unused = not self.live and not self.connecting and not self.waiters
        if unused and self.clients.pools.get(self.key) is self:
            del self.clients.pools[self.key]

    def _wake_one(self) -> None:
        while self.waiters:
            _, waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _room(self) -> int:
        """How many more connects may start now."""
        counted = len(self.live) - self.long + self.connecting
        return min(MAX_CONNECTING - self.connecting, self.clients.max_open - counted)

    def _full(self) -> bool:
        return self._room() <= 0

    def counted(self, conn: Connection) -> None:
        """`conn`'s long exchange ended: it counts against the cap again."""
        conn.long = False
        self.long -= 1

    async def get(self) -> Connection:
        """An idle connection, else a new one, else (at `Clients.max_open` open, or
        `MAX_CONNECTING` connecting) the first one released, waiting in line.

        Raises:
            ConnectError, IdleTimeout: the connect failed or timed out, or no connection came
            free within the connect timeout.
        """
        conn = self.acquire()
        if conn is not None:
            return conn
        if self._full():
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.clients.connect_timeout_s
            first = True
            while self._full():
                waiter: asyncio.Future[Connection | None] = loop.create_future()
                if first:
                    self.waiters.append((deadline, waiter))
                else:  # woken, but someone else took the room: still first in line
                    self.waiters.appendleft((deadline, waiter))
                first = False
                if self._check_handle is None:
                    self._arm_check(loop)
                try:
                    conn = await waiter
                except BaseException:
                    self._pass_on(waiter)
                    raise
                if conn is not None:
                    return conn
                conn = self.acquire()
                if conn is not None:
                    return conn
        return await self.fresh()

    def _arm_check(self, loop: asyncio.AbstractEventLoop) -> None:
        at = min(self.waiters[0][0], loop.time() + LINE_CHECK_S)
        self._check_handle = loop.call_at(at, self._check)

    def _check(self) -> None:
        """One timer for the whole line (a timeout per waiting caller cost a tenth of a
        request at c=1000): exchanges that became long leave the count and their room goes
        to the first in line; callers whose deadline passed fail (the line is in deadline
        order)."""
        self._check_handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        began = now - self.clients.long_exchange_s
        for conn in self.live:
            if conn._active and not conn.long and conn._started <= began:
                conn.long = True
                self.long += 1
        for _ in range(self._room()):
            if not self.waiters:
                break
            self._wake_one()
        waiters = self.waiters
        while waiters and waiters[0][0] <= now:
            _, waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_exception(IdleTimeout("no connection to the session came free", True))
        if waiters:
            self._arm_check(loop)
        else:
            self._drop_if_unused()

    def _pass_on(self, waiter: asyncio.Future[Connection | None]) -> None:
        """A waiter leaves: what it was given goes to the next in line."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            conn = waiter.result()
            if conn is None:
                self._wake_one()
            else:
                self.release(conn)
        else:
            waiter.cancel()

    async def fresh(self) -> Connection:
        """A new connection (not counted against `MAX_CONNECTING`'s wait).

        Raises:
            ConnectError, IdleTimeout: the connect failed or timed out.
        """
        self.connecting += 1
        try:
            conn = await self.clients.open(self)
            if not conn.closed:
                self.live.add(conn)
            return conn
        finally:
            self.connecting -= 1
            self._wake_one()
            self._drop_if_unused()


class Clients:
    """Every sandbox address's pool of idle connections."""

    def __init__(
        self,
        connect_timeout_s: float,
        idle_timeout_s: float,
        max_idle: int,
        idle_s: float,
        max_open: int = 64,
        long_exchange_s: float = LONG_EXCHANGE_S,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_idle = max_idle
        self.max_open = max_open
        self.long_exchange_s = long_exchange_s
        self.idle_s = idle_s
        # How often a connection's one timer looks at it, at most.
        self.granule_s = max(min(idle_timeout_s, idle_s), 0.01)
        self.pools: dict[str, Pool] = {}
        self.closed = False

    def pool(self, addr: str) -> Pool:
        """The pool of `host:port` (or `[v6]:port`)."""
        pool = self.pools.get(addr)
        if pool is None:
            host, _, port = addr.rpartition(":")
            pool = self.pools[addr] = Pool(self, host.strip("[]"), int(port), addr)
        return pool

    async def connect(self, addr: str) -> Connection:
        """A pooled idle connection to `addr`, else a new one.

        Raises:
            ConnectError: refused, unreachable or not connected within the connect timeout.
        """
        return await self.pool(addr).get()

    async def open(self, pool: Pool) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: Connection(pool), pool.host, pool.port
                )
        except TimeoutError:
            raise IdleTimeout("connecting timed out", True) from None
        except OSError as exc:
            raise ConnectError(f"cannot connect: {exc}", True) from exc
        return protocol

    def close(self) -> None:
        """Close every idle connection; connections in use close when their exchange ends."""
        self.closed = True
        for pool in list(self.pools.values()):
            for conn in list(pool.idle):
                conn.close()
        self.pools.clear()


def request_head(
    method: str, target: str, host: str, headers: Iterable[tuple[str, str]], framing: bytes
) -> bytes:
    """The request line and headers, ready for one send (`framing`: the body's
    Content-Length or Transfer-Encoding line, or nothing)."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    return "".join(lines).encode("utf-8", "surrogateescape") + framing + b"\r\n"
