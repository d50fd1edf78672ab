"""The aiohttp application: endpoints, error envelope, and the resources it owns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router import admin, auth, management, proxy
from router.addresses import parse_networks
from router.errors import (
    PoolNotFoundError,
    RequestTooLargeError,
    SessionPoolError,
    SessionTimeoutError,
    SessionUnreachableError,
    UnauthorizedError,
)
from router.forwarding import TRUSTED_PROXIES
from router.identifiers import query_identifier
from router.keys import Keys
from router.limits import LimitPolicy
from router.logs import trace_id_var
from router.metrics import RouterMetrics
from router.pools import POOL_NAME
from router.routing import Routing
from router.settings import Settings
from router.store import Store, open_redis

log = logging.getLogger("sessionpool.router")

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
ROUTING = web.AppKey("routing", Routing)
CLIENT = web.AppKey("client", aiohttp.ClientSession)
METRICS = web.AppKey("metrics", RouterMetrics)
WEBSOCKETS = web.AppKey("websockets", set[web.WebSocketResponse])
TRACE_ID = web.RequestKey("trace_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, code: str, message: str, trace_id: str, retry_after_s: int | None = None
) -> web.Response:
    headers = {"x-ms-error-code": code, "x-ms-trace-id": trace_id}
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    body = {"error": {"code": code, "message": message, "traceId": trace_id}}
    return web.Response(
        status=status, body=orjson.dumps(body), headers=headers, content_type="application/json"
    )


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error the router produces leaves here, in the ACA envelope."""
    trace_id = uuid.uuid4().hex
    request[TRACE_ID] = trace_id
    trace_id_var.set(trace_id)
    metrics = request.app[METRICS]
    try:
        return await handler(request)
    except SessionPoolError as exc:
        resp = error_response(exc.status, exc.code, exc.message, trace_id, exc.retry_after_s)
        if isinstance(exc, UnauthorizedError):
            resp.headers["WWW-Authenticate"] = auth.CHALLENGE
        if isinstance(exc, SessionUnreachableError | SessionTimeoutError):
            pool = request.match_info.get("pool", "")
            metrics.upstream_errors.labels(pool, exc.code).inc()
        if exc.status >= 500:
            log.warning("%s: %s", exc.code, exc.message)
        return resp
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("store unavailable: %s", exc)
        metrics.store_errors.inc()
        return error_response(
            503, "StoreUnavailable", "The session store is unavailable.", trace_id, 1
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status, exc.reason)
        resp = error_response(exc.status, code, exc.reason, trace_id)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp


def _split_target(raw_path: str, depth: int) -> tuple[str, str]:
    """The raw path's first `depth` segments (the pool endpoint's path), and the rest with the
    query, both exactly as sent."""
    path, sep, query = raw_path.partition("?")
    parts = path.split("/", depth + 1)
    rest = "/" + parts[depth + 1] if len(parts) > depth + 1 else "/"
    return "/".join(parts[: depth + 1]), rest + sep + query


async def _serve(
    request: web.Request, pool_name: str, prefix: str, target: str
) -> web.StreamResponse:
    """Serve one request for a pool; `prefix` is the raw path of its endpoint, `target` what
    follows it."""
    base = f"{request.scheme}://{request.host}{prefix}"  # the endpoint's absolute URL
    app = request.app
    routing = app[ROUTING]
    settings = app[SETTINGS]
    principal = await app[auth.AUTH].authorize(request, auth.EXECUTOR, pool_name)
    path = target.partition("?")[0]
    if not POOL_NAME.match(pool_name):
        raise PoolNotFoundError(f"Session pool '{pool_name}' was not found.")
    if path.startswith("/.management/"):
        pool = await routing.get_pool(pool_name)
        return await management.management(request, routing, pool, path[13:], base, principal.id)
    if path in management.CODE_INTERPRETER_PATHS and path != "/session":
        pool = await routing.get_pool(pool_name)
        if pool.container_type == "PythonLTS":
            return await management.code_interpreter(
                request, routing, pool, path, base, principal.id
            )
    ident = query_identifier(request.query)  # before Redis is touched
    if proxy.is_websocket(request):
        proxy.check_handshake(request)  # a broken upgrade claims no session
    if (request.content_length or 0) > settings.max_body_bytes:
        raise RequestTooLargeError(
            f"The request body is larger than {settings.max_body_bytes} bytes."
        )
    pool = await routing.get_pool(pool_name)
    if path == "/session" and pool.container_type == "PythonLTS":
        return await management.code_interpreter(request, routing, pool, path, base, principal.id)
    session = await routing.resolve(pool, ident, principal.id)
    routing.begin(session, pool_name)
    try:
        if proxy.is_websocket(request):
            return await proxy.forward_websocket(
                request,
                app[CLIENT],
                session.addr,
                target,
                prefix,
                settings.ws_max_msg_bytes,
                lambda: routing.activity(session, pool_name),
                app[WEBSOCKETS],
            )
        started = time.monotonic()
        proxy_seconds = app[METRICS].proxy.labels(pool_name)
        return await proxy.forward_http(
            request,
            app[CLIENT],
            session.addr,
            target,
            prefix,
            settings.max_body_bytes,
            on_headers=lambda: proxy_seconds.observe(time.monotonic() - started),
        )
    except SessionUnreachableError:
        routing.forget(pool_name, session.identifier)  # the route may be stale: look it up again
        raise
    finally:
        routing.end(session, pool_name)


async def pool_endpoint(request: web.Request) -> web.StreamResponse:
    return await _serve(request, request.match_info["pool"], *_split_target(request.raw_path, 2))


async def aca_endpoint(request: web.Request) -> web.StreamResponse:
    return await _serve(request, request.match_info["pool"], *_split_target(request.raw_path, 6))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = await request.app[METRICS].render(request.app[STORE])
    return web.Response(
        body=body, content_type="text/plain", charset="utf-8", headers={"Cache-Control": "no-store"}
    )


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[STORE].redis.ping()
    except (RedisConnectionError, RedisTimeoutError, OSError):
        return web.json_response({"status": "store unavailable"}, status=503)
    return web.json_response({"status": "ready"})


def host_suffix_middleware(suffix: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """`http://{pool}.{suffix}/…` forwards the whole path to the pool's sessions."""
    tail = "." + suffix.lower().lstrip(".")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = (request.host or "").lower().rsplit(":", 1)[0]
        if host.endswith(tail) and host != tail[1:]:
            pool = host[: -len(tail)]
            return await _serve(request, pool, "", request.raw_path)
        return await handler(request)

    return middleware


def create_app(settings: Settings) -> web.Application:
    """The router application; serve it with `handler_cancellation=True`."""
    middlewares: list[Callable[..., Awaitable[web.StreamResponse]]] = [errors_middleware]
    if settings.host_suffix:
        middlewares.append(host_suffix_middleware(settings.host_suffix))
    app = web.Application(middlewares=middlewares, handler_args={"max_field_size": 8190})
    app[SETTINGS] = settings
    app[METRICS] = RouterMetrics()
    app[WEBSOCKETS] = set()
    app.on_shutdown.append(_close_websockets)
    app[auth.AUTH] = auth.Authenticator.from_settings(settings)
    app[TRUSTED_PROXIES] = parse_networks(settings.trusted_proxies)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_client_ctx)
    app.cleanup_ctx.append(_background_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_routes(
        admin.routes(STORE, settings.code_interpreter_image, LimitPolicy.from_settings(settings))
    )
    app.router.add_route("*", "/pools/{pool}", pool_endpoint)
    app.router.add_route("*", "/pools/{pool}/{tail:.*}", pool_endpoint)
    aca = "/subscriptions/{sub}/resourceGroups/{rg}/sessionPools/{pool}"
    app.router.add_route("*", aca, aca_endpoint)
    app.router.add_route("*", aca + "/{tail:.*}", aca_endpoint)
    return app


async def _close_websockets(app: web.Application) -> None:
    await proxy.close_websockets(app[WEBSOCKETS])


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = open_redis(settings.redis_url, timeout_s=settings.redis_timeout_s)
    store = Store(redis, Keys(settings.key_prefix))
    app[STORE] = store
    app[ROUTING] = routing = Routing(store, settings)
    allocation = app[METRICS].allocation
    routing.on_allocated = lambda pool, seconds: allocation.labels(pool).observe(seconds)
    yield
    await redis.aclose()


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # limit=0: every open stream or WebSocket holds a connection; a cap would queue sessions.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0, ttl_dns_cache=None)
    client = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=proxy.client_timeout(
            settings.upstream_connect_timeout_s, settings.upstream_idle_timeout_s
        ),
        read_bufsize=256 * 1024,
        max_field_size=8190,
    )
    app[CLIENT] = client
    yield
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
