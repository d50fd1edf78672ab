"""Streaming HTTP and WebSocket relay from the router to one sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from router.errors import (
    BadRequestError,
    RequestTooLargeError,
    SessionTimeoutError,
    SessionUnreachableError,
)
from router.forwarding import FORWARDING, set_forwarding

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
WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
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


def downstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The sandbox's response headers as the caller should see them."""
    named = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in named:
            continue
        out.add(name, value)
    if "Transfer-Encoding" in headers:
        # aiohttp re-frames the body; a stale length would contradict chunking.
        out.popall("Content-Length", None)
    return out


class _CappedBody:
    """The request body as a stream that fails once it passes `cap` bytes."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.exceeded = False

    async def stream(self, body: aiohttp.StreamReader) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in body.iter_any():
            seen += len(chunk)
            if seen > self.cap:
                self.exceeded = True
                raise RequestTooLargeError(f"The request body is larger than {self.cap} bytes.")
            yield chunk

    def error(self) -> RequestTooLargeError:
        return RequestTooLargeError(f"The request body is larger than {self.cap} bytes.")


class Upstream:
    """The way to the sandboxes: the one client session, the size limits, the proxy metrics
    and the relayed WebSockets (closed with 1001 at shutdown)."""

    def __init__(
        self, client: aiohttp.ClientSession, settings: Settings, metrics: RouterMetrics
    ) -> None:
        self.client = client
        self.max_body_bytes = settings.max_body_bytes
        self.ws_max_msg_bytes = settings.ws_max_msg_bytes
        self.metrics = metrics
        self._proxy_seconds: dict[str, Histogram] = {}  # labels() per request is not free
        self.websockets: set[web.WebSocketResponse] = set()

    def check_request(self, request: web.Request) -> None:
        """What can be refused before a session is claimed for `request`: a declared body over
        the cap (a streamed one is counted as it goes) and a malformed WebSocket upgrade.

        Raises:
            RequestTooLargeError, BadRequestError.
        """
        if (request.content_length or 0) > self.max_body_bytes:
            raise RequestTooLargeError(
                f"The request body is larger than {self.max_body_bytes} bytes."
            )
        if is_websocket(request):
            check_handshake(request)

    async def forward(
        self, request: web.Request, lease: Lease, target: Target
    ) -> web.StreamResponse:
        """Relay `request` (HTTP or WebSocket) to the leased session.

        Raises:
            RequestTooLargeError, SessionUnreachableError, SessionTimeoutError.
        """
        addr = lease.session.addr
        try:
            if is_websocket(request):
                return await forward_websocket(
                    request,
                    self.client,
                    addr,
                    target.rest,
                    target.prefix,
                    self.ws_max_msg_bytes,
                    lease.activity,
                    self.websockets,
                )
            started = time.monotonic()
            seconds = self._proxy_seconds.get(target.pool)
            if seconds is None:
                seconds = self._proxy_seconds[target.pool] = self.metrics.proxy.labels(target.pool)
            return await forward_http(
                request,
                self.client,
                addr,
                target.rest,
                target.prefix,
                self.max_body_bytes,
                on_headers=lambda: seconds.observe(time.monotonic() - started),
            )
        except (SessionUnreachableError, SessionTimeoutError) as exc:
            self.metrics.upstream_errors.labels(target.pool, exc.code).inc()
            raise

    async def close_websockets(self) -> None:
        """Router shutdown: tell every relayed WebSocket client we are going away (1001)."""
        await close_websockets(self.websockets)


def client_timeout(connect_s: float, idle_s: float) -> aiohttp.ClientTimeout:
    # No total timeout: downloads, SSE and long polls may last as long as data keeps moving.
    return aiohttp.ClientTimeout(
        total=None, connect=connect_s, sock_connect=connect_s, sock_read=idle_s
    )


async def forward_http(
    request: web.Request,
    client: aiohttp.ClientSession,
    addr: str,
    target: str,
    prefix: str,
    max_body_bytes: int,
    on_headers: Callable[[], None] | None = None,
) -> web.StreamResponse:
    """Stream `request` to `http://{addr}{target}` and the answer back.

    A body longer than `max_body_bytes` fails as it streams (a declared length was checked
    by `Upstream.check_request`).

    Raises:
        RequestTooLargeError, SessionUnreachableError, SessionTimeoutError: before the
        response started; afterwards a failure aborts the client connection instead.
    """
    headers = upstream_headers(request, prefix)
    has_body = request.body_exists
    url = URL(f"http://{addr}{target}", encoded=True)
    attempts = 2 if request.method in IDEMPOTENT and not has_body else 1
    for attempt in range(attempts):
        body = _CappedBody(max_body_bytes)
        data = body.stream(request.content) if has_body else None
        try:
            up_cm = client.request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                skip_auto_headers=SKIP_AUTO,
            )
            up = await up_cm.__aenter__()
        except RequestTooLargeError:
            raise
        except TimeoutError as exc:  # before ClientError: ServerTimeoutError is both
            log.warning("session at %s did not answer in time: %r", addr, exc)
            raise SessionTimeoutError("The session did not answer in time.") from exc
        except aiohttp.ServerDisconnectedError as exc:
            if body.exceeded:
                raise body.error() from None
            # A pooled keep-alive connection the sandbox had closed: try once more.
            if attempt + 1 < attempts:
                continue
            log.warning("session at %s dropped the connection: %r", addr, exc)
            raise SessionUnreachableError("The session dropped the connection.") from exc
        except aiohttp.ClientError as exc:
            if body.exceeded:
                raise body.error() from None
            # The caller never learns a sandbox's address (the operator's log does).
            log.warning("session at %s is unreachable: %r", addr, exc)
            raise SessionUnreachableError("The session is unreachable.") from exc
        break
    if on_headers is not None:
        on_headers()
    try:
        return await _relay_response(request, up)
    finally:
        await up_cm.__aexit__(None, None, None)


class _Relayed(web.StreamResponse):
    """A streamed answer whose headers leave with the first body bytes (one send, not two,
    for a small answer); `_relay_response` flushes them at once when no body is waiting."""

    _send_headers_immediately = False


async def _relay_response(request: web.Request, up: aiohttp.ClientResponse) -> web.StreamResponse:
    resp = _Relayed(status=up.status, reason=up.reason, headers=downstream_headers(up.headers))
    try:
        await resp.prepare(request)
        await resp.write(up.content.read_nowait())  # the headers, and what has arrived
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
    except ConnectionResetError:  # the caller went away; aiohttp drops its connection quietly
        return resp
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
        # Headers are gone already: the only honest signal left is a cut connection.
        log.info("upstream failed mid-response: %r", exc)
        if request.transport is not None:
            request.transport.abort()
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


async def forward_websocket(
    request: web.Request,
    client: aiohttp.ClientSession,
    addr: str,
    target: str,
    prefix: str,
    max_msg_bytes: int,
    on_data: Callable[[], None],
    registry: set[web.WebSocketResponse] | None = None,
) -> web.WebSocketResponse:
    """Relay a WebSocket both ways; data frames call `on_data`, pings and pongs do not.

    Raises:
        SessionUnreachableError, SessionTimeoutError: the sandbox refused the upgrade.
    """
    protocols = [
        p.strip()
        for v in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in v.split(",")
        if p.strip()
    ]
    headers = upstream_headers(request, prefix, drop=WS_HANDSHAKE)
    url = URL(f"ws://{addr}{target}", encoded=True)
    try:
        up = await client.ws_connect(
            url,
            headers=headers,
            protocols=protocols,
            max_msg_size=max_msg_bytes,
            autoclose=False,
            autoping=True,
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise SessionUnreachableError(
            f"The session refused the WebSocket upgrade ({exc.status})."
        ) from exc
    except TimeoutError as exc:
        log.warning("session at %s did not answer the upgrade in time: %r", addr, exc)
        raise SessionTimeoutError("The session did not answer in time.") from exc
    except aiohttp.ClientError as exc:
        log.warning("session at %s is unreachable: %r", addr, exc)
        raise SessionUnreachableError("The session is unreachable.") from exc
    ws = web.WebSocketResponse(
        protocols=[up.protocol] if up.protocol else [],
        max_msg_size=max_msg_bytes,
        autoclose=False,
        autoping=True,
    )
    try:
        await ws.prepare(request)
        if registry is not None:
            registry.add(ws)  # closed with 1001 when the router shuts down
        down_task = asyncio.ensure_future(_pump(ws, up, on_data))
        up_task = asyncio.ensure_future(_pump(up, ws, on_data))
        try:
            await asyncio.wait([down_task, up_task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (down_task, up_task):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        if registry is not None:
            registry.discard(ws)
        await up.close()
        if ws.prepared:  # else close() raises and would hide why prepare() failed
            await ws.close()
    return ws


async def close_websockets(registry: set[web.WebSocketResponse]) -> None:
    """Router shutdown: tell every relayed WebSocket client we are going away (1001)."""
    for ws in list(registry):
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"router shutting down")


_WSAny = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(src: _WSAny, dst: _WSAny, on_data: Callable[[], None]) -> None:
    """Copy frames from src to dst until one side closes; the close code goes across."""
    while True:
        msg = await src.receive()
        if msg.type == WSMsgType.TEXT:
            on_data()
            await dst.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            on_data()
            await dst.send_bytes(msg.data)
        elif msg.type == WSMsgType.CLOSE:
            code = msg.data if isinstance(msg.data, int) else 1000
            await dst.close(code=code, message=(msg.extra or "").encode())
            await src.close(code=code)
            return
        elif msg.type == WSMsgType.ERROR:
            await dst.close(code=1011, message=b"peer error")
            return
        else:  # CLOSING / CLOSED
            if not dst.closed:
                code = src.close_code or 1000
                await dst.close(code=code)
            return
