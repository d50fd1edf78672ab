"""Identifier → sandbox resolution for one router process: caches, activity and waiting.

The hot path for a warm session makes no Redis round trip: routes and pool definitions are
cached and dropped on the invalidation channel (published by every script that ends a session
or changes a pool). Activity is batched: one TOUCH per pool per flush interval carries every
session that saw a request start or end, and every session with a request still in flight, so
a long download keeps its session alive while a dead router's sessions expire on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from router.errors import (
    NoReadySessionError,
    PoolNotFoundError,
    SessionLimitError,
    SessionUnreachableError,
    StoreUnavailableError,
)
from router.identifiers import session_key
from router.keys import SEP
from router.pools import Pool
from router.settings import Settings
from router.store import UNAVAILABLE as REDIS_UNAVAILABLE
from router.store import Session, Store
from router.waiting import wait_set

# Redis unreachable: through the store (mapped at its boundary) or the pub/sub client.
UNAVAILABLE = (StoreUnavailableError, *REDIS_UNAVAILABLE)
T = TypeVar("T")
log = logging.getLogger("sessionpool.router")
POOL_CACHE_TTL_S = 5.0


@dataclass(slots=True)
class Route:
    """A cached session route; valid while `valid_until` (monotonic) is in the future, and
    refreshed in the background by the first request after `refresh_at`."""

    session: Session
    valid_until: float
    refresh_at: float


class Routing:
    """Resolves identifiers to sandboxes and records their activity."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._routes: dict[tuple[str, str], Route] = {}
        self._pools: dict[str, tuple[Pool, float]] = {}
        self._pool_loads: dict[str, asyncio.Task[Pool]] = {}  # one read per pool at a time
        # Caching is only safe while the invalidation subscription is live.
        self.cache_enabled = False
        self._pending: dict[str, dict[str, int]] = defaultdict(dict)
        self._inflight: dict[tuple[str, str], list[int]] = {}
        self._ready_events: dict[str, asyncio.Event] = {}
        # One CLAIM in flight per (pool, identifier): misses and refreshes share it.
        self._claims: dict[tuple[str, str], asyncio.Task[Session]] = {}
        # Every read and claim running off a request's own task, until it ends (`close`).
        self._background: set[asyncio.Task[Any]] = set()
        self.misses = 0  # requests that waited for a CLAIM (theirs or a shared one)
        # Called with (pool, seconds) whenever a claim allocated a sandbox (metrics).
        self.on_allocated: Callable[[str, float], None] | None = None

    # Pools ---------------------------------------------------------------------------------

    async def get_pool(self, name: str) -> Pool:
        """The pool `name`, from the cache when the invalidation channel is live. Past its
        time-to-live a cached definition is still served while one background read renews
        it, and concurrent misses share one read: a thousand requests in flight when the
        entry ages out cost Redis one GET, not a thousand.

        Raises:
            PoolNotFoundError.
        """
        hit = self._pools.get(name)
        if hit is not None and self.cache_enabled:
            if hit[1] <= time.monotonic() and name not in self._pool_loads:
                self._load_pool(name)  # renewed off the request path
            return hit[0]
        load = self._pool_loads.get(name) or self._load_pool(name)
        return await asyncio.shield(load)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        """Cancel the pool reads and claims still running (at shutdown, before the store's
        client closes: one finishing after it would open a connection nobody closes)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def _load_pool(self, name: str) -> asyncio.Task[Pool]:
        task = self._spawn(self._read_pool(name))
        self._pool_loads[name] = task
        task.add_done_callback(lambda t: self._pool_loaded(name, t))
        return task

    def _pool_loaded(self, name: str, task: asyncio.Task[Pool]) -> None:
        if self._pool_loads.get(name) is task:
            del self._pool_loads[name]
        if not task.cancelled() and task.exception() is not None:
            log.debug("reading pool %s failed: %r", name, task.exception())

    async def _read_pool(self, name: str) -> Pool:
        pool = await self.store.get_pool(name)
        # Not cached when an invalidation for it arrived while the read ran.
        current = self._pool_loads.get(name) is asyncio.current_task()
        if pool is None:
            if current:
                self._pools.pop(name, None)
            raise PoolNotFoundError(name)
        if current:
            self._pools[name] = (pool, time.monotonic() + POOL_CACHE_TTL_S)
        return pool

    # Routes --------------------------------------------------------------------------------

    async def resolve(self, pool: Pool, identifier: str, principal: str = "") -> Session:
        """The session of `identifier`, allocating a ready sandbox on first use.

        Concurrent misses for one identifier share one CLAIM (single flight), and a route in
        use is refreshed in the background before it expires, so a busy identifier never
        sends a herd of CLAIMs to Redis. On a tenant-bound pool the identifier is scoped to
        `principal` (`session_key`): the session returned is the caller's own, and its
        `identifier` is the scoped name.

        Raises:
            SessionLimitError: the pool is at maxConcurrentSessions.
            NoReadySessionError: no sandbox became ready within the allocation wait.
        """
        identifier = session_key(identifier, principal if pool.tenant_binding else None)
        key = (pool.name, identifier)
        route = self._routes.get(key)
        now = time.monotonic()
        if route is not None and route.valid_until > now and self.cache_enabled:
            session = route.session
            if route.refresh_at <= now and key not in self._claims:
                self._start_claim(key, pool, principal)  # off the request path
        else:
            self.misses += 1
            claim = self._claims.get(key) or self._start_claim(key, pool, principal)
            session = await asyncio.shield(claim)
        return session

    def _start_claim(
        self, key: tuple[str, str], pool: Pool, principal: str
    ) -> asyncio.Task[Session]:
        task = self._spawn(self._claim_route(key, pool, principal))
        self._claims[key] = task
        task.add_done_callback(lambda t: self._claim_done(key, t))
        return task

    def _claim_done(self, key: tuple[str, str], task: asyncio.Task[Session]) -> None:
        if self._claims.get(key) is task:
            del self._claims[key]
        if not task.cancelled() and task.exception() is not None:
            # Waiters saw it; a background refresh that failed leaves the route to expire.
            log.debug("claim for %s failed: %r", key, task.exception())

    async def _claim_route(self, key: tuple[str, str], pool: Pool, principal: str) -> Session:
        session = await self._claim(pool, key[1], principal)
        # CLAIM touched the session, so it lives at least one cooldown from now. A cached
        # route is used only while that leaves room for the activity batch of a request
        # served from it to reach Redis (two flush intervals) before the session could
        # expire; with very short cooldowns that means no caching at all.
        flush_s = self.settings.activity_flush_s
        ttl = min(self.settings.route_cache_ttl_s, session.cooldown_ms / 1000 - 2 * flush_s)
        now = time.monotonic()
        # Not when an invalidation (or `forget`) for this key arrived while CLAIM ran.
        if self.cache_enabled and self._claims.get(key) is asyncio.current_task():
            self._routes[key] = Route(session, now + ttl, now + ttl / 2)
        return session

    def cached(self, pool: str, identifier: str) -> Session | None:
        """The route a request would use now without asking Redis, if any."""
        route = self._routes.get((pool, identifier))
        if route is None or route.valid_until <= time.monotonic() or not self.cache_enabled:
            return None
        return route.session

    def lease(self, pool: Pool, identifier: str, principal: str = "") -> Lease:
        """`async with routing.lease(...) as lease`: the session, held for one request."""
        return Lease(self, pool, identifier, principal)

    async def _claim(self, pool: Pool, identifier: str, principal: str) -> Session:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.allocation_wait_s
        event = self._ready_events.setdefault(pool.name, asyncio.Event())
        while True:
            event.clear()
            wait_ms = int(max(deadline - loop.time(), 0) * 1000) + 1000
            result = await self.store.claim(pool, identifier, principal, wait_ms)
            if result.session is not None:
                if result.created and self.on_allocated is not None:
                    self.on_allocated(
                        pool.name, loop.time() - deadline + self.settings.allocation_wait_s
                    )
                return result.session
            if result.at_limit:
                raise SessionLimitError(
                    f"Session pool '{pool.name}' has reached its maximum of "
                    f"{pool.max_sessions} concurrent sessions."
                )
            left = deadline - loop.time()
            if left <= 0:
                raise NoReadySessionError(
                    f"No ready session in pool '{pool.name}' within "
                    f"{self.settings.allocation_wait_s:g} s."
                )
            # Woken by the ready channel; the 1 s cap only covers a lost message.
            await wait_set(event, min(left, 1.0))

    def forget(self, pool: str, identifier: str) -> None:
        self._routes.pop((pool, identifier), None)
        self._claims.pop((pool, identifier), None)  # an answer in flight is not cached

    # Activity ------------------------------------------------------------------------------

    def begin(self, session: Session, pool: str) -> None:
        """A request for `session` started."""
        key = (pool, session.identifier)
        entry = self._inflight.get(key)
        if entry is None:
            self._inflight[key] = [1, session.cooldown_ms if session.lifecycle == "Timed" else 0]
        else:
            entry[0] += 1
        self.activity(session, pool)

    def end(self, session: Session, pool: str) -> None:
        """A request for `session` ended (however it ended)."""
        key = (pool, session.identifier)
        entry = self._inflight.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] <= 0:
                del self._inflight[key]
        self.activity(session, pool)

    def activity(self, session: Session, pool: str) -> None:
        """Data moved for `session` (a request edge or a WebSocket message)."""
        if session.lifecycle == "Timed":
            self._pending[pool][session.identifier] = session.cooldown_ms

    def _take_batch(self) -> Iterator[tuple[str, list[tuple[str, int]]]]:
        batch = self._pending
        self._pending = defaultdict(dict)
        for (pool, ident), (_, cooldown_ms) in self._inflight.items():
            if cooldown_ms:
                batch[pool][ident] = cooldown_ms
        for pool, items in batch.items():
            yield pool, list(items.items())

    async def flush(self) -> None:
        """Write pending activity; on a Redis error it is kept for the next try."""
        for pool, items in self._take_batch():
            try:
                await self.store.touch(pool, items)
            except UNAVAILABLE:
                for ident, cooldown_ms in items:
                    self._pending[pool].setdefault(ident, cooldown_ms)
                raise

    async def run_flusher(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_set(stop, self.settings.activity_flush_s)
            try:
                await self.flush()
            except UNAVAILABLE as exc:
                log.warning("activity flush failed: %s", exc)
        with contextlib.suppress(*UNAVAILABLE):
            await self.flush()

    # Invalidation --------------------------------------------------------------------------

    def _on_message(self, channel: str, data: str) -> None:
        if channel == self.store.keys.ready_channel:
            event = self._ready_events.get(data)
            if event is not None:
                event.set()
            return
        pool, _, ident = data.partition(SEP)
        if ident:
            self.forget(pool, ident)
        else:  # the pool itself changed
            self._pools.pop(pool, None)
            self._pool_loads.pop(pool, None)  # a read in flight is not cached
            for key in [k for k in self._routes if k[0] == pool]:
                del self._routes[key]
            for key in [k for k in self._claims if k[0] == pool]:
                del self._claims[key]

    async def run_subscriber(self, stop: asyncio.Event) -> None:
        """Follow invalidations and ready notices; caching is off whenever this is not live."""
        keys = self.store.keys
        while not stop.is_set():
            try:
                async for channel, data in self.store.subscribe(
                    stop, keys.invalidation_channel, keys.ready_channel
                ):
                    if not channel:  # subscribed: from now on no invalidation is missed
                        self.cache_enabled = True
                        continue
                    self._on_message(channel, data)
            except (*UNAVAILABLE, OSError) as exc:
                log.warning("invalidation subscription lost: %s", exc)
            finally:
                self.cache_enabled = False
                self._routes.clear()
                self._claims.clear()
                self._pools.clear()
                self._pool_loads.clear()
            await wait_set(stop, 0.2)


class Lease:
    """One request's hold on its session: `begin` on entry, `end` on exit (however it ends),
    `activity` for data in between; the route is forgotten when the sandbox proved unreachable,
    so the next request looks it up again."""

    __slots__ = ("identifier", "pool", "principal", "routing", "session")
    session: Session

    def __init__(self, routing: Routing, pool: Pool, identifier: str, principal: str) -> None:
        self.routing = routing
        self.pool = pool
        self.identifier = identifier
        self.principal = principal

    async def __aenter__(self) -> Lease:
        self.session = await self.routing.resolve(self.pool, self.identifier, self.principal)
        self.routing.begin(self.session, self.pool.name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, SessionUnreachableError):  # the route may be stale: look it up again
            self.routing.forget(self.pool.name, self.session.identifier)
        self.routing.end(self.session, self.pool.name)

    def activity(self) -> None:
        """Data moved (a WebSocket message)."""
        self.routing.activity(self.session, self.pool.name)
