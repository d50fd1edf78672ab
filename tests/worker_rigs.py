"""The runtimes the worker scenarios (tests/test_workers.py) run on, one `Rig` each.

A rig starts workers of its runtime, makes pools whose sandboxes answer with their `hostname`
(the echo image in containers and pods, tests/session_app.py as a process), and sees sandboxes
as an operator would: from the engine, never from the workers' own records.

- `process`: workers in this test's event loop, each with its own `ProcessRuntime`.
- `docker`: worker processes on the local engine.
- `kubernetes`: worker processes against the fake API server (tests/kube_fake.py, real
  containers behind its pods) and, under the `k8s_cluster` marker, the cluster `KUBECONFIG`
  names:

      KUBECONFIG=~/.kube/config SESSIONPOOL_TEST_K8S_NAMESPACE=sessionpool-sandboxes \\
          .venv/bin/python -m pytest tests/test_workers*.py -m k8s_cluster

  The cluster needs `sessionpool/echo:dev` on its nodes (`kind load docker-image …`, or
  `k3s ctr images import`), the namespace created, and this process able to reach pod IPs and
  allowed in by the pools' NetworkPolicies: run it in a pod of the control namespace labelled
  `app.kubernetes.io/part-of=sessionpool` (deploy/k8s/README.md). Without KUBECONFIG those runs
  are reported as skipped: "NOT RUN".

A scenario names the runtimes it runs on with `@on(...)`; the `rig` fixture (conftest.py)
builds the rig of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig

from router.limits import LimitPolicy
from router.pools import Pool
from router.settings import Settings
from router.store import Store
from sessionpool.testing import (
    ECHO_IMAGE,
    FAST_WORKER,
    HEALTH_PROBE,
    Workers,
    counts_are,
    make_pool,
    wait_until,
)
from tests.kube_fake import FakeKube, forbidden
from tests.test_kubernetes_deploy import worker_role_rules
from workers import podspec
from workers.main import run
from workers.process import ProcessRuntime
from workers.runtime import LABEL_POOL, LABEL_SANDBOX, LABEL_SCOPE, SandboxSpec

Json = dict[str, Any]
APP = str(Path(__file__).with_name("session_app.py"))
# Every pool's sandboxes get a secret in their environment (kubernetes keeps it in a Secret).
SECRETS = [{"name": "tok", "value": "s3cret"}]

PARAMS = {
    "process": [pytest.param("process", id="process")],
    "docker": [pytest.param("docker", id="docker", marks=pytest.mark.docker)],
    "kubernetes": [
        pytest.param("kubernetes", id="kubernetes", marks=pytest.mark.docker),
        pytest.param("kubernetes-cluster", id="kubernetes-cluster", marks=pytest.mark.k8s_cluster),
    ],
}


def on(*runtimes: str) -> pytest.MarkDecorator:
    """Run the scenario once on each of `runtimes` (a `rig` of each)."""
    return pytest.mark.parametrize("rig", [p for r in runtimes for p in PARAMS[r]], indirect=True)


class Rig:
    """One runtime's workers and its view of the sandboxes of one test's scope."""

    runtime = ""
    # Workers sharing the pools. Two keep one target together; a process sandbox lives inside
    # its worker, which alone can list it, so the process runtime runs one.
    replicas = 2

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.replace(**FAST_WORKER, runtime=self.runtime)
        self.scope = settings.key_prefix

    def pool(
        self,
        name: str = "main",
        *,
        probes: list[Json] | None = None,
        env: tuple[Json, ...] = (),
        **body: Any,
    ) -> Pool:
        """A pool of the echo app; `body` is the rest of `make_pool`'s (ready, cooldown_s, …)."""
        image, container = self.app()
        container["env"] = [*container.get("env", []), {"name": "TOKEN", "secretRef": "tok"}, *env]
        container["resources"] = {"cpu": 0.5, "memory": "256Mi"}
        container["probes"] = [HEALTH_PROBE] if probes is None else probes
        return make_pool(name, image=image, container=container, secrets=SECRETS, **body)

    async def warm(self, store: Store, *pools: Pool) -> None:
        """Start a worker, define `pools` and wait until each has its ready sandboxes."""
        await self.start_worker()
        await put_warm(store, *pools)

    def app(self) -> tuple[str, Json]:
        """The image and the container fields that run the echo app."""
        return ECHO_IMAGE, {}

    async def start_worker(self, **changes: Any) -> Any:
        """One more worker, with `changes` to the rig's settings."""
        raise NotImplementedError

    async def live(self, pool: str | None = None) -> dict[str, str]:
        """Running sandboxes (of `pool`, or all): sandbox id -> the hostname they answer."""
        raise NotImplementedError

    async def hosts(self) -> set[str]:
        """The hostnames of every sandbox the engine still has, running or not."""
        raise NotImplementedError

    async def kill(self, host: str) -> None:
        """End a sandbox from outside sessionpool (kill -9, docker kill, kubectl delete)."""
        raise NotImplementedError

    async def leftovers(self, pool: str) -> list[str]:
        """Whatever the engine still holds for `pool`."""
        raise NotImplementedError

    async def stray(self, pool: Pool) -> str:
        """A labelled sandbox no record names (as a dead worker may leave); its hostname."""
        raise NotImplementedError

    def container_name(self, sandbox_id: str) -> str:
        """What a sandbox's container would be called on this engine."""
        return f"{self.scope}-{sandbox_id}"

    async def close(self) -> None:
        raise NotImplementedError


def process_container() -> Json:
    """The container fields of the echo app as a process: on loopback, its port in PORT."""
    loopback = {"name": "HOST", "value": "127.0.0.1"}
    return {"command": [sys.executable], "args": [APP], "env": [loopback]}


def process_settings(redis_url: str, key_prefix: str) -> Settings:
    """A router and a worker of the process runtime on `redis_url` (Sentinel, Cluster, ...),
    for tests that run them themselves: no auth, quick reconciliation."""
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        auth="none",
        runtime="process",
        allocation_wait_s=10,
        reconcile_interval_s=1,
    )


def process_pool(name: str = "proc", **body: Any) -> Pool:
    """A pool of the echo app as a process, for tests that run the process runtime themselves;
    `body` is the rest of `make_pool`'s (ready, max_sessions, cooldown_s, …)."""
    return make_pool(name, image="local", container=process_container(), **body)


class ProcessRig(Rig):
    runtime = "process"
    replicas = 1

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.runtimes: list[ProcessRuntime] = []
        self.running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def app(self) -> tuple[str, Json]:
        return "local", process_container()

    async def start_worker(self, **changes: Any) -> ProcessRuntime:
        runtime = ProcessRuntime(use_bwrap=False)
        stop = asyncio.Event()
        s = self.settings.replace(worker_id=f"w{len(self.running)}", **changes)
        self.running.append((stop, asyncio.create_task(run(s, runtime, stop))))
        self.runtimes.append(runtime)
        return runtime

    async def _seen(self) -> list[tuple[str, str, bool, str]]:
        """(sandbox id, pool, running, hostname) of every process the workers hold."""
        return [
            (o.sandbox_id, o.pool, o.running, "pid-" + o.container.split("-")[1])
            for runtime in self.runtimes
            for o in await runtime.list(self.scope)
        ]

    async def live(self, pool: str | None = None) -> dict[str, str]:
        return {s: h for s, p, up, h in await self._seen() if up and pool in (None, p)}

    async def hosts(self) -> set[str]:
        return {h for *_, h in await self._seen()}

    async def kill(self, host: str) -> None:
        os.kill(int(host.removeprefix("pid-")), signal.SIGKILL)

    async def leftovers(self, pool: str) -> list[str]:
        return [h for _, p, _, h in await self._seen() if p == pool]

    async def close(self) -> None:
        for stop, _ in self.running:
            stop.set()
        for _, task in self.running:
            await asyncio.wait_for(task, 20)


class DockerRig(Rig):
    runtime = "docker"

    def __init__(self, settings: Settings, directory: Path, engine: Any) -> None:
        super().__init__(settings)
        self.engine = engine
        self.workers = Workers(self.settings, self.runtime, directory)

    async def start_worker(self, **changes: Any) -> asyncio.subprocess.Process:
        return await self.workers.start(**changes)

    def _containers(self) -> list[Json]:
        """As one list call saw them (no follow-up inspect that could race a removal)."""
        found = self.engine.api.containers(
            all=True, filters={"label": f"{LABEL_SCOPE}={self.scope}"}
        )
        return list(found)

    async def live(self, pool: str | None = None) -> dict[str, str]:
        return {
            c["Labels"][LABEL_SANDBOX]: c["Id"][:12]
            for c in self._containers()
            if c.get("State") == "running" and pool in (None, c["Labels"].get(LABEL_POOL))
        }

    async def hosts(self) -> set[str]:
        return {c["Id"][:12] for c in self._containers()}

    async def kill(self, host: str) -> None:
        self.engine.api.kill(host)

    async def leftovers(self, pool: str) -> list[str]:
        return [c["Id"][:12] for c in self._containers() if c["Labels"].get(LABEL_POOL) == pool]

    async def stray(self, pool: Pool) -> str:
        labels = SandboxSpec(self.scope, pool, "handmade").labels
        return str(self.engine.containers.run(ECHO_IMAGE, detach=True, labels=labels).id[:12])

    async def close(self) -> None:
        codes = await self.workers.stop()
        for c in self._containers():  # whatever a failed test left
            self.engine.api.remove_container(c["Id"], force=True)
        print(self.workers.tails())  # shown by pytest only when the test failed
        assert codes == [0] * len(codes), "a worker did not exit cleanly on SIGTERM"


class Cluster:
    """What a scenario needs of a cluster, through the API only (fake or real alike)."""

    def __init__(self, kubeconfig: Path, namespace: str, admin: Path) -> None:
        self.kubeconfig = kubeconfig  # the workers'
        self.admin = admin  # the test's own
        self.namespace = namespace
        self.api: Any = None
        self.core: Any = None
        self.net: Any = None

    async def open(self) -> Cluster:
        cfg = kclient.Configuration()
        await kconfig.load_kube_config(
            config_file=str(self.admin), client_configuration=cfg, persist_config=False
        )
        self.api = kclient.ApiClient(cfg)
        self.core = kclient.CoreV1Api(self.api)
        self.net = kclient.NetworkingV1Api(self.api)
        return self

    async def _json(self, call: Awaitable[Any]) -> Json:
        resp = await asyncio.wait_for(call, 10)
        async with resp:
            assert resp.status < 300, await resp.text()
            doc: Json = orjson.loads(await resp.read())
            return doc

    async def pods(self, selector: str) -> list[Json]:
        found = await self._json(
            self.core.list_namespaced_pod(
                self.namespace, label_selector=selector, _preload_content=False
            )
        )
        return list(found["items"])

    async def pool_objects(self, selector: str) -> list[str]:
        """The names of the pods, Secrets and NetworkPolicies `selector` picks."""
        out = []
        for call in (
            self.core.list_namespaced_pod,
            self.core.list_namespaced_secret,
            self.net.list_namespaced_network_policy,
        ):
            found = await self._json(
                call(self.namespace, label_selector=selector, _preload_content=False)
            )
            out += [i["metadata"]["name"] for i in found["items"]]
        return out

    async def delete_pod(self, name: str) -> None:
        await self._json(
            self.core.delete_namespaced_pod(name, self.namespace, _preload_content=False)
        )

    async def create_pod(self, body: Json) -> None:
        await self._json(
            self.core.create_namespaced_pod(self.namespace, body, _preload_content=False)
        )

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()


class KubeRig(Rig):
    runtime = "kubernetes"

    def __init__(
        self, settings: Settings, directory: Path, cluster: Cluster, fake: FakeKube | None
    ) -> None:
        super().__init__(settings)
        self.cluster = cluster
        self.fake = fake
        self.settings = self.settings.replace(
            k8s_kubeconfig=str(cluster.kubeconfig),
            k8s_namespace=cluster.namespace,
            k8s_schedule_timeout_s=1,
        )
        self.workers = Workers(self.settings, self.runtime, directory)

    async def start_worker(self, **changes: Any) -> asyncio.subprocess.Process:
        return await self.workers.start(**changes)

    async def _pods(self) -> list[Json]:
        return await self.cluster.pods(f"{LABEL_SCOPE}={self.scope}")

    async def live(self, pool: str | None = None) -> dict[str, str]:
        """Running pods not being deleted."""
        return {
            p["metadata"]["labels"][LABEL_SANDBOX]: p["metadata"]["name"]
            for p in await self._pods()
            if p["status"].get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
            and pool in (None, p["metadata"]["labels"].get(LABEL_POOL))
        }

    async def hosts(self) -> set[str]:
        return {p["metadata"]["name"] for p in await self._pods()}

    async def kill(self, host: str) -> None:
        await self.cluster.delete_pod(host)  # kubectl delete pod, from outside

    async def leftovers(self, pool: str) -> list[str]:
        return await self.cluster.pool_objects(f"{LABEL_SCOPE}={self.scope},{LABEL_POOL}={pool}")

    async def stray(self, pool: Pool) -> str:
        limits = LimitPolicy().resolve(pool)
        spec = SandboxSpec(self.scope, pool, uuid.uuid4().hex)
        body = podspec.pod(spec, self.cluster.namespace, limits)
        await self.cluster.create_pod(body)
        return str(body["metadata"]["name"])

    def container_name(self, sandbox_id: str) -> str:
        return podspec.pod_name(self.scope, sandbox_id)

    async def close(self) -> None:
        try:
            codes = await self.workers.stop()
            for pod in await self._pods():  # whatever a failed test left
                await self.cluster.delete_pod(pod["metadata"]["name"])
            print(self.workers.tails())  # shown by pytest only when the test failed
            assert codes == [0] * len(codes), "a worker did not exit cleanly on SIGTERM"
        finally:
            await self.cluster.close()
            if self.fake is not None:
                await self.fake.close()
        if self.fake is not None:
            fake = self.fake
            assert fake.rejected == [], "the runtime sent objects the API would refuse"
            assert fake.unserved == [], "the runtime called endpoints the fake does not serve"
            assert forbidden(fake.requests, worker_role_rules()) == [], "beyond the workers' Role"


@contextlib.asynccontextmanager
async def open_rig(
    kind: str, settings: Settings, directory: Path, fixture: Callable[[str], Any]
) -> AsyncIterator[Rig]:
    """The rig of `kind` (a `PARAMS` id); `fixture` gets the Docker engine when it needs one."""
    rig: Rig
    if kind == "process":
        rig = ProcessRig(settings)
    elif kind == "docker":
        rig = DockerRig(settings, directory, fixture("echo_engine"))
    elif kind == "kubernetes":
        fake = await FakeKube(fixture("echo_engine")).start()
        config = fake.write_kubeconfig(directory / "kubeconfig")
        admin = fake.write_kubeconfig(directory / "admin", admin=True)
        cluster = await Cluster(config, "sandboxes", admin).open()
        rig = KubeRig(settings, directory, cluster, fake)
    else:
        kubeconfig = os.environ.get("KUBECONFIG", "")
        if not kubeconfig:
            pytest.skip("k8s_cluster: NOT RUN, KUBECONFIG does not name a cluster")
        path = Path(kubeconfig.split(os.pathsep)[0]).expanduser()
        namespace = os.environ.get("SESSIONPOOL_TEST_K8S_NAMESPACE", "sessionpool-sandboxes")
        rig = KubeRig(settings, directory, await Cluster(path, namespace, path).open(), None)
    try:
        yield rig
    finally:
        await rig.close()


async def put_warm(store: Store, *pools: Pool) -> None:
    """Define `pools`, then wait until each has its readySessionInstances ready."""
    for pool in pools:
        await store.put_pool(pool)
    for p in pools:
        warm = functools.partial(counts_are, store, p.name, ready=p.ready_instances, warming=0)
        await wait_until(warm, timeout=60)


async def hostname(http: aiohttp.ClientSession, url: str) -> str:
    """The hostname of the sandbox that answered `url` (200 expected)."""
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["hostname"])


async def consistent(rig: Rig, store: Store, pool: str) -> bool:
    """Every record of `pool` has a running sandbox and every running sandbox a record."""
    recs = await store.sandboxes(pool)
    live = await rig.live(pool)
    return set(recs) == set(live) and all(r.state in ("ready", "allocated") for r in recs.values())
