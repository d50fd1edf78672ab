"""Semantic Kernel's SessionsPythonTool, which accepts only https:// endpoints, against a
PythonLTS pool behind a TLS router: real library, real worker, real code-interpreter
containers, a self-signed certificate the client is told to trust, API-key auth on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from router.auth import hash_key
from router.pools import parse_pool
from router.server import start_site
from router.settings import Settings
from router.store import Store
from sessionpool.testing import builtin_pool_body
from tests.helpers import docker_worker, engine_fixture, wait_until
from tests.test_tls import client_context, make_cert

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

IMAGE = "sessionpool/code-interpreter:dev"
POOL = "skpool"
KEY = "sp_semantic-kernel-test-key-0123456789"


engine = engine_fixture(IMAGE)


@pytest.fixture
async def https_pool(
    engine: Any, settings: Settings, store: Store, tmp_path: Path
) -> AsyncIterator[tuple[str, Any]]:
    """(the pool's https:// endpoint, the certificate) with one ready sandbox."""
    await store.put_pool(parse_pool(POOL, builtin_pool_body(max_sessions=2)))
    cert = make_cert("sessionpool-sk-test")
    cert.install(tmp_path)
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            [{"name": "sk", "key_sha256": hash_key(KEY), "roles": ["executor"], "pools": [POOL]}]
        )
    )
    async with docker_worker(engine, settings.replace(warm_timeout_s=60)):
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
        try:

            async def ready() -> bool:
                return (await store.counts(POOL))["ready"] >= 1

            await wait_until(ready, timeout=90, interval=0.05)
            yield f"https://127.0.0.1:{port}/pools/{POOL}", cert
        finally:
            await runner.cleanup()


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
