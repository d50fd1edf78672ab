"""Shared fixtures: a real redis-server per test session, a unique key prefix per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from router.keys import Keys
from router.settings import Settings
from router.store import Store, open_redis


class RedisServer:
    """A redis-server on a unix socket that a test may stop and start again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self.socket.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Under CI, Docker tests must fail when the engine is missing: nothing may deselect them.
    if os.environ.get("CI") and config.getoption("-m") and "not docker" in config.getoption("-m"):
        raise pytest.UsageError("CI runs the docker tests; do not deselect them")
