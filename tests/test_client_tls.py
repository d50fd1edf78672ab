"""Semantic Kernel's SessionsPythonTool, which accepts only https:// endpoints, against a
PythonLTS pool behind a TLS router: real library, real worker, real code-interpreter
containers, a self-signed certificate the client is told to trust, API-key auth on."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
import yaml

from router.auth import hash_key
from router.pools import parse_pool
from router.server import start_site
from router.settings import Settings
from router.store import Store
from sessionpool.testing import spawn_worker, stop_process
from tests.helpers import wait_until
from tests.test_tls import client_context, make_cert
from workers.runtime import LABEL_SCOPE

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "sessionpool/code-interpreter:dev"
POOL = "skpool"
KEY = "sp_semantic-kernel-test-key-0123456789"


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    client = docker.from_env()
    client.ping()  # no engine: the test fails here, it never skips
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        subprocess.run(
            ["bash", str(ROOT / "deploy/images/build.sh"), "code-interpreter"], check=True
        )
    yield client
    client.close()


@pytest.fixture
async def https_pool(
    engine: Any, settings: Settings, store: Store, tmp_path: Path
) -> AsyncIterator[tuple[str, Any]]:
    """(the pool's https:// endpoint, the certificate) with one ready sandbox."""
    await store.put_pool(
        parse_pool(
            POOL,
            {
                "properties": {
                    "containerType": "PythonLTS",
                    "scaleConfiguration": {"maxConcurrentSessions": 2, "readySessionInstances": 1},
                }
            },
        )
    )
    cert = make_cert("sessionpool-sk-test")
    cert.install(tmp_path)
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            [{"name": "sk", "key_sha256": hash_key(KEY), "roles": ["executor"], "pools": [POOL]}]
        )
    )
    worker = await spawn_worker(settings.replace(warm_timeout_s=60))
    runner = None
    try:
        runner, port = await start_site(
            settings.replace(
                host="127.0.0.1",
                port=0,
                allocation_wait_s=60.0,
                auth="required",
                api_keys_file=str(keys),
                tls_cert=str(tmp_path / "cert.pem"),
                tls_key=str(tmp_path / "key.pem"),
            )
        )

        async def ready() -> bool:
            return (await store.counts(POOL))["ready"] >= 1

        await wait_until(ready, timeout=90, interval=0.05)
        yield f"https://127.0.0.1:{port}/pools/{POOL}", cert
    finally:
        if runner is not None:
            await runner.cleanup()
        try:
            await stop_process(worker, grace_s=30)
        finally:
            scope = f"{LABEL_SCOPE}={settings.key_prefix}"
            for c in engine.api.containers(all=True, filters={"label": scope}):
                engine.api.remove_container(c["Id"], force=True)


# Semantic Kernel's own modules warn about their deprecated classes at import.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_semantic_kernel_runs_code_over_https(https_pool: tuple[str, Any]) -> None:
    from semantic_kernel.core_plugins.sessions_python_tool.sessions_python_plugin import (
        SessionsPythonTool,
    )

    endpoint, cert = https_pool
    async with httpx.AsyncClient(verify=client_context(cert), timeout=60) as client:
        tool = SessionsPythonTool(
            auth_callback=lambda: KEY, pool_management_endpoint=endpoint, http_client=client
        )
        out = await tool.execute_code("x = 6 * 7\nprint('hello over tls')\nx")
        assert out.startswith("Status:\nSuccess"), out
        assert "Result:\n42" in out and "Stdout:\nhello over tls" in out, out
        # Same identifier, same session: state is kept between calls.
        again = await tool.execute_code("x + 1")
        assert "Result:\n43" in again, again

    # A client that is not told to trust the certificate refuses the endpoint.
    async with httpx.AsyncClient(timeout=10) as untrusting:
        tool = SessionsPythonTool(
            auth_callback=lambda: KEY, pool_management_endpoint=endpoint, http_client=untrusting
        )
        with pytest.raises(httpx.ConnectError):
            await tool.execute_code("1")
