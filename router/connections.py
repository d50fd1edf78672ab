"""Bounds on the router's client connections, which aiohttp itself does not set.

- A request line and headers must arrive within `header_timeout_s` of the connection opening
  or of the first byte of the next keep-alive request; a slow (slowloris) client is dropped.
- An idle keep-alive connection is closed after `keepalive_timeout_s` (aiohttp's own timer).
- Past `max_connections` open connections a new one is answered `503` with `Retry-After` and
  closed, instead of every client slowing down together.
- Malformed requests are counted and logged at most once per `MALFORMED_LOG_INTERVAL_S`,
  one line each, never a traceback per request.

aiohttp has no hook for these, so `BoundedRunner` serves with a `RequestHandler` subclass
that reads a few of its private fields (`_loop`, `_waiter`, `_request_count`); the tests in
tests/test_connections.py pin the behaviour from a client's side.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

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
