"""Workers on the kubernetes runtime: the docker runtime's scenarios, over real traffic.

Each scenario runs against the fake API server (tests/kube_fake.py, real containers behind its
pods) and, under the `k8s_cluster` marker, against the cluster `KUBECONFIG` names:

    KUBECONFIG=~/.kube/config SESSIONPOOL_TEST_K8S_NAMESPACE=sessionpool-sandboxes \
        .venv/bin/python -m pytest tests/test_workers_kubernetes.py -m k8s_cluster

The cluster needs `sessionpool/echo:dev` on its nodes (`kind load docker-image …`, or
`k3s ctr images import`), the namespace created, and this process able to reach pod IPs and
allowed in by the pools' NetworkPolicies: run it in a pod of the control namespace labelled
`app.kubernetes.io/part-of=sessionpool` (deploy/k8s/README.md). Without KUBECONFIG those runs are
reported as skipped: "NOT RUN".
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig

from router.limits import LimitPolicy
from router.pools import Pool, parse_pool
from router.sandboxes import MarkReady
from router.settings import Settings
from router.store import Store
from sessionpool.testing import FAST_WORKER, Workers, counts_are, serving_router
from tests.helpers import engine_fixture, wait_until
from tests.kube_fake import FakeKube, forbidden
from tests.test_kubernetes_deploy import worker_role_rules
from workers import podspec
from workers.runtime import LABEL_POOL, LABEL_SANDBOX, LABEL_SCOPE, SandboxSpec

pytestmark = [pytest.mark.timeout(180)]
IMAGE = "sessionpool/echo:dev"
Json = dict[str, Any]


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

    async def pods(self, scope: str) -> list[Json]:
        found = await self._json(
            self.core.list_namespaced_pod(
                self.namespace, label_selector=f"{LABEL_SCOPE}={scope}", _preload_content=False
            )
        )
        return list(found["items"])

    async def live_pods(self, scope: str) -> dict[str, Json]:
        """Running, not being deleted: sandbox id → pod."""
        return {
            p["metadata"]["labels"][LABEL_SANDBOX]: p
            for p in await self.pods(scope)
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        }

    async def pool_objects(self, scope: str, pool: str) -> list[str]:
        selector = f"{LABEL_SCOPE}={scope},{LABEL_POOL}={pool}"
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

    async def stray_pod(self, scope: str, pool: Pool) -> str:
        """A labelled pod no record names (as a dead worker may leave)."""
        sid = uuid.uuid4().hex
        limits = LimitPolicy().resolve(pool)
        body = podspec.pod(SandboxSpec(scope, pool, sid), self.namespace, limits)
        await self._json(
            self.core.create_namespaced_pod(self.namespace, body, _preload_content=False)
        )
        return str(body["metadata"]["name"])

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()


engine = engine_fixture(IMAGE)


@pytest.fixture(
    params=[
        pytest.param("fake", marks=pytest.mark.docker),
        pytest.param("cluster", marks=pytest.mark.k8s_cluster),
    ]
)
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Cluster, FakeKube | None]]:
    fake = None
    if request.param == "cluster":
        kubeconfig = os.environ.get("KUBECONFIG", "")
        if not kubeconfig:
            pytest.skip("k8s_cluster: NOT RUN, KUBECONFIG does not name a cluster")
        path = Path(kubeconfig.split(os.pathsep)[0]).expanduser()
        namespace = os.environ.get("SESSIONPOOL_TEST_K8S_NAMESPACE", "sessionpool-sandboxes")
    else:
        fake = await FakeKube(request.getfixturevalue("engine")).start()
        namespace = "sandboxes"
        path = fake.write_kubeconfig(tmp_path / "kubeconfig")
    admin = fake.write_kubeconfig(tmp_path / "admin", admin=True) if fake else path
    c = await Cluster(path, namespace, admin).open()
    yield c, fake
    await c.close()
    if fake is not None:
        await fake.close()
        assert fake.rejected == [], "the runtime sent objects the API would refuse"
        assert fake.unserved == [], "the runtime called endpoints the fake does not serve"
        assert forbidden(fake.requests, worker_role_rules()) == [], "beyond the workers' Role"


@pytest.fixture
def kube(cluster: tuple[Cluster, FakeKube | None]) -> Cluster:
    return cluster[0]


@pytest.fixture
async def workers(kube: Cluster, settings: Settings, tmp_path: Path) -> AsyncIterator[Workers]:
    fast = settings.replace(
        **FAST_WORKER,
        k8s_kubeconfig=str(kube.kubeconfig),
        k8s_namespace=kube.namespace,
        k8s_schedule_timeout_s=1,
    )
    group = Workers(fast, "kubernetes", tmp_path)
    yield group
    codes = await group.stop()
    for pod in await kube.pods(settings.key_prefix):  # whatever a failed test left
        await kube.delete_pod(pod["metadata"]["name"])
    print(group.tails())  # shown by pytest only when the test failed
    assert codes == [0] * len(codes), "a worker did not exit cleanly on SIGTERM"


@pytest.fixture
async def router_url(settings: Settings) -> AsyncIterator[str]:
    async with serving_router(settings.replace(allocation_wait_s=20.0)) as url:
        yield url


def echo_pool(
    name: str = "kube", *, ready: int = 2, cooldown_s: int = 300, lifecycle: str = "Timed"
) -> Pool:
    life: dict[str, Any] = {"lifecycleType": lifecycle}
    if lifecycle == "Timed":
        life["cooldownPeriodInSeconds"] = cooldown_s
    return parse_pool(
        name,
        {
            "properties": {
                "scaleConfiguration": {"maxConcurrentSessions": 10, "readySessionInstances": ready},
                "dynamicPoolConfiguration": {"lifecycleConfiguration": life},
                "secrets": [{"name": "tok", "value": "s3cret"}],
                "customContainerTemplate": {
                    "containers": [
                        {
                            "name": "main",
                            "image": IMAGE,
                            "resources": {"cpu": 0.25, "memory": "128Mi"},
                            "env": [{"name": "TOKEN", "secretRef": "tok"}],
                            "probes": [
                                {"type": "Startup", "httpGet": {"path": "/health", "port": 8080}}
                            ],
                        }
                    ],
                    "ingress": {"targetPort": 8080},
                },
            }
        },
    )


async def consistent(kube: Cluster, store: Store, pool: str) -> bool:
    """Every record has a running pod and every running pod a record."""
    recs = await store.sandboxes(pool)
    live = await kube.live_pods(store.keys.prefix)
    return set(recs) == set(live) and all(r.state in ("ready", "allocated") for r in recs.values())


async def hostname(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["hostname"])


async def pod_names(kube: Cluster, scope: str) -> set[str]:
    return {p["metadata"]["name"] for p in await kube.pods(scope)}


async def test_warm_claim_idle_and_stop(
    kube: Cluster, store: Store, workers: Any, router_url: str
) -> None:
    await workers()
    await store.put_pool(echo_pool(ready=2, cooldown_s=2))
    await wait_until(lambda: counts_are(store, "kube", ready=2, warming=0), timeout=60)
    scope = store.keys.prefix
    await wait_until(lambda: consistent(kube, store, "kube"), timeout=10)
    ep = f"{router_url}/pools/kube"
    async with aiohttp.ClientSession() as http:
        # Claimed through the router: the answer comes from a pod (hostname = pod name).
        first = await hostname(http, f"{ep}/x?identifier=stopper")
        assert first in await pod_names(kube, scope)
        assert await hostname(http, f"{ep}/y?identifier=stopper") == first
        async with http.post(f"{ep}/.management/stopSession?identifier=stopper") as r:
            assert r.status == 200
        await wait_until(lambda: _gone_pod(kube, scope, first), timeout=10)
        # Idle: the session ends after its 2 s cooldown and its pod goes.
        idle = await hostname(http, f"{ep}/?identifier=idler")
        await wait_until(lambda: _no_session(store, "idler"), timeout=10)
        await wait_until(lambda: _gone_pod(kube, scope, idle), timeout=10)
    await wait_until(lambda: counts_are(store, "kube", ready=2, allocated=0), timeout=30)
    await wait_until(lambda: consistent(kube, store, "kube"), timeout=10)


async def test_exit_and_outside_delete_end_sessions(
    kube: Cluster, store: Store, workers: Any, router_url: str
) -> None:
    await workers()
    await store.put_pool(echo_pool(ready=1))
    await store.put_pool(echo_pool("exits", ready=1, lifecycle="OnContainerExit"))
    for name in ("kube", "exits"):
        await wait_until(lambda n=name: counts_are(store, n, ready=1), timeout=60)
    scope = store.keys.prefix
    async with aiohttp.ClientSession() as http:
        pod = await hostname(http, f"{router_url}/pools/exits/?identifier=exiter")
        async with http.get(f"{router_url}/pools/exits/exit?code=0&identifier=exiter") as r:
            assert r.status == 200
        await wait_until(lambda: _no_session(store, "exiter", "exits"), timeout=10)
        await wait_until(lambda: _gone_pod(kube, scope, pod), timeout=10)

        victim = await hostname(http, f"{router_url}/pools/kube/?identifier=victim")
        await kube.delete_pod(victim)  # kubectl delete pod, from outside
        await wait_until(lambda: _no_session(store, "victim"), timeout=10)
        assert await hostname(http, f"{router_url}/pools/kube/?identifier=victim") != victim
    log = await store.redis.xrange(store.pk("kube").log)
    assert any(b'"exited"' in e[1][b"data"] for e in log)


async def test_killed_worker_and_reconciliation_both_ways(
    kube: Cluster, store: Store, workers: Any
) -> None:
    pool = echo_pool(ready=4)
    await store.put_pool(pool)
    scope = store.keys.prefix
    # A record with no pod: a ready sandbox whose pod vanished.
    lost = uuid.uuid4().hex
    assert await store.reserve(pool, "test", [lost]) == [lost]
    assert (
        await store.mark_ready("kube", lost, podspec.pod_name(scope, lost), "10.0.0.1:1")
        is MarkReady.READY
    )
    w = await workers()
    await wait_until(lambda: _warming_with_pod(store), timeout=60, interval=0.01)
    w.send_signal(signal.SIGKILL)  # in the middle of creating pods
    await w.wait()
    # Pods with no record: one made by hand (as a dead worker's), and whatever the kill left.
    stray = await kube.stray_pod(scope, pool)
    await workers()
    await wait_until(lambda: counts_are(store, "kube", ready=4, warming=0), timeout=60)
    await wait_until(lambda: consistent(kube, store, "kube"), timeout=30)
    assert stray not in await pod_names(kube, scope)
    assert len(await kube.live_pods(scope)) == 4
    assert lost not in await store.sandboxes("kube")


async def test_pool_delete_leaves_nothing_and_two_workers_keep_the_target(
    kube: Cluster, store: Store, workers: Any
) -> None:
    await workers()
    await workers()
    await store.put_pool(echo_pool(ready=3))
    await wait_until(lambda: counts_are(store, "kube", ready=3, warming=0), timeout=60)
    await wait_until(lambda: consistent(kube, store, "kube"), timeout=10)
    scope = store.keys.prefix
    deadline = time.monotonic() + 3  # several reconcile and refill rounds later: still 3
    while time.monotonic() < deadline:
        assert len(await kube.pods(scope)) <= 3
        await asyncio.sleep(0.2)
    objects = await kube.pool_objects(scope, "kube")
    assert sum(1 for o in objects if "-env" in o) == 1  # the pool's Secret
    assert await store.delete_pool("kube")
    await wait_until(lambda: _nothing_left(kube, scope), timeout=30)


async def _nothing_left(kube: Cluster, scope: str) -> bool:
    return await kube.pool_objects(scope, "kube") == []


async def _gone_pod(kube: Cluster, scope: str, name: str) -> bool:
    return name not in await pod_names(kube, scope)


async def _no_session(store: Store, ident: str, pool: str = "kube") -> bool:
    return await store.get_session(pool, ident) is None


async def _warming_with_pod(store: Store) -> bool:
    recs = await store.sandboxes("kube")
    return any(r.state == "warming" and r.container for r in recs.values())


async def test_unschedulable_pool_fails_creates_with_the_reason_and_leaves_nothing(
    kube: Cluster, store: Store, workers: Any
) -> None:
    await workers()
    pool = echo_pool("nowhere", ready=2)
    body = orjson.loads(pool.dumps())["properties"]
    body["sandboxConfiguration"] = {"nodeSelector": {"sessionpool.io/no-such-node": "true"}}
    await store.put_pool(parse_pool("nowhere", {"properties": body}))

    def logged() -> bool:
        text = "".join(log.read_text() for log in workers.logs)
        return "not scheduled" in text and "node affinity/selector" in text

    await wait_until(logged, timeout=30)
    counts = await store.counts("nowhere")
    assert counts["ready"] == 0
    scope = store.keys.prefix
    # Every failed create removed its pod: only the ones being tried right now may exist.
    await wait_until(lambda: _at_most(kube, scope, 2), timeout=10)


async def _at_most(kube: Cluster, scope: str, n: int) -> bool:
    return len(await kube.pods(scope)) <= n
