"""Bounds on the router's client connections, which aiohttp itself does not set.

- A request line and headers must arrive within `header_timeout_s` of the connection opening
  or of the first byte of the next keep-alive request; a slow (slowloris) client is dropped.
- An idle keep-alive connection is closed after `keepalive_timeout_s` (aiohttp's own timer).
- Past `max_connections` open connections a new one is answered `503` with `Retry-After` and
  closed, instead of every client slowing down together.
- Malformed requests are counted and logged at most once per `MALFORMED_LOG_INTERVAL_S`,
  one line each, never a traceback per request.

- A request's handler runs in its connection's task (`run_requests_inline`), not in a new
  task per request.
- Every pending connection is accepted each time the listening socket is readable
  (`AcceptingSite`): uvloop's own server accepts one per loop iteration, so under load, when
  one iteration serves hundreds of requests, a burst of new connections waited seconds in
  the kernel's accept queue (and overflowed it).

aiohttp has no hook for these, so `BoundedRunner` serves with a `RequestHandler` subclass
that reads a few of its private fields (`_loop`, `_waiter`, `_request_count`); the tests in
tests/test_connections.py pin the behaviour from a client's side.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import sys
import time
from collections.abc import Coroutine
from contextvars import Context
from typing import Any, cast

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from router.metrics import RouterMetrics

log = logging.getLogger("sessionpool.router")
MALFORMED_LOG_INTERVAL_S = 10.0


def _busy_response() -> bytes:
    body = orjson.dumps(
        {
            "error": {
                "code": "ServerBusy",
                "message": "The router has too many open connections; retry shortly.",
                "traceId": "",
            }
        }
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        "x-ms-error-code: ServerBusy\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


BUSY_RESPONSE = _busy_response()


class ConnectionBounds:
    """The limits and counters shared by every connection of one router process."""

    def __init__(
        self,
        metrics: RouterMetrics,
        *,
        header_timeout_s: float,
        max_connections: int,
    ) -> None:
        self.metrics = metrics
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.open = 0
        self._log_after = 0.0
        self._unlogged = 0

    def malformed(self, remote: str | None, exc: BaseException) -> None:
        """Count a malformed request; log one line per interval, with how many were not."""
        self.metrics.malformed_requests.inc()
        now = time.monotonic()
        if now < self._log_after:
            self._unlogged += 1
            return
        self._log_after = now + MALFORMED_LOG_INTERVAL_S
        skipped, self._unlogged = self._unlogged, 0
        message = getattr(exc, "message", "") or type(exc).__name__
        log.warning(
            "malformed request from %s: %s (%d more not logged in the last %g s)",
            remote,
            message,
            skipped,
            MALFORMED_LOG_INTERVAL_S,
        )


class BoundedHandler(RequestHandler):
    """aiohttp's connection handler with a header timeout, a connection cap and quiet logs."""

    __slots__ = ("_bounds", "_head_handle", "_refused")

    def __init__(self, manager: web.Server, bounds: ConnectionBounds, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._bounds = bounds
        self._head_handle: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        bounds = self._bounds
        if bounds.open >= bounds.max_connections:
            self._refused = True
            bounds.metrics.refused_connections.inc()
            transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
            transport.write(BUSY_RESPONSE)
            # Half-close and let the client finish: closing with its request unread would
            # send a reset that can destroy the answer before the client reads it.
            if transport.can_write_eof():
                transport.write_eof()
            self._head_handle = self._loop.call_later(bounds.header_timeout_s, transport.abort)
            return
        bounds.open += 1
        super().connection_made(transport)
        self._arm_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_handle is not None:
            self._head_handle.cancel()
            self._head_handle = None
        if self._refused:
            return
        self._bounds.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the client closes
        between_requests = self._waiter is not None
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            if self._head_handle is not None:
                self._head_handle.cancel()  # the request line and headers are in
                self._head_handle = None
        elif between_requests and self._head_handle is None:
            self._arm_head()  # the next request on a kept-alive connection began, unfinished

    def _arm_head(self) -> None:
        self._head_handle = self._loop.call_later(self._bounds.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self._head_handle = None
        self._bounds.metrics.header_timeouts.inc()
        self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            self._bounds.malformed(request.remote, exc)
        return super().handle_error(request, status, exc, message)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if isinstance(kw.get("exc_info"), HttpProcessingError):
            return  # counted and rate-limited in handle_error
        super().log_exception(*args, **kw)


# The coroutine aiohttp's connection loop (`RequestHandler.start`) wraps in a task per request,
# and the aiohttp releases whose loop was read for `run_requests_inline` (it only awaits it).
_HANDLE_REQUEST = RequestHandler._handle_request.__code__
INLINE_AIOHTTP = ("3.14.",)


def requests_inline_supported() -> bool:
    """Python < 3.12 (below) and an aiohttp release whose connection loop was checked."""
    return sys.version_info < (3, 12) and aiohttp.__version__.startswith(INLINE_AIOHTTP)


def run_requests_inline(loop: asyncio.AbstractEventLoop) -> None:
    """Serve each request in its connection's task instead of a task of its own.

    On Python < 3.12 aiohttp's connection loop hands every request's handler to
    `loop.create_task` and awaits the task: one more task per request, two more trips through
    the loop (its first step and the wake-up of the loop that awaits it), its registration in
    asyncio's set of live tasks and a weak-reference callback in Python when it dies. With a
    thousand requests in flight that was 8-9 % of the router's CPU per request (bench.path
    A/B on one machine, alternating: c=1000 10.4-10.5k -> 11.3-11.4k req/s per core; c=1
    8-13 us less added latency; c=32 the same).

    This installs a task factory (a documented hook of the event loop) that returns that one
    coroutine unwrapped, so the connection's loop awaits it directly; every other coroutine
    gets a task as before (or from the factory already installed). What a handler sees is
    unchanged: `request.task` and `asyncio.current_task()` were and are the connection's
    task, a disconnect still cancels the handler, and aiohttp's own per-request bookkeeping
    (`_handle_request`) still runs. What changes: the handler no longer runs in a copy of
    the context, so a context variable a handler sets stays set for the next request on the
    same connection; the router sets its own (the trace id) at the start of every request.

    From Python 3.12 aiohttp starts that task eagerly (its first step runs at once, without
    the loop) and does not ask the factory: nothing is installed there; nor with an aiohttp
    release not in `INLINE_AIOHTTP`, whose connection loop might use the task otherwise
    than by awaiting it. Idempotent.
    """
    if not requests_inline_supported():
        return
    previous: Any = loop.get_task_factory()
    if getattr(previous, "runs_requests_inline", False):
        return

    def factory(
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any],
        context: Context | None = None,
    ) -> Any:
        if getattr(coro, "cr_code", None) is _HANDLE_REQUEST:
            return coro  # awaited by its connection's task (aiohttp only awaits it)
        if previous is None:
            return asyncio.Task(coro, loop=loop, context=context)
        if context is None:  # as the loop calls a factory
            return previous(loop, coro)
        return previous(loop, coro, context=context)

    factory.runs_requests_inline = True  # type: ignore[attr-defined]
    loop.set_task_factory(cast(Any, factory))


class _BoundedServer(web.Server):
    bounds: ConnectionBounds

    def __call__(self) -> RequestHandler:
        return BoundedHandler(self, self.bounds, loop=self._loop, **self._kwargs)


class BoundedRunner(web.AppRunner):
    """An `AppRunner` whose connections are bounded (pass `keepalive_timeout` too)."""

    def __init__(self, app: web.Application, bounds: ConnectionBounds, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.bounds = bounds

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _BoundedServer  # only __call__ differs: the handler class
        assert isinstance(server, _BoundedServer)
        server.bounds = self.bounds
        return server


ACCEPT_BATCH = 512  # connections accepted per readiness, at most (then the loop runs on)
ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Listener:
    """The listening sockets of an `AcceptingSite`, shaped like the server aiohttp expects
    (`sockets`, `close`)."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets = []


class AcceptingSite(web.BaseSite):
    """A TCP site like `web.TCPSite` that accepts every pending connection (up to
    `ACCEPT_BATCH`) whenever its socket is readable, then hands each to the loop as an
    accepted socket; on running out of descriptors it stops accepting for a second."""

    __slots__ = ("_bound_port", "_host", "_port", "_reuse_port", "_tasks")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 4096,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._bound_port = port
        self._reuse_port = reuse_port
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host or '0.0.0.0'}:{self._bound_port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._host or None,
            self._port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, addr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self._reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if self._port == 0 and len(sockets) > 1:  # the same port on every address
                    addr = (addr[0], sockets[0].getsockname()[1], *addr[2:])
                sock.bind(addr)
                sock.listen(self._backlog)
                sock.setblocking(False)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._server = _Listener(sockets)  # type: ignore[assignment]
        self._bound_port = sockets[0].getsockname()[1]
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, loop, sock)

    def _accept(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        server = self._runner.server
        if server is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in ACCEPT_ERRORS:
                    raise
                log.warning("cannot accept connections for 1 s: %s", exc)
                loop.remove_reader(sock.fileno())
                loop.call_later(1.0, self._resume, loop, sock)
                return
            conn.setblocking(False)
            task = loop.create_task(
                loop.connect_accepted_socket(server, conn, ssl=self._ssl_context)
            )
            self._tasks.add(task)
            task.add_done_callback(self._accepted)

    def _resume(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        if self._server is not None and sock.fileno() != -1:
            loop.add_reader(sock.fileno(), self._accept, loop, sock)

    def _accepted(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("a connection failed before it was served: %r", task.exception())
