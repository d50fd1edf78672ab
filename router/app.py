"""The aiohttp application: endpoints, error envelope, and the resources it owns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from random import getrandbits
from typing import Generic, TypeVar

import aiohttp
import orjson
from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import UrlMappingMatchInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router import admin, auth, management, mcp, proxy
from router.addresses import parse_networks
from router.errors import PoolNotFoundError, SessionPoolError, StoreUnavailableError
from router.forwarding import TRUSTED_PROXIES
from router.identifiers import query_identifier
from router.keys import Keys
from router.limits import LimitPolicy
from router.logs import trace_id_var
from router.metrics import RouterMetrics
from router.pools import BUILTIN_TYPES, POOL_NAME, Pool
from router.routing import Routing
from router.settings import Settings
from router.store import Store, open_redis
from router.target import Target

log = logging.getLogger("sessionpool.router")
T = TypeVar("T")

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
ROUTING = web.AppKey("routing", Routing)
UPSTREAM = web.AppKey("upstream", proxy.Upstream)
READY_CACHE_S = 0.25
# A request body is held by aiohttp up to twice this before the caller's socket is paused.
# Measured on 1 GiB uploads (bench.path, 3 alternating runs each): 32 KiB 1.58 GB/s per core,
# aiohttp's 64 KiB 1.24, 1 MiB 0.94; 16 KiB like 32 KiB. The kernel's socket buffer holds
# the rest; a smaller hold also means less memory per uploading connection.
BODY_READ_BUFSIZE = 32 * 1024
METRICS = web.AppKey("metrics", RouterMetrics)
TRACE_ID = web.RequestKey("trace_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, code: str, message: str, trace_id: str, extra: dict[str, str] | None = None
) -> web.Response:
    headers = {"x-ms-error-code": code, "x-ms-trace-id": trace_id, **(extra or {})}
    body = {"error": {"code": code, "message": message, "traceId": trace_id}}
    return web.Response(
        status=status, body=orjson.dumps(body), headers=headers, content_type="application/json"
    )


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error the router produces leaves here, in the ACA envelope; every response is
    counted by status class."""
    trace_id = f"{getrandbits(128):032x}"  # like a uuid4's digits; no syscall per request
    request[TRACE_ID] = trace_id
    trace_id_var.set(trace_id)
    resp = await _envelope_errors(request, handler, trace_id)
    request.app[METRICS].response(resp.status)
    return resp


async def _envelope_errors(
    request: web.Request, handler: Handler, trace_id: str
) -> web.StreamResponse:
    try:
        try:
            return await handler(request)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailableError("The session store is unavailable.") from exc
    except SessionPoolError as exc:
        if isinstance(exc, StoreUnavailableError):
            request.app[METRICS].store_errors.inc()
        if exc.status >= 500:
            log.warning("%s: %s (%s)", exc.code, exc.message, exc.__cause__ or "")
        return error_response(exc.status, exc.code, exc.message, trace_id, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status, exc.reason)
        resp = error_response(exc.status, code, exc.reason, trace_id)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp


# Paths a pool endpoint answers itself rather than proxying; `containers` limits an entry to
# pools of those container types (None: every pool).
LocalHandler = Callable[[web.Request, Routing, Pool, Target, str], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Local:
    handler: LocalHandler
    containers: frozenset[str] | None = None

    def serves(self, pool: Pool) -> bool:
        return self.containers is None or pool.container_type in self.containers


async def _management(
    request: web.Request, routing: Routing, pool: Pool, target: Target, principal: str
) -> web.StreamResponse:
    action = target.path.removeprefix(MANAGEMENT)
    base = target.base_url(request)
    return await management.management(request, routing, pool, action, base, principal)


async def _code_interpreter(
    request: web.Request, routing: Routing, pool: Pool, target: Target, principal: str
) -> web.StreamResponse:
    base = target.base_url(request)
    return await management.code_interpreter(request, routing, pool, target.path, base, principal)


MANAGEMENT = "/.management/"
LOCAL_PREFIXES: dict[str, Local] = {MANAGEMENT: Local(_management)}
LOCAL_PATHS: dict[str, Local] = {
    path: Local(_code_interpreter, BUILTIN_TYPES) for path in management.CODE_INTERPRETER_PATHS
}


def _local(path: str) -> Local | None:
    local = LOCAL_PATHS.get(path)
    if local is None and path.startswith("/."):
        for prefix, candidate in LOCAL_PREFIXES.items():
            if path.startswith(prefix):
                return candidate
    return local


async def _serve(request: web.Request, *, target: Target) -> web.StreamResponse:
    """Serve one request for a pool endpoint: answer it here, or proxy it to its session."""
    app = request.app
    principal = await app[auth.AUTH].authorize(request, auth.EXECUTOR, target.pool)
    if not POOL_NAME.match(target.pool):
        raise PoolNotFoundError(target.pool)
    routing, upstream = app[ROUTING], app[UPSTREAM]
    local = _local(target.path)
    pool: Pool | None = None
    if local is not None:
        pool = await routing.get_pool(target.pool)
        if local.serves(pool):
            return await local.handler(request, routing, pool, target, principal.id)
    ident = query_identifier(request.query)  # a proxied request is refused before Redis
    upstream.check_request(request)  # is touched, and nothing is claimed for it
    if pool is None:
        pool = await routing.get_pool(target.pool)
    async with routing.lease(pool, ident, principal.id) as lease:
        return await upstream.forward(request, lease, target)


class Dispatch:
    """The application's request handler. A request for a pool endpoint's session (nearly
    all the traffic) goes straight to `_serve` in the error envelope; anything else, and any
    path the route table might read differently (escapes, dot segments, a fragment, the
    platform MCP endpoint, a pool name the table would not match, `Expect`, a host-suffix
    host), takes aiohttp's URL dispatch and middlewares as before.

    Installed over `Application._handle`, so every runner (the tests' servers too) serves
    through it. URL dispatch and the middleware chain were ~10 % of the router's CPU per
    proxied request (bench.path A/B: c=32 10.8k -> 12.5k req/s per core).
    """

    __slots__ = ("match", "routed", "suffix")

    def __init__(self, app: web.Application, route: web.AbstractRoute, suffix: str) -> None:
        self.routed: Handler = app._handle
        self.suffix = "." + suffix.lower().lstrip(".") if suffix else ""
        # What `request.app` reads on the direct way: one frozen match for every request.
        match = UrlMappingMatchInfo({}, route)
        match.add_app(app)
        match.freeze()
        self.match = match

    def target(self, request: web.BaseRequest) -> Target | None:
        """The target of a request the route table would send to `pool_endpoint` with the
        same pool and raw path; None for anything else."""
        raw = request.raw_path
        if not raw.startswith("/pools/"):
            return None
        path = raw.partition("?")[0]
        if "%" in path or "/." in path or "#" in path or path.endswith(("/mcp", "/mcp/")):
            return None
        pool = path[7:].partition("/")[0]
        if not POOL_NAME.match(pool) or hdrs.EXPECT in request.headers:
            return None
        if self.suffix and (request.host or "").lower().rsplit(":", 1)[0].endswith(self.suffix):
            return None
        return Target.split(pool, raw, 2)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        target = self.target(request)
        if target is None:
            return await self.routed(request)
        request._match_info = self.match
        return await errors_middleware(request, partial(_serve, target=target))


async def pool_endpoint(request: web.Request) -> web.StreamResponse:
    return await _serve(
        request, target=Target.split(request.match_info["pool"], request.raw_path, 2)
    )


async def aca_endpoint(request: web.Request) -> web.StreamResponse:
    return await _serve(
        request, target=Target.split(request.match_info["pool"], request.raw_path, 6)
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class Cached(Generic[T]):
    """An async answer shared by everyone who asks while it is being computed, and reused
    for `ttl_s` after (0: only shared), so a burst of /readyz or /metrics costs Redis one
    call at a time; errors are not reused."""

    def __init__(self, compute: Callable[[], Awaitable[T]], ttl_s: float) -> None:
        self._compute = compute
        self._ttl_s = ttl_s
        self._value: T | None = None
        self._until = 0.0
        self._task: asyncio.Task[T] | None = None

    async def get(self) -> T:
        value = self._value
        if value is not None and asyncio.get_running_loop().time() < self._until:
            return value
        if self._task is None:
            self._task = asyncio.create_task(self._refresh())
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(self._task)

    async def _refresh(self) -> T:
        try:
            value = self._value = await self._compute()
            self._until = asyncio.get_running_loop().time() + self._ttl_s
            return value
        finally:
            self._task = None

    async def close(self) -> None:
        """Stop a computation in flight: its callers may have left (the shield kept it
        running), and it must not reach its client once the client is closed."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # as Routing.close


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = await request.app[PROBES].metrics.get()
    return web.Response(
        body=body, content_type="text/plain", charset="utf-8", headers={"Cache-Control": "no-store"}
    )


async def readyz(request: web.Request) -> web.Response:
    if await request.app[PROBES].ready.get():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "store unavailable"}, status=503)


class Probes:
    """/readyz and /metrics: their own two Redis connections, and answers shared by callers
    who ask at once, so no burst of them takes a connection from the request path."""

    def __init__(self, store: Store, metrics: RouterMetrics) -> None:
        self.store = store
        self.ready = Cached(store.ping, READY_CACHE_S)
        self.metrics = Cached(lambda: metrics.render(store), 0.0)  # gauges stay exact

    async def close(self) -> None:
        await self.ready.close()
        await self.metrics.close()


PROBES = web.AppKey("probes", Probes)


def host_suffix_middleware(suffix: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """`http://{pool}.{suffix}/…` forwards the whole path to the pool's sessions."""
    tail = "." + suffix.lower().lstrip(".")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = (request.host or "").lower().rsplit(":", 1)[0]
        if host.endswith(tail) and host != tail[1:]:
            pool = host[: -len(tail)]
            return await _serve(request, target=Target.whole(pool, request.raw_path))
        return await handler(request)

    return middleware


def create_app(settings: Settings) -> web.Application:
    """The router application; serve it with `handler_cancellation=True`."""
    middlewares: list[Callable[..., Awaitable[web.StreamResponse]]] = [errors_middleware]
    if settings.host_suffix:
        middlewares.append(host_suffix_middleware(settings.host_suffix))
    app = web.Application(
        middlewares=middlewares,
        handler_args={"max_field_size": 8190, "read_bufsize": BODY_READ_BUFSIZE},
    )
    app[SETTINGS] = settings
    app[METRICS] = RouterMetrics()
    app.on_shutdown.append(_close_websockets)
    app[auth.AUTH] = auth.Authenticator.from_settings(settings)
    app[TRUSTED_PROXIES] = parse_networks(settings.trusted_proxies)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_client_ctx)
    app.cleanup_ctx.append(_background_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    images = (settings.code_interpreter_image, settings.shell_image)
    limits = LimitPolicy.from_settings(settings)
    app.router.add_routes(admin.routes(STORE, *images, limits=limits))
    app.router.add_route("*", "/pools/{pool}", pool_endpoint)
    # Before the catch-all: a pool's platform MCP endpoint (other pools' /mcp is forwarded).
    mcp_endpoint = mcp.McpEndpoint(ROUTING, UPSTREAM, fallback=pool_endpoint)
    app.router.add_route("*", "/pools/{pool}/mcp", mcp_endpoint.handle)
    fast = app.router.add_route("*", "/pools/{pool}/{tail:.*}", pool_endpoint)
    aca = "/subscriptions/{sub}/resourceGroups/{rg}/sessionPools/{pool}"
    app.router.add_route("*", aca, aca_endpoint)
    app.router.add_route("*", aca + "/{tail:.*}", aca_endpoint)
    # An instance attribute over the method the runners hand to aiohttp's server (set past
    # Application's debug-mode attribute guard: `_handle` is its own name).
    object.__setattr__(app, "_handle", Dispatch(app, fast, settings.host_suffix))
    return app


async def _close_websockets(app: web.Application) -> None:
    await app[UPSTREAM].close_websockets()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = open_redis(
        settings.redis_url,
        timeout_s=settings.redis_timeout_s,
        max_connections=settings.redis_max_connections,
        pool_wait_s=settings.redis_pool_wait_s,
    )
    probe_redis = open_redis(
        settings.redis_url, timeout_s=settings.redis_timeout_s, max_connections=2, pool_wait_s=1.0
    )
    app[PROBES] = Probes(Store(probe_redis, Keys(settings.key_prefix)), app[METRICS])
    store = Store(redis, Keys(settings.key_prefix))
    app[STORE] = store
    app[ROUTING] = routing = Routing(store, settings)
    allocation = app[METRICS].allocation
    routing.on_allocated = lambda pool, seconds: allocation.labels(pool).observe(seconds)
    yield
    await app[PROBES].close()
    await redis.aclose()
    await probe_redis.aclose()


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # limit=0: every open stream or WebSocket holds a connection; a cap would queue sessions.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0, ttl_dns_cache=None)
    client = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=proxy.SKIP_AUTO_SESSION,
        timeout=proxy.client_timeout(
            settings.upstream_connect_timeout_s, settings.upstream_idle_timeout_s
        ),
        read_bufsize=256 * 1024,
        max_field_size=8190,
    )
    app[UPSTREAM] = proxy.Upstream(client, settings, app[METRICS])
    yield
    app[UPSTREAM].clients.close()
    await client.close()


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    routing = app[ROUTING]
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(routing.run_subscriber(stop), name="subscriber"),
        asyncio.create_task(routing.run_flusher(stop), name="activity-flusher"),
    ]
    yield
    stop.set()
    # Both notice `stop` within a second; the flusher writes what it still holds.
    await asyncio.wait(tasks, timeout=3.0)
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await routing.close()
