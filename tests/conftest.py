"""Shared fixtures: a real redis-server per test session, a unique key prefix per test, an
HTTP client, and in-process HTTP servers playing sandboxes."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.keys import Keys
from router.settings import Settings
from router.store import Store, open_redis
from sessionpool.testing import ECHO_IMAGE, RedisServer, serving_router
from tests.helpers import FakeSandbox, open_engine
from tests.worker_rigs import Rig, open_rig


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
async def router_url(settings: Settings) -> AsyncIterator[str]:
    """A router of `settings` in this process (waiting up to 20 s for a sandbox); its URL."""
    async with serving_router(settings.replace(allocation_wait_s=20.0)) as url:
        yield url


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


@pytest.fixture(scope="session")
def echo_engine() -> Iterator[Any]:
    """A Docker client, with the echo image built when missing (asked for only by the tests
    that need it: no engine, they fail)."""
    client = open_engine(ECHO_IMAGE)
    yield client
    client.close()


@pytest.fixture
async def rig(
    request: pytest.FixtureRequest, settings: Settings, tmp_path: Path
) -> AsyncIterator[Rig]:
    """The runtime a worker scenario runs on (`@on(...)` in tests/worker_rigs.py)."""
    async with open_rig(request.param, settings, tmp_path, request.getfixturevalue) as made:
        yield made


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Under CI, Docker tests must fail when the engine is missing: nothing may deselect them.
    if os.environ.get("CI") and config.getoption("-m") and "not docker" in config.getoption("-m"):
        raise pytest.UsageError("CI runs the docker tests; do not deselect them")
