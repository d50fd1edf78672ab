"""Redis access: connecting (plain, Sentinel, Cluster) and the typed operations on pool state."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router import scripts
from router.errors import StoreUnavailableError
from router.events import Allocated, Event, PoolChanged, PoolDeleted, Teardown, decode, encode
from router.keys import Keys, PoolKeys
from router.pools import Pool
from router.sandboxes import MarkReady, Sandbox

STREAM_MAXLEN = 10_000
Redis = aioredis.Redis
# What "the store is unreachable" looks like from redis-py (BusyLoadingError is a
# ConnectionError): Store turns these into StoreUnavailableError at its boundary.
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError)
P = ParamSpec("P")
T = TypeVar("T")


def _store_call(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Map Redis being unreachable to `StoreUnavailableError` (the cause is kept)."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except UNAVAILABLE as exc:
            raise StoreUnavailableError(f"The session store is unavailable: {exc}") from exc

    return call


def glob_escape(value: str) -> str:
    """`value` matched literally in a Redis glob (MATCH, KEYS)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in value)


def text(value: Any) -> str:
    """A Redis reply as str (the clients here do not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def open_redis(
    url: str,
    *,
    timeout_s: float | None = 2.0,
    max_connections: int = 200,
    pool_wait_s: float | None = None,
) -> Redis:
    """A Redis client for `url`.

    Accepts `redis://`, `rediss://`, `unix://`, `redis+sentinel://h1:p1,h2:p2/<master>[/<db>]`
    and `redis+cluster://host:port`. `timeout_s=None` is for blocking stream reads. With
    `pool_wait_s`, a caller finding all `max_connections` busy waits up to that long for one
    instead of failing at once (plain URLs; Sentinel and Cluster keep their own pools).
    """
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": 2.0 if timeout_s is None else timeout_s,
        "health_check_interval": 15,
    }
    parts = urlsplit(url)
    if parts.scheme == "redis+sentinel":
        hosts = []
        for hp in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = hp.partition(":")
            hosts.append((host, int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("redis+sentinel URL needs a master name: .../<master>[/<db>]")
        db = int(path[1]) if len(path) > 1 else 0
        password = parts.password or parse_qs(parts.query).get("password", [None])[0]
        # The sentinels share the password (deploy/k8s: requirepass on both, one Secret).
        sentinel_kwargs = {"socket_timeout": 1.0, "password": password}
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            hosts, sentinel_kwargs=sentinel_kwargs, password=password, db=db, **common
        )
        client = sentinel.master_for(
            path[0], redis_class=_SentinelRedis, max_connections=max_connections
        )
        client.sentinel_manager = sentinel
        return cast(Redis, client)
    if parts.scheme == "redis+cluster":
        host, _, port = parts.netloc.rsplit("@", 1)[-1].partition(":")
        return cast(
            Redis,
            RedisCluster(host=host, port=int(port or 6379), password=parts.password, **common),
        )
    if pool_wait_s is not None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_wait_s, **common
        )
        return aioredis.Redis.from_pool(pool)
    return aioredis.Redis.from_url(url, max_connections=max_connections, **common)


class _SentinelRedis(aioredis.Redis):
    """A Sentinel-managed client that, when closed, also closes its pool and the clients it
    keeps to the sentinels (redis-py leaves both open otherwise)."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool=True)
        manager = self.sentinel_manager
        for s in manager.sentinels if manager is not None else ():
            await s.aclose()


@dataclass(frozen=True, slots=True)
class Session:
    """A session record as stored, with its current expiry."""

    identifier: str
    sandbox: str
    container: str
    addr: str
    created_ms: int
    cooldown_ms: int
    owner: str
    lifecycle: str
    expires_ms: int | None = None

    @property
    def last_accessed_ms(self) -> int | None:
        if self.expires_ms is None:
            return None
        if self.lifecycle != "Timed":
            return self.created_ms
        return self.expires_ms - self.cooldown_ms

    @classmethod
    def from_json(cls, identifier: str, raw: bytes | str, expires: float | None) -> Session:
        d = orjson.loads(raw)
        return cls(
            identifier=identifier,
            sandbox=d["sandbox"],
            container=d.get("container") or "",
            addr=d.get("addr") or "",
            created_ms=int(d["createdAt"]),
            cooldown_ms=int(d["cooldownMs"]),
            owner=d.get("owner") or "",
            lifecycle=d.get("lifecycle") or "Timed",
            expires_ms=None if expires is None else int(expires),
        )


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What CLAIM answered: a session (new or existing) or why there is none."""

    session: Session | None
    created: bool = False
    at_limit: bool = False
    empty: bool = False


class Store:
    """Typed operations over one deployment's keys; every multi-key change is one Lua script."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        reg = redis.register_script
        self._claim = reg(scripts.CLAIM)
        self._touch = reg(scripts.TOUCH)
        self._stop = reg(scripts.STOP)
        self._expire = reg(scripts.EXPIRE)
        self._next_expiry = reg(scripts.NEXT_EXPIRY)
        self._launch_environment = reg(scripts.LAUNCH_ENVIRONMENT)
        self._reserve = reg(scripts.RESERVE)
        self._set_container = reg(scripts.SET_CONTAINER)
        self._mark_ready = reg(scripts.MARK_READY)
        self._retire = reg(scripts.RETIRE)
        self._retire_surplus = reg(scripts.RETIRE_SURPLUS)
        self._forget = reg(scripts.FORGET)

    def pk(self, pool: str) -> PoolKeys:
        return self.keys.pool(pool)

    # Pools ---------------------------------------------------------------------------------

    @_store_call
    async def get_pool(self, name: str) -> Pool | None:
        raw = await self.redis.get(self.pk(name).definition)
        return None if raw is None else Pool.loads(raw)

    @_store_call
    async def pool_names(self) -> list[str]:
        names = await self.redis.smembers(self.keys.pools)
        return sorted(text(n) for n in names)

    @_store_call
    async def put_pool(self, pool: Pool) -> None:
        await self.redis.set(self.pk(pool.name).definition, pool.dumps())
        await self.redis.sadd(self.keys.pools, pool.name)
        await self.redis.publish(self.keys.invalidation_channel, f"{pool.name}\x00")
        await self.add_event(pool.name, PoolChanged())

    @_store_call
    async def delete_pool(self, name: str) -> bool:
        """Remove the definition, end every session and retire every sandbox.

        Workers destroy the containers (and remove any the records no longer name).
        """
        k = self.pk(name)
        existed = bool(await self.redis.delete(k.definition, k.mcp_key, k.mcp_unused))
        await self.redis.srem(self.keys.pools, name)
        await self.redis.publish(self.keys.invalidation_channel, f"{name}\x00")
        for ident in await self.redis.hkeys(k.sessions):
            await self.stop(name, text(ident), "stopped")
        for sid in map(text, await self.redis.hkeys(k.sandboxes)):
            if await self.retire(name, sid, "deleted"):
                await self.add_event(name, Teardown(sandbox=sid, reason="deleted"))
        await self.add_event(name, PoolDeleted())
        return existed

    # MCP -----------------------------------------------------------------------------------

    @_store_call
    async def mcp_key(self, pool: str) -> str | None:
        """The pool's MCP API key, None before the first fetch. Read on every call, never
        cached, so a rotation shuts the old key out of every router at once."""
        raw = await self.redis.get(self.pk(pool).mcp_key)
        return None if raw is None else text(raw)

    @_store_call
    async def fetch_mcp_key(self, pool: str, new_key: str) -> str:
        """The pool's MCP API key, set to `new_key` if it has none yet (concurrent first
        fetches agree on one)."""
        old = await self.redis.set(self.pk(pool).mcp_key, new_key, nx=True, get=True)
        return new_key if old is None else text(old)

    @_store_call
    async def rotate_mcp_key(self, pool: str, new_key: str) -> None:
        await self.redis.set(self.pk(pool).mcp_key, new_key)

    @_store_call
    async def mcp_env(self, pool: str, environment: str) -> str | None:
        """An MCP environment's state ("new" or "live"), None when unknown or expired."""
        raw = await self.redis.get(self.pk(pool).mcp_env(environment))
        return None if raw is None else text(raw)

    @_store_call
    async def launch_mcp_env(self, pool: str, environment: str, ttl_s: int, cap: int) -> bool:
        """Record a new ("new") environment for `ttl_s`; False: the pool already has `cap`
        environments launched and not used yet."""
        k = self.pk(pool)
        keys = [k.mcp_unused, k.mcp_env(environment)]
        return bool(
            await self._launch_environment(keys=keys, args=[environment, ttl_s * 1000, cap])
        )

    @_store_call
    async def set_mcp_env_live(self, pool: str, environment: str, ttl_s: int) -> None:
        """The environment is in use: its record lives `ttl_s` and it no longer counts as unused."""
        k = self.pk(pool)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(k.mcp_env(environment), "live", ex=ttl_s)
            pipe.zrem(k.mcp_unused, environment)
            await pipe.execute()

    @_store_call
    async def delete_mcp_env(self, pool: str, environment: str) -> None:
        k = self.pk(pool)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(k.mcp_env(environment))
            pipe.zrem(k.mcp_unused, environment)
            await pipe.execute()

    # Sessions ------------------------------------------------------------------------------

    @_store_call
    async def claim(
        self, pool: Pool, identifier: str, owner: str = "", wait_ms: int = 30_000
    ) -> ClaimResult:
        """Look up or allocate; `wait_ms` is how long the caller would wait on an empty pool."""
        k = self.pk(pool.name)
        code, raw = await self._claim(
            keys=[
                k.sessions,
                k.expiry,
                k.ready,
                k.sandboxes,
                k.events,
                k.empty_flag,
                k.log,
                k.demand,
            ],
            args=[
                identifier,
                pool.max_sessions,
                pool.cooldown_s * 1000,
                owner,
                pool.lifecycle,
                pool.max_alive_s * 1000,
                STREAM_MAXLEN,
                pool.version,
                wait_ms,
            ],
        )
        code = int(code)
        if code == -1:
            return ClaimResult(None, at_limit=True)
        if code == -2:
            return ClaimResult(None, empty=True)
        return ClaimResult(Session.from_json(identifier, raw, None), created=code == 2)

    @_store_call
    async def touch(self, pool: str, items: Sequence[tuple[str, int]]) -> int:
        """Record activity for (identifier, cooldown ms) pairs of Timed sessions."""
        if not items:
            return 0
        args: list[Any] = []
        for ident, cooldown_ms in items:
            args += [ident, cooldown_ms]
        return int(await self._touch(keys=[self.pk(pool).expiry], args=args))

    def _stop_keys(self, pool: str) -> list[str]:
        k = self.pk(pool)
        return [k.sessions, k.expiry, k.sandboxes, k.events, k.log]

    @_store_call
    async def stop(
        self, pool: str, identifier: str, reason: str, sandbox: str = "", owner: str = ""
    ) -> bool:
        """End a session; with `sandbox`, only if that sandbox still holds it; with `owner`,
        only if that principal owns it (checked and stopped in one script)."""
        ended = await self._stop(
            keys=self._stop_keys(pool),
            args=[
                identifier,
                reason,
                sandbox,
                STREAM_MAXLEN,
                self.keys.invalidation_channel,
                pool,
                owner,
            ],
        )
        return bool(int(ended))

    @_store_call
    async def expire(self, pool: str, limit: int = 500) -> list[str]:
        ended = await self._expire(
            keys=self._stop_keys(pool),
            args=[limit, STREAM_MAXLEN, self.keys.invalidation_channel, pool],
        )
        return [text(e) for e in ended]

    @_store_call
    async def next_expiry_ms(self, pool: str) -> int | None:
        """Milliseconds until the pool's earliest expiresAt by Redis' clock; None: no session."""
        due = await self._next_expiry(keys=[self.pk(pool).expiry])
        return None if due is None else int(due)

    @_store_call
    async def get_session(self, pool: str, identifier: str) -> Session | None:
        k = self.pk(pool)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(k.sessions, identifier)
            pipe.zscore(k.expiry, identifier)
            raw, expires = await pipe.execute()
        return None if raw is None else Session.from_json(identifier, raw, expires)

    @_store_call
    async def list_sessions(self, pool: str, skip: int, limit: int) -> tuple[list[Session], int]:
        """A page of sessions ordered by expiry, and the total count."""
        k = self.pk(pool)
        total = int(await self.redis.zcard(k.expiry))
        page: list[Any] = await self.redis.zrange(k.expiry, skip, skip + limit - 1, withscores=True)
        if not page:
            return [], total
        raws = await self.redis.hmget(k.sessions, [m for m, _ in page])
        out = [
            Session.from_json(text(m), raw, float(score))
            for (m, score), raw in zip(page, raws, strict=True)
            if raw is not None
        ]
        return out, total

    @_store_call
    async def sessions_named(self, pool: str, prefix: str) -> list[Session]:
        """Every session whose stored name starts with `prefix` (one principal's, on a
        tenant-bound pool), ordered by expiry. Redis filters: no other session leaves it."""
        k = self.pk(pool)
        found = [
            (text(name), raw)
            async for name, raw in self.redis.hscan_iter(
                k.sessions, match=glob_escape(prefix) + "*", count=1000
            )
        ]
        if not found:
            return []
        scores = await self.redis.zmscore(k.expiry, [name for name, _ in found])
        out = [
            Session.from_json(name, raw, score)
            for (name, raw), score in zip(found, scores, strict=True)
            if score is not None
        ]
        out.sort(key=lambda s: (s.expires_ms or 0, s.identifier))
        return out

    @_store_call
    async def counts(self, pool: str) -> dict[str, int]:
        k = self.pk(pool)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(k.ready)
            pipe.zcard(k.expiry)
            pipe.zcard(k.warming)
            ready, allocated, warming = await pipe.execute()
        return {"ready": int(ready), "allocated": int(allocated), "warming": int(warming)}

    # Sandboxes (workers) -------------------------------------------------------------------

    @_store_call
    async def reserve(
        self, pool: Pool, worker: str, candidates: Sequence[str], target: int | None = None
    ) -> list[str]:
        """Write `warming` records for what the pool lacks; `target` is the demand-following
        number of ready sandboxes (default and minimum: readySessionInstances)."""
        k = self.pk(pool.name)
        want = max(pool.ready_instances, target or 0)
        out = await self._reserve(
            keys=[k.ready, k.warming, k.sandboxes, k.demand, k.expiry],
            args=[
                pool.ready_instances,
                pool.version,
                worker,
                pool.max_sessions,
                want,
                *candidates,
            ],
        )
        return [text(s) for s in out]

    @_store_call
    async def retire_surplus(self, pool: str, target: int, grace_ms: int, limit: int) -> list[str]:
        """Retire unclaimed ready sandboxes above `target` that have waited `grace_ms`."""
        k = self.pk(pool)
        out = await self._retire_surplus(
            keys=[k.ready, k.warming, k.sandboxes, k.demand, k.events],
            args=[target, grace_ms, STREAM_MAXLEN, limit],
        )
        return [text(s) for s in out]

    @_store_call
    async def allocation_times(self, pool: str, window_ms: int, cap: int) -> list[int]:
        """When (ms, Redis' clock) the pool allocated sessions in the last `window_ms`, read
        from the stream ids of its `allocated` entries (at most `cap` entries looked at)."""
        sec, usec = await self.redis.time()
        start = int(sec) * 1000 + int(usec) // 1000 - window_ms
        entries: Any = await self.redis.xrevrange(
            self.pk(pool).events, max="+", min=str(max(start, 0)), count=cap
        )
        return [
            int(text(mid).partition("-")[0])
            for mid, fields in entries
            if isinstance(decode(fields.get(b"data")), Allocated)
        ]

    @_store_call
    async def set_container(
        self, pool: str, sandbox: str, container: str, engine: str = ""
    ) -> bool:
        args = [sandbox, container, engine]
        return bool(int(await self._set_container(keys=[self.pk(pool).sandboxes], args=args)))

    @_store_call
    async def mark_ready(self, pool: str, sandbox: str, container: str, addr: str) -> MarkReady:
        k = self.pk(pool)
        answer = await self._mark_ready(
            keys=[k.sandboxes, k.warming, k.ready, k.definition],
            args=[sandbox, container, addr, self.keys.ready_channel, pool],
        )
        return MarkReady(int(answer))

    @_store_call
    async def retire(self, pool: str, sandbox: str, reason: str) -> bool:
        k = self.pk(pool)
        return bool(
            int(await self._retire(keys=[k.sandboxes, k.warming, k.ready], args=[sandbox, reason]))
        )

    @_store_call
    async def forget(self, pool: str, sandbox: str) -> bool:
        k = self.pk(pool)
        return bool(int(await self._forget(keys=[k.sandboxes, k.warming, k.ready], args=[sandbox])))

    @_store_call
    async def sandboxes(self, pool: str) -> dict[str, Sandbox]:
        """Every sandbox record of the pool, by sandbox id."""
        raw = await self.redis.hgetall(self.pk(pool).sandboxes)
        return {text(s): Sandbox.loads(text(s), v) for s, v in raw.items()}

    @_store_call
    async def sandbox(self, pool: str, sandbox: str) -> Sandbox | None:
        raw = await self.redis.hget(self.pk(pool).sandboxes, sandbox)
        return None if raw is None else Sandbox.loads(sandbox, raw)

    @_store_call
    async def ready_ids(self, pool: str) -> list[str]:
        """Ready sandbox ids, longest ready first."""
        return [text(s) for s in await self.redis.zrange(self.pk(pool).ready, 0, -1)]

    # Streams -------------------------------------------------------------------------------

    def events_stream(self, pool: str) -> str:
        """The key of the pool's work stream, for the workers' stream readers (they read many
        pools' streams at once, blocking, on a client of their own)."""
        return self.pk(pool).events

    @_store_call
    async def ack_events(self, pool: str, group: str, ids: Sequence[str]) -> None:
        await self.redis.xack(self.pk(pool).events, group, *ids)

    @_store_call
    async def add_event(self, pool: str, event: Event) -> None:
        """Queue work for the workers on the pool's stream."""
        await self.redis.xadd(
            self.pk(pool).events,
            {"data": encode(event)},
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )

    @_store_call
    async def log_event(self, pool: str, event: dict[str, Any]) -> None:
        """Append to the pool's lifecycle stream (what `sessionpool events` shows)."""
        t = await self.redis.time()
        event.setdefault("at", int(t[0]) * 1000 + int(t[1]) // 1000)
        await self.redis.xadd(
            self.pk(pool).log, {"data": orjson.dumps(event)}, maxlen=STREAM_MAXLEN, approximate=True
        )

    # Operators -------------------------------------------------------------------------------

    async def ping(self) -> bool:
        """Whether Redis answers (for readiness: never raises)."""
        try:
            await self.redis.ping()
        except (*UNAVAILABLE, OSError):
            return False
        return True

    @_store_call
    async def pool_exists(self, name: str) -> bool:
        return bool(await self.redis.sismember(self.keys.pools, name))

    @_store_call
    async def stored_properties(self, name: str) -> dict[str, Any] | None:
        """The stored properties, secrets included, without validating them again (so a
        definition a later release validates more strictly can still be replaced)."""
        raw = await self.redis.get(self.pk(name).definition)
        if raw is None:
            return None
        props = orjson.loads(raw).get("properties")
        return props if isinstance(props, dict) else {}

    @_store_call
    async def session_ids(self, pool: str) -> list[str]:
        return [text(i) for i in await self.redis.hkeys(self.pk(pool).sessions)]

    @_store_call
    async def read_logs(
        self, after: dict[str, str], block_ms: int | None = None
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """Lifecycle events of the pools in `after` (pool → last id seen, "0-0" for all), as
        (pool, id, event), oldest first; waits up to `block_ms` for new ones when given."""
        streams = {self.pk(pool).log: pool for pool in after}
        last = {key: after[pool] for key, pool in streams.items()}
        reply: Any = await self.redis.xread(last, count=1000, block=block_ms)  # type: ignore[arg-type]
        out = []
        for stream, entries in reply or []:
            for mid, fields in entries:
                out.append((streams[text(stream)], text(mid), orjson.loads(fields[b"data"])))
        return out

    def subscribe(self, stop: asyncio.Event, *channels: str) -> AsyncIterator[tuple[str, str]]:
        """`iter_pubsub` on this store's client (channels from `self.keys`)."""
        return iter_pubsub(self.redis, stop, *channels)


async def wait_redis(redis: Redis, deadline_s: float) -> None:
    """Wait until Redis answers PING, or raise the last error at the deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        try:
            await redis.ping()
            return
        except (aioredis.ConnectionError, aioredis.TimeoutError):
            if loop.time() > end:
                raise
            await asyncio.sleep(0.05)


async def iter_pubsub(
    redis: Redis, stop: asyncio.Event, *channels: str
) -> AsyncIterator[tuple[str, str]]:
    """Yield (channel, message) from a subscription, and ("", "") once it is live.

    Ends when `stop` is set (checked twice a second: redis-py may swallow a cancellation
    that races its read timeout, so cancelling alone is not a reliable way out).
    Connection errors propagate to the caller, who decides how to resubscribe.
    """
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(*channels)
        confirmed = 0
        while not stop.is_set():
            msg = await pubsub.get_message(timeout=0.5)
            if msg is None:
                continue
            if msg["type"] == "subscribe":
                confirmed += 1
                if confirmed == len(channels):
                    yield "", ""
                continue
            if msg["type"] != "message":
                continue
            ch, data = msg["channel"], msg["data"]
            yield (
                ch.decode() if isinstance(ch, bytes) else ch,
                data.decode() if isinstance(data, bytes) else str(data),
            )
    finally:
        with contextlib.suppress(aioredis.ConnectionError, aioredis.TimeoutError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
