"""The command line: `sessionpool up` end to end, `apply`, `pools`, `sessions`."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from router.auth import Principal, load_api_keys
from router.settings import Settings
from router.store import Store
from sessionpool import cli as sessionpool_cli
from tests.helpers import wait_until
from tests.test_tls import client_context, make_cert

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sessionpool.cli", *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


async def check_own_redis_is_locked(up_line: str) -> None:
    """`up`'s own Redis wants a password, and the line that names it does not show it.
    (A raw client: redis-py would leave the refused connection to a later test's loop.)"""
    url = re.search(r"redis ((?:redis|unix)://\S+?)\)", up_line)
    assert url is not None and "@" not in url.group(1), up_line
    parts = urlsplit(url.group(1))
    if parts.scheme == "unix":
        reader, writer = await asyncio.open_unix_connection(parts.path)
    else:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(b"PING\r\n")
        assert (await reader.readline()).startswith(b"-NOAUTH"), "up's Redis answers anyone"
    finally:
        writer.close()
        await writer.wait_closed()


async def run_up(
    runtime: str,
    key_prefix: str,
    *extra: str,
    key: str = "",
    tls: ssl.SSLContext | None = None,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sessionpool.cli",
        "up",
        "--runtime",
        runtime,
        "--port",
        "0",
        "--key-prefix",
        key_prefix,
        *extra,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        curl = None
        while curl is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, "sessionpool up exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("sessionpool is up:"):
                port = int(line.split()[4].rsplit(":", 1)[1])
                await check_own_redis_is_locked(line)
            if line.startswith("try:"):
                curl = line.split("'")[1]
                assert ("Authorization: Bearer $KEY" in line) == bool(key), line
        scheme = "https" if tls else "http"
        assert curl == f"{scheme}://127.0.0.1:{port}/pools/demo/hello?identifier=me-1"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        connector = aiohttp.TCPConnector(ssl=tls) if tls else None
        async with aiohttp.ClientSession(connector=connector) as http:
            if key:  # auth on: an anonymous caller is refused
                async with http.get(curl) as r:
                    assert r.status == 401
            async with http.get(curl, headers=headers) as r:  # works as printed
                assert r.status == 200, await r.text()
                body = await r.json()
        assert body["path"] == "/hello" and body["query"] == "identifier=me-1"
    finally:
        proc.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(proc.stdout.read(), 60)).decode()
        assert await proc.wait() == 0, "".join(lines) + rest
    assert "no sandbox left behind" in rest


async def test_up_with_the_process_runtime(key_prefix: str) -> None:
    await run_up("process", key_prefix)
    out = subprocess.run(
        ["pgrep", "-f", str(ROOT / "sessionpool/demo/echo.py")], capture_output=True, text=True
    )
    assert out.stdout.strip() == "", "an echo process was left behind"


async def test_up_with_auth_on(key_prefix: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    made = cli("new-key", "me", "--role", "executor", "--file", str(keys))
    assert made.returncode == 0, made.stderr
    key = made.stderr.rsplit(" ", 1)[1].strip()
    await run_up("process", key_prefix, "--api-keys-file", str(keys), key=key)


async def test_up_with_tls(key_prefix: str, tmp_path: Path) -> None:
    cert = make_cert("sessionpool-up")
    cert.install(tmp_path)
    tls = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    await run_up("process", key_prefix, *tls, tls=client_context(cert))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.test"])
def test_up_refuses_a_public_address_without_auth(host: str) -> None:
    out = cli("up", "--host", host, "--port", "0", "--runtime", "process")
    assert out.returncode == 2
    assert f"refusing --host {host} with auth off" in out.stderr
    assert "--api-keys-file" in out.stderr  # says how to turn auth on
    assert "sessionpool is up" not in out.stdout


def test_up_never_falls_back_to_the_process_runtime_on_a_public_address(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.yaml"
    assert cli("new-key", "me", "--file", str(keys)).returncode == 0
    no_docker = {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    out = cli("up", "--host", "0.0.0.0", "--port", "0", "--api-keys-file", str(keys), env=no_docker)
    assert out.returncode == 2
    assert "process runtime" in out.stderr and "--runtime process" in out.stderr
    assert "sessionpool is up" not in out.stdout


@pytest.mark.docker
async def test_up_with_docker(key_prefix: str) -> None:
    import docker

    await run_up("docker", key_prefix)
    client = docker.from_env()
    try:
        left = client.containers.list(
            all=True, filters={"label": f"io.sessionpool.scope={key_prefix}"}
        )
        assert left == []
    finally:
        client.close()


async def test_apply_pools_sessions(settings: Settings, store: Store, tmp_path: Path) -> None:
    env = {
        "SESSIONPOOL_REDIS_URL": settings.redis_url,
        "SESSIONPOOL_KEY_PREFIX": settings.key_prefix,
    }
    f = tmp_path / "pools.yaml"
    f.write_text("""
pools:
  - name: alpha
    properties:
      scaleConfiguration: {maxConcurrentSessions: 4, readySessionInstances: 0}
      customContainerTemplate:
        containers: [{name: main, image: sessionpool/echo:dev}]
        ingress: {targetPort: 8080}
  - name: beta
    properties:
      customContainerTemplate:
        containers: [{name: main, image: sessionpool/echo:dev}]
        ingress: {targetPort: 8080}
""")
    first = cli("apply", "-f", str(f), env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["pool alpha: created", "pool beta: created"]
    again = cli("apply", "-f", str(f), env=env)
    assert again.stdout.splitlines() == ["pool alpha: unchanged", "pool beta: unchanged"]
    f.write_text(f.read_text().replace("readySessionInstances: 0", "readySessionInstances: 1"))
    third = cli("apply", "-f", str(f), env=env)
    assert third.stdout.splitlines() == ["pool alpha: updated", "pool beta: unchanged"]
    pool = await store.get_pool("alpha")
    assert pool is not None and pool.ready_instances == 1
    table = cli("pools", env=env)
    assert table.returncode == 0
    rows = [line.split() for line in table.stdout.splitlines()]
    assert rows[0][:2] == ["POOL", "IMAGE"] and [r[0] for r in rows[1:]] == ["alpha", "beta"]
    sessions = cli("sessions", "alpha", env=env)
    assert sessions.stdout.split() == [
        "IDENTIFIER",
        "SANDBOX",
        "CREATED",
        "LAST",
        "ACCESS",
        "EXPIRES",
    ]
    bad = tmp_path / "bad.json"
    good = (
        '{"customContainerTemplate": {"containers": [{"name": "main", "image": "x"}], '
        '"ingress": {"targetPort": 80}}}'
    )
    bad.write_text(
        f'{{"pools": [{{"name": "ok-pool", "properties": {good}}}, '
        f'{{"name": "Bad", "properties": {good}}}]}}'
    )
    refused = cli("apply", "-f", str(bad), env=env)
    assert refused.returncode == 2
    assert "pool Bad: name" in refused.stderr
    assert await store.get_pool("ok-pool") is None  # nothing half-applied


async def test_wait_until_helper_fails_at_deadline() -> None:
    with pytest.raises(AssertionError):
        await wait_until(lambda: False, timeout=0.1)


async def test_events_lists_the_lifecycle(settings: Settings, store: Store) -> None:
    from tests.helpers import FakeSandbox, add_ready, make_pool

    pool = make_pool()
    await store.put_pool(pool)
    sb = await FakeSandbox().start()
    try:
        await add_ready(store, pool, sb)
        claimed = await store.claim(pool, "evt-user")
        assert claimed.created
        assert await store.stop("demo", "evt-user", "stopped")
    finally:
        await sb.close()
    env = {
        "SESSIONPOOL_REDIS_URL": settings.redis_url,
        "SESSIONPOOL_KEY_PREFIX": settings.key_prefix,
    }
    out = cli("events", "demo", env=env)
    assert out.returncode == 0, out.stderr
    import orjson

    events = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert [(e["event"], e["identifier"], e["pool"]) for e in events] == [
        ("allocated", "evt-user", "demo"),
        ("stopped", "evt-user", "demo"),
    ]


def test_cli_makes_and_hashes_keys(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert sessionpool_cli.main(["new-key", "ci", "--role", "admin", "--pool", "demo"]) == 0
    out, err = capsys.readouterr()
    key = err.rsplit(" ", 1)[1].strip()
    path = tmp_path / "keys.yaml"
    path.write_text(out)
    (entry,) = load_api_keys(str(path))
    assert entry.principal == Principal("key:ci", frozenset({"admin"}), frozenset({"demo"}))
    assert key not in out  # only the hash goes to the file
    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    assert sessionpool_cli.main(["hash-key"]) == 0
    assert capsys.readouterr().out.strip() == yaml.safe_load(out)[0]["key_sha256"]


def test_new_key_adds_to_the_file_atomically(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "keys.yaml"
    assert sessionpool_cli.main(["new-key", "first", "--file", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # a new keys file is the owner's only
    path.write_text("# ops keys\n" + path.read_text())
    inode = path.stat().st_ino
    assert sessionpool_cli.main(["new-key", "second", "--pool", "demo", "--file", str(path)]) == 0
    err = capsys.readouterr().err
    second_key = err.rsplit(" ", 1)[1].strip()
    assert second_key not in path.read_text()
    # Replaced by a rename (a reader sees the old file or the new one, never half of one),
    # with the comment kept and every entry saying its pools.
    assert path.stat().st_ino != inode
    assert path.read_text().startswith("# ops keys\n")
    first, second = load_api_keys(str(path))
    assert first.principal == Principal("key:first", frozenset({"executor"}), None)
    assert yaml.safe_load(path.read_text())[0]["pools"] == ["*"]
    assert second.principal.pools == frozenset({"demo"})
    assert second.digest == hashlib.sha256(second_key.encode()).digest()
    # A name already there: refused, and the file is untouched, with no temporary left.
    before = path.read_bytes()
    assert sessionpool_cli.main(["new-key", "first", "--file", str(path)]) == 2
    assert "twice" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.yaml"]
