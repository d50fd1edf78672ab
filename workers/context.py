"""What every worker role shares: settings, Redis, the runtime, the stop event."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import aiohttp
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router import events
from router.errors import StoreUnavailableError
from router.settings import Settings
from router.store import Redis, Store
from router.waiting import wait_set
from workers.runtime import Runtime

log = logging.getLogger("sessionpool.worker")
# Redis unreachable: from the store (mapped at its boundary) or from a raw client (streams).
REDIS_ERRORS = (StoreUnavailableError, RedisConnectionError, RedisTimeoutError)
Event = tuple[str, events.Event | None]  # (stream id, event); None: malformed or unknown


@dataclass
class Context:
    """Resources of one worker process."""

    settings: Settings
    store: Store
    streams: Redis  # its own client: blocking reads must not share the short socket timeout
    runtime: Runtime
    http: aiohttp.ClientSession
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def scope(self) -> str:
        return self.settings.key_prefix

    async def pause(self, seconds: float) -> bool:
        """Wait `seconds` or until stop; True when the worker should go on."""
        return not await wait_set(self.stop, seconds)
