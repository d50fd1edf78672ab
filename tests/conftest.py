"""Shared fixtures: a real redis-server per test session, a unique key prefix per test, an
HTTP client, and in-process HTTP servers playing sandboxes."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest

from router.keys import Keys
from router.settings import Settings
from router.store import Store, open_redis
from sessionpool.testing import RedisServer
from tests.helpers import FakeSandbox


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def key_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(redis_server: RedisServer, key_prefix: str) -> Settings:
    return Settings(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        allocation_wait_s=2.0,
        activity_flush_s=0.1,
        auth="none",
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    redis = open_redis(settings.redis_url)
    yield Store(redis, Keys(settings.key_prefix))
    await redis.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sandboxes() -> AsyncIterator[Callable[[], Awaitable[FakeSandbox]]]:
    """Starts fake sandboxes on demand; releases what they hold and closes them after."""
    made: list[FakeSandbox] = []

    async def make() -> FakeSandbox:
        made.append(await FakeSandbox().start())
        return made[-1]

    yield make
    for sb in made:
        sb.slow_release.set()
        await sb.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Under CI, Docker tests must fail when the engine is missing: nothing may deselect them.
    if os.environ.get("CI") and config.getoption("-m") and "not docker" in config.getoption("-m"):
        raise pytest.UsageError("CI runs the docker tests; do not deselect them")
