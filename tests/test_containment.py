"""Containment from the tenant's side: what a sandbox is allowed, reported from inside it.

The hostile image's /report reads the sandbox's own /proc and cgroup files: capabilities,
no_new_privs, seccomp, memory/CPU/pids limits (with and without `resources`), its mounts and
where it can write; /fill writes until the filesystem refuses. Fail closed: no sandbox starts
when the host firewall rules cannot be installed, and rules deleted behind the worker's back
come back. What a sandbox can reach (host ports, peers, an outside host in a network
namespace of the test's own, 169.254.169.254) is asserted by
test_docker_runtime.py::test_sandboxes_reach_neither_each_other_nor_the_host_nor_metadata and
test_hostile_sessions.py::test_a_session_reaches_nothing_it_must_not; the bombs' effect on a
second session of the same pool by test_hostile_sessions.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from docker.errors import NotFound

from router.errors import SandboxRuntimeError
from router.limits import DEFAULT, LimitPolicy, Limits
from router.pools import Pool
from router.settings import GiB, MiB
from tests.helpers import (
    docker_runtime_fixtures,
    ensure_image,
    iptables_has,
    make_pool,
    remove_networks,
    sh,
    wait_until,
)
from workers.docker import DockerRuntime, limits_not_in_force
from workers.docker_firewall import bridge_name, firewall_rules
from workers.docker_storage import QUOTA, TMPFS, Storage
from workers.runtime import LABEL_SANDBOX, Handle, SandboxSpec

pytestmark = pytest.mark.docker

IMAGE = "sessionpool/hostile:dev"
HOSTILE_API = "3"  # the image's io.sessionpool.hostile-api label: /report is there
SCOPE = f"c{uuid.uuid4().hex[:8]}"
PREFIX = f"spcont{uuid.uuid4().hex[:6]}"
WRITABLE = ("/tmp", "/var/tmp", "/run", "/mnt/data", "/home/sandbox")
READ_ONLY = ("/", "/etc", "/usr", "/opt")


def labelled(sandbox_id: str) -> list[str]:
    out = sh("docker", "ps", "-aq", "--filter", f"label={LABEL_SANDBOX}={sandbox_id}")
    return out.stdout.split()


# Rebuilt when missing, or built from an older tree (no /report).
engine, runtime = docker_runtime_fixtures(
    SCOPE, PREFIX, lambda: ensure_image("hostile", ("io.sessionpool.hostile-api", HOSTILE_API))
)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def hostile_pool(name: str, resources: dict[str, Any] | None = None, **sandbox: Any) -> Pool:
    container: dict[str, Any] = {"name": "main", "image": IMAGE}
    if resources is not None:
        container["resources"] = resources
    return make_pool(
        name,
        customContainerTemplate={"containers": [container], "ingress": {"targetPort": 8080}},
        **({"sandboxConfiguration": sandbox} if sandbox else {}),
    )


def spec(pool: Pool) -> SandboxSpec:
    return SandboxSpec(scope=SCOPE, pool=pool, sandbox_id=uuid.uuid4().hex)


async def call(http: aiohttp.ClientSession, h: Handle, method: str, path: str) -> Any:
    async with http.request(method, f"http://{h.addr}{path}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def started(runtime: DockerRuntime, http: aiohttp.ClientSession, pool: Pool) -> Handle:
    handle = await runtime.create(spec(pool))

    async def healthy() -> bool:
        try:
            return bool((await call(http, handle, "GET", "/health"))["status"] == "ok")
        except (aiohttp.ClientError, TimeoutError):
            return False

    await wait_until(healthy, timeout=30, interval=0.05)
    return handle


def assert_contained(report: dict[str, Any], limits: Limits) -> None:
    """Everything a sandbox must carry, whatever its pool asked for."""
    assert report["uid"] != 0
    assert set(report["caps"].values()) == {"0000000000000000"}, report["caps"]
    assert report["no_new_privs"] == "1"
    assert report["seccomp"] == "2"  # filter mode: Docker's default profile
    memory = limits.memory_bytes
    assert int(report["memory_max"]) == memory
    assert report["memsw_max"] in (str(memory), "0"), "no swap on top (v1: equal, v2: 0)"
    if report["cpu_max"].startswith(("max", "-1")):
        raise AssertionError(f"no CPU limit: {report['cpu_max']}")
    quota = int(report["cpu_max"].split()[0])
    period = int(report["cpu_period"].split()[-1])
    assert quota / period == pytest.approx(limits.cpu)
    assert report["pids_max"] == str(limits.pids)
    # Writable where images write, and nowhere else; each writable path is size-capped.
    mounts = report["mounts"]
    assert "ro" in mounts["/"]["options"].split(",")
    for path in WRITABLE:
        assert report["writable"][path] == "ok", (path, report["writable"])
        assert mounts[path]["fstype"] == "tmpfs", path
        assert f"size={limits.storage_bytes // 1024}k" in mounts[path]["super"], mounts[path]
    for path in READ_ONLY:
        assert report["writable"][path] == "EROFS", (path, report["writable"])


async def test_a_pool_without_resources_gets_the_operator_defaults(
    runtime: DockerRuntime, http: aiohttp.ClientSession
) -> None:
    handle = await started(runtime, http, hostile_pool("bare"))
    report = await call(http, handle, "GET", "/report")
    assert_contained(report, DEFAULT)
    assert report["home"] == "/home/sandbox"  # from the image's /etc/passwd
    await runtime.destroy(handle.container)


async def test_a_pool_with_resources_gets_its_own_and_a_deployment_its_defaults(
    engine: None, http: aiohttp.ClientSession
) -> None:
    policy = LimitPolicy(
        default=Limits(cpu=0.5, memory_bytes=256 * MiB, pids=48, storage_bytes=16 * MiB),
        maximum=Limits(cpu=1.0, memory_bytes=GiB, pids=512, storage_bytes=GiB),
    )
    runtime = DockerRuntime(network_prefix=PREFIX, limits=policy)
    try:
        bare, own = await asyncio.gather(
            started(runtime, http, hostile_pool("operator")),
            started(
                runtime,
                http,
                hostile_pool(
                    "resourced",
                    {"cpu": 0.25, "memory": "192Mi", "ephemeralStorage": "24Mi"},
                    pidsLimit=40,
                ),
            ),
        )
        assert_contained(await call(http, bare, "GET", "/report"), policy.default)
        assert_contained(
            await call(http, own, "GET", "/report"),
            Limits(cpu=0.25, memory_bytes=192 * MiB, pids=40, storage_bytes=24 * MiB),
        )
        await asyncio.gather(runtime.destroy(bare.container), runtime.destroy(own.container))
    finally:
        await runtime.close()


async def test_writing_stops_with_enospc_at_every_cap(
    runtime: DockerRuntime, http: aiohttp.ClientSession
) -> None:
    cap = 8 * MiB
    pool = hostile_pool("filler", {"memory": "256Mi", "ephemeralStorage": "8Mi"})
    handle = await started(runtime, http, pool)
    for path in WRITABLE:
        got = await call(http, handle, "POST", f"/fill?path={path}/fill&max_mb=64")
        assert got["written"] <= cap, (path, got)
        assert got["written"] >= cap - 2 * MiB, (path, got)  # really written, up to the cap
        assert "No space left" in (got["error"] or ""), (path, got)
    for path in ("/opt", "/var/lib"):
        got = await call(http, handle, "POST", f"/fill?path={path}/fill&max_mb=1")
        assert (got["written"], "Read-only file system" in (got["error"] or "")) == (0, True)
    # tmpfs is memory: what a session keeps on it is charged to its memory limit.
    before = int((await call(http, handle, "GET", "/report"))["memory_usage"])
    got = await call(http, handle, "POST", "/fill?path=/mnt/data/kept&max_mb=64&keep=1")
    after = int((await call(http, handle, "GET", "/report"))["memory_usage"])
    assert after - before >= got["written"] - MiB, (before, after, got)
    got = await call(http, handle, "POST", "/fill?path=/dev/shm/fill&max_mb=128")
    assert got["written"] <= 64 * MiB and got["error"], got  # Docker's default shm size
    assert (await call(http, handle, "GET", "/health"))["status"] == "ok"
    await runtime.destroy(handle.container)


# Fail closed ---------------------------------------------------------------------------------


async def test_no_sandbox_starts_without_its_firewall_rules(
    engine: None, http: aiohttp.ClientSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failing = tmp_path / "iptables"
    failing.write_text("#!/bin/sh\necho 'iptables: permission denied' >&2\nexit 4\n")
    failing.chmod(0o755)
    prefix = f"spfc{uuid.uuid4().hex[:6]}"
    runtime = DockerRuntime(network_prefix=prefix, iptables=str(failing))
    pool = hostile_pool("unguarded")
    try:
        s = spec(pool)
        with pytest.raises(SandboxRuntimeError) as err:
            await runtime.create(s)
        message = str(err.value)
        assert "firewall rules not installed" in message
        assert "insecure_skip_host_firewall" in message
        assert f"-i {bridge_name(prefix, False)}" in message  # the commands to run by hand
        assert labelled(s.sandbox_id) == []
        with pytest.raises(SandboxRuntimeError):  # still refused: nothing was remembered
            await runtime.create(spec(pool))
    finally:
        await runtime.close()

    # The opt-out says what it gives up, is warned about, and then sandboxes start.
    caplog.set_level(logging.WARNING, "sessionpool.docker")
    insecure = DockerRuntime(
        network_prefix=prefix, iptables=str(failing), insecure_skip_host_firewall=True
    )
    try:
        assert "insecure_skip_host_firewall is set" in caplog.text
        handle = await started(insecure, http, pool)
        await insecure.destroy(handle.container)
    finally:
        await insecure.close()
        await remove_networks(prefix)


async def test_rules_deleted_behind_the_workers_back_are_restored(engine: None) -> None:
    prefix = f"spfc{uuid.uuid4().hex[:6]}"
    runtime = DockerRuntime(network_prefix=prefix, firewall_check_s=0.2)
    try:
        await runtime.ensure_network(True)
        rules = firewall_rules(bridge_name(prefix, True), True)
        assert all(iptables_has(r) for r in rules)
        for rule in (rules[0], rules[-1]):  # only this test's own rules, on its own bridge
            sh("iptables", "-w", "5", "-D", *rule)
            assert not iptables_has(rule)
        await wait_until(lambda: all(iptables_has(r) for r in rules), timeout=10, interval=0.1)
    finally:
        await runtime.close()
        await remove_networks(prefix)
    assert not any(iptables_has(r) for r in rules)


async def test_rules_that_cannot_be_put_back_stop_new_sandboxes_until_they_can(
    engine: None, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    wrapper = tmp_path / "iptables"  # the real iptables, failing while `broken` exists
    wrapper.write_text(f'#!/bin/sh\n[ -e {broken} ] && exit 4\nexec iptables "$@"\n')
    wrapper.chmod(0o755)
    prefix = f"spfc{uuid.uuid4().hex[:6]}"
    runtime = DockerRuntime(network_prefix=prefix, firewall_check_s=0.2, iptables=str(wrapper))
    rules = firewall_rules(bridge_name(prefix, False), False)
    try:
        await runtime.ensure_network(False)
        broken.touch()
        sh("iptables", "-w", "5", "-D", *rules[0])

        async def refused() -> bool:
            try:
                await runtime.ensure_network(False)
            except SandboxRuntimeError as exc:
                return "firewall rules not installed" in str(exc)
            return False

        await wait_until(refused, timeout=10, interval=0.1)
        broken.unlink()
        await runtime.ensure_network(False)  # back: the rules are installed again
        assert all(iptables_has(r) for r in rules)
    finally:
        broken.unlink(missing_ok=True)
        await runtime.close()
        await remove_networks(prefix)


def test_a_limit_the_engine_did_not_apply_refuses_the_start() -> None:
    kwargs = {
        "nano_cpus": 500_000_000,
        "mem_limit": 256 * MiB,
        "memswap_limit": 256 * MiB,
        "pids_limit": 64,
        "read_only": True,
        "tmpfs": {"/tmp": "rw,size=1048576"},
    }
    host = {
        "NanoCpus": 500_000_000,
        "Memory": 256 * MiB,
        "MemorySwap": 256 * MiB,
        "PidsLimit": 64,
        "ReadonlyRootfs": True,
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "Tmpfs": {"/tmp": "rw,size=1048576"},
    }
    assert limits_not_in_force({"HostConfig": host}, kwargs) == []
    ignored = {**host, "PidsLimit": None, "Tmpfs": {}, "SecurityOpt": None}
    assert limits_not_in_force({"HostConfig": ignored}, kwargs) == [
        "PidsLimit=64",
        "no-new-privileges",
        "Tmpfs /tmp",
    ]
    assert json.dumps(limits_not_in_force({}, kwargs))  # nothing reported: all missing


class FakeEngine:
    """Just what the storage planner asks of an engine, for the mechanism this one lacks."""

    def __init__(self, backing: str, files: dict[str, list[str]]) -> None:
        self.backing = backing
        self.files = files  # directory → names in it (absent: no such path)
        self.api = self
        self.created: list[dict[str, Any]] = []
        self.removed: list[str] = []

    def info(self) -> dict[str, Any]:
        return {"Driver": "overlay2", "DriverStatus": [["Backing Filesystem", self.backing]]}

    def inspect_image(self, image: str) -> dict[str, Any]:
        config = {"User": "1000", "WorkingDir": "/app", "Volumes": {"/data": {}}, "Env": []}
        return {"Id": f"sha256:{image}", "Config": config}

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    def create_container(self, image: str, **kwargs: Any) -> dict[str, str]:
        self.created.append(kwargs)
        return {"Id": f"probe{len(self.created)}"}

    def remove_container(self, container: str, force: bool) -> None:
        self.removed.append(container)

    def get_archive(self, container: str, path: str) -> tuple[list[bytes], dict[str, Any]]:
        if path not in self.files:
            raise NotFound(path)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            if path == "/etc/passwd":
                data = b"root:x:0:0::/root:/bin/sh\nsandbox:x:1000:1000::/home/me:/bin/sh\n"
                info = tarfile.TarInfo("passwd")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                return [buf.getvalue()], {"mode": 0o644, "linkTarget": ""}
            tar.addfile(tarfile.TarInfo(path.rsplit("/", 1)[-1]), None)
            for name in self.files[path]:
                tar.addfile(tarfile.TarInfo(f"{path.rsplit('/', 1)[-1]}/{name}"))
        return [buf.getvalue()], {"mode": 1 << 31, "linkTarget": ""}  # os.ModeDir


def test_storage_plan_quota_where_the_engine_takes_one_else_tmpfs() -> None:
    files = {"/etc/passwd": [], "/app": ["server.py"], "/data": []}
    xfs = FakeEngine("xfs", files)
    storage = Storage()
    plan = storage.plan(xfs, "img", 8 * MiB)
    assert storage.mechanism == QUOTA
    assert plan["storage_opt"] == {"size": str(8 * MiB)}
    assert "read_only" not in plan
    # The declared VOLUME would be an anonymous volume on the host's disk: a capped tmpfs.
    assert plan["tmpfs"] == {"/data": f"rw,nosuid,nodev,exec,size={8 * MiB},uid=1000,gid=1000"}
    assert xfs.removed == ["probe1"]  # the probe container never outlives the probe

    ext4 = FakeEngine("extfs", files)
    storage = Storage()
    plan = storage.plan(ext4, "img", 8 * MiB, home="/home/pool")
    assert storage.mechanism == TMPFS
    assert plan["read_only"] is True and "storage_opt" not in plan
    # /app holds the application: left read-only rather than hidden by an empty tmpfs.
    assert set(plan["tmpfs"]) == {"/data", "/tmp", "/var/tmp", "/run", "/mnt/data", "/home/pool"}
    assert plan["tmpfs"]["/tmp"] == f"rw,nosuid,nodev,size={8 * MiB},uid=1000,gid=1000"
    # No HOME of the pool's own: the image user's, from its /etc/passwd.
    assert "/home/me" in storage.plan(ext4, "img", 8 * MiB)["tmpfs"]
    emptied = FakeEngine("extfs", {**files, "/app": []})
    assert "/app" in Storage().plan(emptied, "img", 8 * MiB)["tmpfs"]  # empty WORKDIR: writable
