"""Streaming HTTP and WebSocket relay from the router to one sandbox."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from router.errors import (
    BadRequestError,
    RequestTooLargeError,
    SessionPoolError,
    SessionTimeoutError,
    SessionUnreachableError,
)
from router.forwarding import FORWARDING, forwarding_headers, set_forwarding
from router.tunnel import GOING_AWAY, Tunnel, open_tunnel, switching_protocols
from router.upstream import (
    Clients,
    ConnectError,
    Connection,
    IdleTimeout,
    Response,
    UpstreamError,
)

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from router.metrics import RouterMetrics
    from router.routing import Lease
    from router.settings import Settings

from router.target import Target

log = logging.getLogger("sessionpool.proxy")

# RFC 9110 §7.6.1 plus the legacy ones every proxy strips; headers named in Connection too.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded to the session: the caller's credentials and headers the router sets itself.
DROPPED_UPSTREAM = HOP_BY_HOP | FORWARDING | {"host", "authorization", "x-api-key"}
# The caller's key, version, protocols and extensions go to the sandbox as they are: the
# WebSocket is negotiated end to end (router.tunnel).
WS_ANSWER = frozenset({"sec-websocket-accept"})
# Headers aiohttp's client would invent: the sandbox sees only what the caller sent. The
# first three are skipped once for the whole client session (converting them on every
# request cost 4 % of the router's CPU); Content-Type only matters when there is a body.
SKIP_AUTO_SESSION = ("User-Agent", "Accept", "Accept-Encoding")
SKIP_AUTO_BODY = ("Content-Type",)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
FRAMING = frozenset({"content-length"})  # the client writes the body's framing itself
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # an empty body is said, not implied
# A declared body of at least this many bytes goes up straight from the caller's socket
# (`RawBody`), and the caller's connection closes after the answer.
RAW_BODY_MIN = 1 << 20


def _connection_tokens(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> set[str]:
    return {
        t.strip().lower()
        for v in headers.getall("Connection", ())
        for t in v.split(",")
        if t.strip()
    }


def upstream_headers(
    request: web.Request, prefix: str, drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """The caller's headers as the sandbox should see them (forwarding headers: see
    `router.forwarding`)."""
    named = _connection_tokens(request.headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        low = name.lower()
        if low in DROPPED_UPSTREAM or low in named or low in drop:
            continue
        out.add(name, value)
    set_forwarding(request, out, prefix)
    return out


_DROPPED_RAW = frozenset(n.encode() for n in DROPPED_UPSTREAM | FRAMING)
_HOP_BY_HOP_RAW = frozenset(n.encode() for n in HOP_BY_HOP)
_NONE: frozenset[bytes] = frozenset()


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def http_request_head(
    request: web.Request, target: str, addr: str, prefix: str, framing: bytes
) -> bytes:
    """The request line and headers for the sandbox, ready for one send: the caller's header
    lines as they arrived, less hop-by-hop ones (and those its Connection names), its
    credentials, its forwarding headers and its body framing; then this hop's forwarding
    headers (`router.forwarding`) and `framing` (the body's Content-Length or
    Transfer-Encoding line, or nothing). One pass over the raw lines, no decoding."""
    named = _NONE
    if "Connection" in request.headers:
        named = frozenset(t.encode() for t in _connection_tokens(request.headers))
    head = f"{request.method} {target} HTTP/1.1\r\nHost: {addr}\r\n"
    lines = [head.encode("utf-8", "surrogateescape")]
    for name, value in request.raw_headers:
        low = name.lower()
        if low in _DROPPED_RAW or low in named:
            continue
        lines.append(b"%s: %s\r\n" % (name, value))
    own = "".join(f"{name}: {value}\r\n" for name, value in forwarding_headers(request, prefix))
    lines.append(own.encode("utf-8", "surrogateescape") + framing + b"\r\n")
    return b"".join(lines)


def response_headers(up: Response) -> list[tuple[str, str]]:
    """The sandbox's response headers as the caller should see them, in one pass."""
    named = _NONE
    if up.connection:
        named = frozenset(
            t.strip().lower() for v in up.connection for t in v.split(b",") if t.strip()
        )
    out: list[tuple[str, str]] = []
    rechunked = False
    for name, value in up.raw:
        low = name.lower()
        if low in _HOP_BY_HOP_RAW or low in named:
            rechunked = rechunked or low == b"transfer-encoding"
            continue
        out.append((_text(name), _text(value)))
    if rechunked:
        # aiohttp re-frames the body; a stale length would contradict chunking.
        out = [(n, v) for n, v in out if n.lower() != "content-length"]
    return out


class Upstream:
    """The way to the sandboxes: plain HTTP over pools of keep-alive connections
    (`HttpForwarder`), WebSockets as byte tunnels (`WebSocketForwarder`), the client session
    other callers (MCP) use, the size limits and the proxy metrics."""

    def __init__(
        self, client: aiohttp.ClientSession, settings: Settings, metrics: RouterMetrics
    ) -> None:
        self.client = client
        self.metrics = metrics
        self._proxy_seconds: dict[str, Histogram] = {}  # labels() per request is not free
        clients = Clients(
            settings.upstream_connect_timeout_s,
            settings.upstream_idle_timeout_s,
            settings.upstream_pool_max_idle,
            settings.upstream_pool_idle_s,
            settings.upstream_max_connections,
        )
        self.http = HttpForwarder(clients, settings.max_body_bytes, self._observe)
        self.ws = WebSocketForwarder(settings.ws_max_msg_bytes, settings.upstream_connect_timeout_s)

    @property
    def clients(self) -> Clients:
        return self.http.clients

    def check_request(self, request: web.Request) -> None:
        """What can be refused before a session is claimed for `request`: a declared body over
        the cap (`BodyCap`) and a malformed WebSocket upgrade.

        Raises:
            RequestTooLargeError, BadRequestError.
        """
        self.http.cap.check_declared(request)
        if is_websocket(request):
            check_handshake(request)

    async def forward(
        self, request: web.Request, lease: Lease, target: Target
    ) -> web.StreamResponse:
        """Relay `request` (HTTP or WebSocket) to the leased session.

        Raises:
            RequestTooLargeError, SessionUnreachableError, SessionTimeoutError.
        """
        try:
            if is_websocket(request):
                return await self.ws.forward(request, lease.session.addr, target, lease.activity)
            return await self.http.forward(request, lease.session.addr, target)
        except (SessionUnreachableError, SessionTimeoutError) as exc:
            self.metrics.upstream_errors.labels(target.pool, exc.code).inc()
            raise

    def _observe(self, pool: str, seconds: float) -> None:
        histogram = self._proxy_seconds.get(pool)
        if histogram is None:
            histogram = self._proxy_seconds[pool] = self.metrics.proxy.labels(pool)
        histogram.observe(seconds)

    @property
    def websockets(self) -> set[Tunnel]:
        return self.ws.tunnels

    async def close_websockets(self) -> None:
        """Router shutdown: tell every relayed WebSocket client we are going away (1001)."""
        await close_websockets(self.ws.tunnels)


def client_timeout(connect_s: float, idle_s: float) -> aiohttp.ClientTimeout:
    # No total timeout: downloads, SSE and long polls may last as long as data keeps moving.
    return aiohttp.ClientTimeout(
        total=None, connect=connect_s, sock_connect=connect_s, sock_read=idle_s
    )


CHUNKED = b"Transfer-Encoding: chunked\r\n"


def _framing(request: web.Request) -> bytes:
    """The request body's framing line for the sandbox: its length when the caller declared
    one, else chunked; `Content-Length: 0` for a bodiless POST/PUT/PATCH; else nothing."""
    if request.body_exists:
        length = request.content_length
        if length is None:
            return CHUNKED
        return b"Content-Length: %d\r\n" % length
    if request.method in BODY_METHODS:
        return b"Content-Length: 0\r\n"
    return b""


def _upstream_failure(addr: str, exc: BaseException) -> SessionPoolError:
    # The caller never learns a sandbox's address (the operator's log does).
    if isinstance(exc, IdleTimeout):
        log.warning("session at %s did not answer in time: %s", addr, exc)
        return SessionTimeoutError("The session did not answer in time.")
    if isinstance(exc, ConnectError):
        log.warning("session at %s is unreachable: %s", addr, exc)
        return SessionUnreachableError("The session is unreachable.")
    log.warning("session at %s dropped the connection: %s", addr, exc)
    return SessionUnreachableError("The session dropped the connection.")


class BodyCap:
    """The one limit on a proxied request body: its declared length is checked before a
    session is claimed, a streamed body as it goes."""

    __slots__ = ("max_bytes",)

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def check_declared(self, request: web.Request) -> None:
        """Raises: RequestTooLargeError: the declared Content-Length is over the cap."""
        if (request.content_length or 0) > self.max_bytes:
            raise RequestTooLargeError(self.max_bytes)

    def check_streamed(self, seen: int) -> None:
        """Raises: RequestTooLargeError: `seen` bytes streamed so far are over the cap."""
        if seen > self.max_bytes:
            raise RequestTooLargeError(self.max_bytes)


class HttpForwarder:
    """Plain HTTP to the sandboxes over `router.upstream`'s keep-alive connections, with the
    request body cap; `observe(pool, seconds)` is told how long each answer's head took."""

    def __init__(
        self,
        clients: Clients,
        max_body_bytes: int,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.clients = clients
        self.cap = BodyCap(max_body_bytes)
        self.observe = observe

    async def forward(self, request: web.Request, addr: str, target: Target) -> web.StreamResponse:
        """Stream `request` to `http://{addr}{target.rest}` and the answer back.

        A body longer than the cap fails as it streams (a declared length was checked by
        `Upstream.check_request`). A request without a body that is safe to repeat is sent
        again, once, on a new connection when a reused one fails before any byte of the
        answer. A caller who leaves once its request was sent leaves the connection to finish
        reading the answer and be reused (`Connection.abandon`).

        Raises:
            RequestTooLargeError, SessionUnreachableError, SessionTimeoutError: before the
            response started; afterwards a failure aborts the client connection instead.
        """
        started = time.monotonic()
        framing = _framing(request)
        head = http_request_head(request, target.rest, addr, target.prefix, framing)
        has_body = request.body_exists
        raw = has_body and (request.content_length or 0) >= RAW_BODY_MIN
        retry = request.method in IDEMPOTENT and not has_body
        pool = self.clients.pool(addr)
        sender: asyncio.Future[None] | None = None
        retried = False
        while True:
            try:
                conn = await (pool.fresh() if retried else pool.get())
            except UpstreamError as exc:
                raise _upstream_failure(addr, exc) from exc
            answer = conn.start(head, request.method == "HEAD")
            if has_body:
                if raw:
                    sender = RawBody(request, conn).start()
                else:
                    sender = asyncio.create_task(
                        _send_body(conn, request.content, self.cap, framing == CHUNKED)
                    )
                sender.add_done_callback(partial(_body_failed, answer=answer))
            try:
                up = await answer
            except RequestTooLargeError:
                conn.finish(False)
                raise
            except UpstreamError as exc:
                conn.finish(False)
                if sender is not None:
                    sender.cancel()
                if retry and not retried and conn.reused and exc.before_response:
                    retried = True  # a stale pooled connection: once more on a new one
                    continue
                raise _upstream_failure(addr, exc) from exc
            except OSError as exc:  # the body could not be sent
                conn.finish(False)
                raise _upstream_failure(addr, exc) from exc
            except asyncio.CancelledError:
                if _sent(sender):
                    conn.abandon()  # the caller left; the answer may still be read
                else:
                    conn.finish(False)
                    if sender is not None:
                        sender.cancel()
                raise
            except BaseException:
                conn.finish(False)
                if sender is not None:
                    sender.cancel()
                raise
            break
        if self.observe is not None:
            self.observe(target.pool, time.monotonic() - started)
        return await _relay_response(request, conn, up, sender, close=raw)


async def _body_pieces(content: aiohttp.StreamReader) -> AsyncIterator[list[bytes]]:
    """The caller's body as it arrives: each time, every piece aiohttp has buffered, as it
    received them. `readany` would join them first, one more copy of every uploaded byte
    (a fifth of an upload's CPU); this takes them with the reader's own per-piece read,
    which keeps its accounting (and resumes the caller's socket) as `readany` does. The
    tests of `HttpForwarder`'s bodies pin it (aiohttp's private API)."""
    buffer = content._buffer
    take = content._read_nowait_chunk
    while True:
        exc = content.exception()
        if exc is not None:
            raise exc
        if buffer:
            yield [take(-1) for _ in range(len(buffer))]
        elif content.is_eof():
            return
        else:
            await content._wait("body")


async def _send_body(
    conn: Connection, content: aiohttp.StreamReader, cap: BodyCap, chunked: bool
) -> None:
    """Stream the caller's body to the sandbox, failing once it passes the cap."""
    seen = 0
    async for pieces in _body_pieces(content):
        size = sum(map(len, pieces))
        if not size:
            continue
        seen += size
        cap.check_streamed(seen)
        if chunked:
            await conn.write([b"%x\r\n" % size, *pieces, b"\r\n"])
        else:
            await conn.write(pieces)
    if chunked:
        await conn.write([b"0\r\n\r\n"])


class RawBody:
    """A caller's body of declared length relayed from its socket to the sandbox's as it
    arrives, instead of through aiohttp's HTTP parser (which copies every piece once more),
    the request's stream and a task reading it (1 GiB uploads in an alternating A/B,
    bench.streaming: 1.43-1.88 -> 2.11-2.39 GB/s per core). It takes over the caller
    connection's bytes as its payload parser (aiohttp's `set_parser`, as the WebSocket
    tunnel does), so that connection serves no further request: the answer says
    `Connection: close`. The caller's socket is paused while the sandbox's is.

    `start()` returns the future of the whole body gone up. Cancelled (the answer came
    first, the caller left) or failed (the sandbox closed), the rest of the body is still
    read and dropped, so that closing the caller's connection does not reset it before the
    answer is read; aiohttp waits for that (its lingering time) before closing."""

    __slots__ = ("conn", "done", "left", "request")

    def __init__(self, request: web.Request, conn: Connection) -> None:
        self.request = request
        self.conn = conn
        self.left = request.content_length or 0
        self.done: asyncio.Future[None] = conn.loop.create_future()

    def start(self) -> asyncio.Future[None]:
        content = self.request.content
        # What aiohttp's parser took in with the head goes first (its own per-piece read).
        buffered = [content._read_nowait_chunk(-1) for _ in range(len(content._buffer))]
        self.done.add_done_callback(self._resume)
        self.request.protocol.set_parser(self)  # type: ignore[arg-type]
        if buffered:
            self._send(buffered)
        return self.done

    # aiohttp's payload parser interface, fed the caller's bytes

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.done.done():
            self._count(len(data))  # dropped
        else:
            self._send([data])
        return False, b""

    def feed_eof(self) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionResetError("the caller left before its body ended"))

    def _send(self, pieces: list[bytes]) -> None:
        size = sum(map(len, pieces))
        if size > self.left:  # bytes past the body (a pipelined request) are not served
            data = b"".join(pieces)[: self.left]
            pieces, size = [data], len(data)
        try:
            writable = self.conn.send(pieces)
        except ConnectionResetError as exc:
            self.done.set_exception(exc)
            self._count(size)
            return
        self._count(size)
        if not self.left:
            self.done.set_result(None)
        elif writable is not None:
            transport = self.request.transport
            if transport is not None:
                transport.pause_reading()
                writable.add_done_callback(self._resume)

    def _count(self, size: int) -> None:
        if not self.left:
            return
        self.left -= min(size, self.left)
        if not self.left:
            # The whole body is in. aiohttp's stream for it never saw it: it is told the body
            # ended, so it does not wait for it after the answer; and no request follows.
            self.request.content.feed_eof()
            self.request.protocol.close()

    def _resume(self, _: object) -> None:
        transport = self.request.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()


def _sent(sender: asyncio.Future[None] | None) -> bool:
    """The whole request body went up (or there was none)."""
    return sender is None or (
        sender.done() and not sender.cancelled() and sender.exception() is None
    )


def _body_failed(task: asyncio.Future[None], *, answer: asyncio.Future[Response]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not answer.done():
        answer.set_exception(exc)


class _Relayed(web.StreamResponse):
    """A streamed answer whose headers leave with the first body bytes (one send, not two,
    for a small answer); `_relay_response` flushes them at once when no body is waiting."""

    _send_headers_immediately = False


async def _relay_response(
    request: web.Request,
    conn: Connection,
    up: Response,
    sender: asyncio.Future[None] | None,
    close: bool = False,
) -> web.StreamResponse:
    resp = _Relayed(status=up.status, reason=up.reason or None)
    if close:
        resp.force_close()
    resp.headers.extend(response_headers(up))
    done = caller_left = False
    try:
        await resp.prepare(request)
        if conn.complete:  # the whole answer is here: headers, body and end in one go
            await resp.write_eof(conn.take_buffered())
        else:
            await resp.write(conn.take_buffered())  # the headers, and what has arrived
            async for chunk in conn.body():
                await resp.write(chunk)
            await resp.write_eof()
        done = True
    except ConnectionResetError:  # the caller went away; aiohttp drops its connection quietly
        caller_left = True
        return resp
    except asyncio.CancelledError:
        caller_left = True
        raise
    except UpstreamError as exc:
        # Headers are gone already: the only honest signal left is a cut connection.
        log.info("upstream failed mid-response: %s", exc)
        if request.transport is not None:
            request.transport.abort()
    finally:
        # Reused only when the whole body went up and the whole answer came down.
        sent = _sent(sender)
        if sender is not None and not sender.done():
            sender.cancel()
        if caller_left and sent:
            conn.abandon()
        else:
            conn.finish(done and sent)
    return resp


def check_handshake(request: web.Request) -> None:
    """Refuse a malformed WebSocket upgrade before a session is claimed or dialled for it.

    Raises:
        BadRequestError: Sec-WebSocket-Key or Sec-WebSocket-Version is missing or invalid.
    """
    if not web.WebSocketResponse().can_prepare(request).ok:
        raise BadRequestError(
            "The WebSocket handshake is malformed (Sec-WebSocket-Key or Sec-WebSocket-Version)."
        )


def is_websocket(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in _connection_tokens(request.headers)
    )


class WebSocketForwarder:
    """WebSockets relayed both ways as byte tunnels (`router.tunnel`), with the frame size
    cap; the tunnels open now are closed with 1001 when the router shuts down."""

    def __init__(self, max_msg_bytes: int, connect_timeout_s: float) -> None:
        self.max_msg_bytes = max_msg_bytes
        self.connect_timeout_s = connect_timeout_s
        self.tunnels: set[Tunnel] = set()

    async def forward(
        self, request: web.Request, addr: str, target: Target, on_data: Callable[[], None]
    ) -> web.StreamResponse:
        """Relay the WebSocket of `request`; data frames call `on_data`, pings and pongs do not.

        Raises:
            SessionUnreachableError, SessionTimeoutError: the sandbox refused the upgrade.
        """
        key = request.headers["Sec-WebSocket-Key"]  # checked by check_handshake
        headers = upstream_headers(request, target.prefix, drop=WS_ANSWER)
        tunnel = Tunnel(on_data, self.max_msg_bytes)
        answer, rest = await open_tunnel(
            addr, target.rest, headers, key, self.connect_timeout_s, tunnel
        )
        resp = switching_protocols(answer, HOP_BY_HOP)
        del headers, answer  # an idle tunnel keeps as little as it can
        self.tunnels.add(tunnel)  # closed with 1001 when the router shuts down
        try:
            await resp.prepare(request)
            request.protocol.keep_alive(False)
            if request.transport is None:
                raise ConnectionResetError("the caller went away")
            tunnel.start(request.transport, rest)
            # The caller's bytes now go to the tunnel (aiohttp's parser interface, typed narrowly).
            request.protocol.set_parser(tunnel)  # type: ignore[arg-type]
            await tunnel.done
        finally:
            self.tunnels.discard(tunnel)
            if tunnel.up is not None:
                tunnel.up.close()
        return resp


async def close_websockets(registry: set[Tunnel]) -> None:
    """Router shutdown: tell every relayed WebSocket's ends we are going away (1001)."""
    for tunnel in list(registry):
        tunnel.close(GOING_AWAY, b"router shutting down")
