"""Streaming HTTP and WebSocket relay from the router to one sandbox."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from router.errors import (
    BadRequestError,
    RequestTooLargeError,
    SessionTimeoutError,
    SessionUnreachableError,
)
from router.forwarding import FORWARDING, set_forwarding
from router.tunnel import GOING_AWAY, Tunnel, open_tunnel, switching_protocols

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
                raise RequestTooLargeError(self.cap)
            yield chunk

    def error(self) -> RequestTooLargeError:
        return RequestTooLargeError(self.cap)


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
        self.connect_timeout_s = settings.upstream_connect_timeout_s
        self.websockets: set[Tunnel] = set()

    def check_request(self, request: web.Request) -> None:
        """What can be refused before a session is claimed for `request`: a declared body over
        the cap (a streamed one is counted as it goes) and a malformed WebSocket upgrade.

        Raises:
            RequestTooLargeError, BadRequestError.
        """
        if (request.content_length or 0) > self.max_body_bytes:
            raise RequestTooLargeError(self.max_body_bytes)
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
                    addr,
                    target.rest,
                    target.prefix,
                    self.ws_max_msg_bytes,
                    lease.activity,
                    self.connect_timeout_s,
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
                skip_auto_headers=SKIP_AUTO_BODY if has_body else None,
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
    addr: str,
    target: str,
    prefix: str,
    max_msg_bytes: int,
    on_data: Callable[[], None],
    connect_timeout_s: float,
    registry: set[Tunnel],
) -> web.StreamResponse:
    """Relay a WebSocket both ways as a byte tunnel (see `router.tunnel`); data frames call
    `on_data`, pings and pongs do not.

    Raises:
        SessionUnreachableError, SessionTimeoutError: the sandbox refused the upgrade.
    """
    key = request.headers["Sec-WebSocket-Key"]  # checked by check_handshake
    headers = upstream_headers(request, prefix, drop=WS_ANSWER)
    tunnel = Tunnel(on_data, max_msg_bytes)
    answer, rest = await open_tunnel(addr, target, headers, key, connect_timeout_s, tunnel)
    resp = switching_protocols(answer, HOP_BY_HOP)
    del headers, answer  # an idle tunnel keeps as little as it can
    registry.add(tunnel)  # closed with 1001 when the router shuts down
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
        registry.discard(tunnel)
        if tunnel.up is not None:
            tunnel.up.close()
    return resp


async def close_websockets(registry: set[Tunnel]) -> None:
    """Router shutdown: tell every relayed WebSocket's ends we are going away (1001)."""
    for tunnel in list(registry):
        tunnel.close(GOING_AWAY, b"router shutting down")
