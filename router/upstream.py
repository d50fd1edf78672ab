"""A keep-alive HTTP/1.1 client for the router's hop to a sandbox, on asyncio protocols and
httptools' llhttp parser: one pool of idle connections per sandbox address, the request head in
one send, both bodies streamed with backpressure, nothing decompressed or re-encoded.

A connection goes back to its pool only after a whole response was read, the whole request
body was sent and both sides said keep-alive; anything else (a cancel, an error, a HEAD, bytes
after the response) closes it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable

import httptools
from multidict import CIMultiDict

HIGH_WATER = 256 * 1024  # response bytes buffered before the sandbox is paused
LOW_WATER = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # a response's status line and headers


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
    """The status line and headers of an answer; its body is `Connection.body()`."""

    __slots__ = ("headers", "keep_alive", "reason", "status")

    def __init__(
        self, status: int, reason: str, headers: CIMultiDict[str], keep_alive: bool
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.keep_alive = keep_alive


class Connection(asyncio.Protocol):
    """One TCP connection to a sandbox, serving one exchange at a time."""

    def __init__(self, pool: Pool, idle_timeout_s: float) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.idle_timeout_s = idle_timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_handle: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._reset(head_request=False)

    def _reset(self, head_request: bool) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = head_request
        self._active = False
        self._got_bytes = False
        self._head_bytes = 0
        self._reason = ""
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._response: asyncio.Future[Response] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._until_close = False
        self._extra = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self._active or self._complete:
            self.close()  # a byte nobody asked for: the connection cannot be trusted again
            return
        self._got_bytes = True
        self._last_read = self.loop.time()
        if self._response is not None and not self._response.done():
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
        if self.idle_handle is not None:
            self.idle_handle.cancel()
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
        return self._response is not None and self._response.done()

    def on_message_begin(self) -> None:
        if self._headers_done:  # a second answer to one request: never trusted again
            self._extra = True

    def on_status(self, status: bytes) -> None:
        if not self._headers_done:
            self._reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return
        self._headers.add(
            name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # 1xx before the answer (101 is refused by feed_data)
            self._headers = CIMultiDict()
            self._reason = ""
            return
        headers = self._headers
        keep_alive = bool(self._parser.should_keep_alive()) and not self._head_request
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._until_close = not (
            chunked or "Content-Length" in headers or status in (204, 304) or self._head_request
        )
        if self._head_request:
            self._complete = True  # no body follows an answer to HEAD
        if self._response is not None and not self._response.done():
            self._response.set_result(Response(status, self._reason, headers, keep_alive))

    def on_body(self, body: bytes) -> None:
        if self._extra:
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

    def _arm_idle_timer(self) -> None:
        self._last_read = self.loop.time()
        self._timer = self.loop.call_at(self._last_read + self.idle_timeout_s, self._check_idle)

    def _check_idle(self) -> None:
        if not self._active or self._complete or self._error is not None:
            return
        due = self._last_read + self.idle_timeout_s
        if self.loop.time() >= due:
            self._fail(IdleTimeout("the session sent nothing in time", not self._got_bytes))
        else:
            self._timer = self.loop.call_at(due, self._check_idle)

    def start(self, head: bytes, head_request: bool) -> asyncio.Future[Response]:
        """Send the request head; the returned future is the response's head."""
        self._reset(head_request)
        self._active = True
        self._response = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(head)
        self._arm_idle_timer()
        return self._response

    async def write(self, data: bytes) -> None:
        """Send request body bytes, waiting while the sandbox does not read them."""
        if self.closed or self.transport is None:
            raise ConnectionResetError("the session closed")
        self.transport.write(data)
        self._last_read = self.loop.time()  # a long upload is not an idle session
        if self._writable is not None and not self._writable.done():
            await self._writable
            if self.closed:
                raise ConnectionResetError("the session closed")

    def take_buffered(self) -> bytes:
        """What of the body has arrived already, at once."""
        if not self._chunks:
            return b""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused_reading and self.transport:
            self._paused_reading = False
            self.transport.resume_reading()
        return data

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ok = (
            reusable
            and self._complete
            and self._error is None
            and not self._chunks
            and not self._until_close
            and not self._extra
            and not self.closed
            and self._response is not None
            and self._response.done()
            and not self._response.cancelled()
            and self._response.exception() is None
            and self._response.result().keep_alive
        )
        self._active = False
        if ok:
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()  # connection_lost follows and forgets it
        self.closed = True
        self.pool.forget(self)


class Pool:
    """Idle keep-alive connections to one sandbox address (newest reused first)."""

    def __init__(self, clients: Clients, host: str, port: int) -> None:
        self.clients = clients
        self.host = host
        self.port = port
        self.idle: deque[Connection] = deque()

    def acquire(self) -> Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
                conn.idle_handle = None
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    def release(self, conn: Connection) -> None:
        pool = self.clients.pools.setdefault((self.host, self.port), self)
        if pool is not self:  # this one was dropped when it emptied
            conn.pool = pool
            pool.release(conn)
            return
        if len(self.idle) >= self.clients.max_idle or self.clients.closed:
            conn.close()
            return
        self.idle.append(conn)
        conn.idle_handle = conn.loop.call_later(self.clients.idle_s, conn.close)

    def forget(self, conn: Connection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            return
        if not self.idle:
            self.clients.pools.pop((self.host, self.port), None)


class Clients:
    """Every sandbox address's pool of idle connections."""

    def __init__(
        self, connect_timeout_s: float, idle_timeout_s: float, max_idle: int, idle_s: float
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.pools: dict[tuple[str, int], Pool] = {}
        self.closed = False

    def pool(self, host: str, port: int) -> Pool:
        pool = self.pools.get((host, port))
        if pool is None:
            pool = self.pools[(host, port)] = Pool(self, host, port)
        return pool

    async def connect(self, host: str, port: int) -> Connection:
        """A pooled idle connection to `host:port`, else a new one.

        Raises:
            ConnectError: refused, unreachable or not connected within the connect timeout.
        """
        pool = self.pool(host, port)
        conn = pool.acquire()
        if conn is not None:
            return conn
        return await self.fresh(pool)

    async def fresh(self, pool: Pool) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: Connection(pool, self.idle_timeout_s), pool.host, pool.port
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
