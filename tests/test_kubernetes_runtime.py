"""The kubernetes runtime against the fake API server (real containers behind its pods)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.limits import LimitPolicy
from router.pools import Pool, parse_pool
from router.settings import Settings
from tests.helpers import engine_fixture, open_engine, wait_until
from tests.kube_fake import FakeKube, forbidden
from tests.test_kubernetes_deploy import worker_role_rules
from workers import podspec
from workers.kubernetes import KubernetesRuntime
from workers.runtime import LABEL_SANDBOX, LABEL_SCOPE, Exit, SandboxSpec

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]
IMAGE = "sessionpool/echo:dev"
CODE_IMAGE = "sessionpool/code-interpreter:dev"
NS = "sandboxes"


engine = engine_fixture(IMAGE)


@pytest.fixture
async def kube(engine: Any) -> AsyncIterator[FakeKube]:
    fake = await FakeKube(engine, node_labels={"pool": "fast"}).start()
    yield fake
    await fake.close()
    assert fake.rejected == [], "the runtime sent objects the API would refuse"
    assert fake.unserved == [], "the runtime called endpoints the fake does not serve"
    # Everything it called, the workers' Role in deploy/k8s allows (least privilege, enough).
    assert forbidden(fake.requests, worker_role_rules()) == []


@pytest.fixture
async def runtime(kube: FakeKube, tmp_path: Path) -> AsyncIterator[KubernetesRuntime]:
    settings = Settings(
        runtime="kubernetes",
        k8s_namespace=NS,
        k8s_kubeconfig=str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
        k8s_schedule_timeout_s=1.0,
        k8s_start_timeout_s=20.0,
    )
    rt = KubernetesRuntime(settings)
    yield rt
    await rt.close()


def pool(name: str = "kpool", **extra: Any) -> Pool:
    container: dict[str, Any] = {
        "name": "main",
        "image": IMAGE,
        "resources": {"cpu": 0.5, "memory": "256Mi"},
        "env": [{"name": "PLAIN", "value": "p"}, {"name": "TOKEN", "secretRef": "tok"}],
    }
    container.update(extra.pop("container", {}))
    return parse_pool(
        name,
        {
            "properties": {
                "secrets": [{"name": "tok", "value": "s3cret"}],
                "customContainerTemplate": {
                    "containers": [container],
                    "ingress": {"targetPort": 8080},
                },
                **extra,
            }
        },
    )


async def answers(addr: str) -> str:
    """The sandbox's hostname once its server answers ("" before)."""
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://{addr}/health") as r:
            return str((await r.json())["hostname"]) if r.status == 200 else ""
    except aiohttp.ClientConnectionError:
        return ""


def spec_of(p: Pool, scope: str = "kt") -> SandboxSpec:
    env = {e.name: p.secrets[e.secret_ref] for e in p.env if e.secret_ref}
    return SandboxSpec(scope=scope, pool=p, sandbox_id=uuid.uuid4().hex, env=env)


async def test_create_runs_a_hardened_pod_reachable_at_its_ip(
    runtime: KubernetesRuntime, kube: FakeKube, engine: Any
) -> None:
    spec = spec_of(pool())
    handle = await runtime.create(spec)
    (pod,) = kube.objects("pods")
    assert handle.container == pod["metadata"]["name"]
    assert handle.addr == f"{pod['status']['podIP']}:8080"
    labels = pod["metadata"]["labels"]
    assert labels[LABEL_SCOPE] == "kt" and labels[LABEL_SANDBOX] == spec.sandbox_id
    s = pod["spec"]
    assert s["automountServiceAccountToken"] is False and s["enableServiceLinks"] is False
    c = s["containers"][0]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"]["limits"] == {
        "cpu": "500m",
        "memory": str(256 << 20),
        "ephemeral-storage": str(128 << 20),  # default storage, at most half the memory
    }
    # The secret value is in the pool's Secret, never in the pod.
    assert b"s3cret" not in str(pod).encode()
    (secret,) = kube.objects("secrets")
    assert base64.b64decode(secret["data"]["TOKEN"]) == b"s3cret"
    assert {
        "name": "TOKEN",
        "valueFrom": {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "TOKEN"}},
    } in c["env"]
    # Real traffic to the real container, which got the env and the limits.
    assert await wait_until(lambda: answers(handle.addr), timeout=10) == handle.container
    info = engine.api.inspect_container(kube.containers[f"{NS}/{handle.container}"])
    assert info["HostConfig"]["Memory"] == 256 << 20
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert "TOKEN=s3cret" in info["Config"]["Env"]
    # Policies: the scope's deny-all and the pool's.
    names = {p["metadata"]["name"] for p in kube.objects("networkpolicies")}
    assert names == {podspec.deny_name("kt"), podspec.base_name("kt", "kpool")}

    observed = await runtime.list("kt")
    assert [(o.container, o.running) for o in observed] == [(handle.container, True)]
    await runtime.destroy(handle.container)
    await wait_until(lambda: not kube.objects("pods"), timeout=10)
    # The pool's last pod is gone: so are its Secret and policy (the scope's deny stays).
    assert kube.objects("secrets") == []
    assert [p["metadata"]["name"] for p in kube.objects("networkpolicies")] == [
        podspec.deny_name("kt")
    ]
    await runtime.destroy(handle.container)  # already gone: not an error


async def test_create_fails_with_the_reason(runtime: KubernetesRuntime, kube: FakeKube) -> None:
    with pytest.raises(match="ErrImagePull"):
        await runtime.create(spec_of(pool(container={"image": "sessionpool/absent:dev"})))
    with pytest.raises(match=r"not scheduled.*didn't match"):
        await runtime.create(spec_of(pool(sandboxConfiguration={"nodeSelector": {"pool": "slow"}})))
    with pytest.raises(match='RuntimeClass "gvisor" not found'):
        await runtime.create(spec_of(pool(sandboxConfiguration={"runtime": "runsc"})))
    with pytest.raises(match=r"ended before it was ready.*StartError"):
        await runtime.create(spec_of(pool(container={"command": ["/no/such/program"]})))
    # Nothing is left behind by a failed create.
    await wait_until(lambda: not kube.objects("pods"), timeout=10)


async def test_exits_report_terminated_deleted_and_resume_after_410(
    runtime: KubernetesRuntime, kube: FakeKube
) -> None:
    p = pool()
    handles = [await runtime.create(spec_of(p)) for _ in range(4)]
    seen: list[Exit] = []

    async def follow() -> None:
        async for ex in runtime.exits("kt"):
            seen.append(ex)

    task = asyncio.create_task(follow())
    await wait_until(lambda: ("watch", "pods") in kube.requests, timeout=5)
    for h in handles:
        await wait_until(lambda h=h: answers(h.addr), timeout=10)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{handles[0].addr}/exit?code=3") as r:
            assert r.status == 200
        await wait_until(lambda: [e.container for e in seen] == [handles[0].container], 10)
        # Deleted from outside (kubectl delete pod).
        async with http.delete(
            f"{kube.url}/api/v1/namespaces/{NS}/pods/{handles[1].container}",
            headers={"Authorization": f"Bearer {kube.admin_token}"},
        ) as r:
            assert r.status == 200
        await wait_until(lambda: len(seen) == 2, timeout=10)
        assert seen[1] == Exit(handles[1].container, "kpool", seen[1].sandbox_id)
        # The watch's version is compacted away while a pod ends: it lists again, reports it.
        kube.compact()
        async with http.get(f"http://{handles[2].addr}/exit?code=0") as r:
            assert r.status == 200
        await wait_until(lambda: len(seen) == 3, timeout=10)
        assert seen[2].container == handles[2].container
    assert {o.container: o.running for o in await runtime.list("kt")} == {
        handles[0].container: False,
        handles[2].container: False,
        handles[3].container: True,
    }
    await runtime.close()
    await asyncio.wait_for(task, 5)  # close ends the iterator
    assert len(seen) == 3  # each exit once


async def test_invalid_objects_are_refused_like_the_api(kube: FakeKube) -> None:
    """The fake is strict where the real API is: a typo'd field, a bad label, a bad quantity."""
    base = podspec.pod(spec_of(pool()), NS, LimitPolicy().resolve(pool()))
    typo = {**base, "spec": {**base["spec"], "automountServiceAccountTokn": False}}
    bad_label = {**base, "metadata": {**base["metadata"], "labels": {"a": "-x-"}}}
    c = {**base["spec"]["containers"][0], "resources": {"limits": {"memory": "lots"}}}
    bad_qty = {**base, "spec": {**base["spec"], "containers": [c]}}
    headers = {"Authorization": f"Bearer {kube.admin_token}"}
    async with aiohttp.ClientSession() as http:
        for body, why in (
            (typo, "automountServiceAccountTokn"),
            (bad_label, "label value"),
            (bad_qty, "quantity"),
        ):
            url = f"{kube.url}/api/v1/namespaces/{NS}/pods"
            async with http.post(url, json=body, headers=headers) as r:
                assert r.status == 422
                doc = await r.json()
                assert doc["kind"] == "Status" and doc["reason"] == "Invalid"
                assert why in doc["message"]
        async with http.get(f"{kube.url}/api/v1/namespaces/{NS}/pods/nope", headers=headers) as r:
            assert r.status == 404 and (await r.json())["reason"] == "NotFound"
        async with http.get(f"{kube.url}/api/v1/namespaces/{NS}/pods") as r:
            assert r.status == 401
    kube.rejected.clear()


async def test_every_call_is_bounded_when_the_api_stalls(kube: FakeKube, tmp_path: Path) -> None:
    settings = Settings(
        runtime="kubernetes",
        k8s_namespace=NS,
        k8s_kubeconfig=str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
        k8s_api_timeout_s=0.3,
    )
    rt = KubernetesRuntime(settings)
    try:
        kube.answering.clear()
        for call in (rt.list("kt"), rt.destroy("sp-x"), rt.create(spec_of(pool()))):
            with pytest.raises(match="kubernetes API: TimeoutError"):
                await asyncio.wait_for(call, 5)  # the runtime's own bound, not this one
    finally:
        kube.answering.set()
        await rt.close()


async def test_registry_credentials_become_a_pull_secret(
    runtime: KubernetesRuntime, kube: FakeKube
) -> None:
    p = pool(
        "private",
        secrets=[{"name": "regpw", "value": "hunter2"}],
        customContainerTemplate={
            "containers": [{"name": "main", "image": IMAGE}],
            "ingress": {"targetPort": 8080},
            "registryCredentials": {
                "server": "registry.example",
                "username": "bot",
                "passwordSecretRef": "regpw",
            },
        },
        sandboxConfiguration={"tolerations": [{"key": "sandbox", "operator": "Exists"}]},
    )
    handle = await runtime.create(spec_of(p))
    (pod,) = kube.objects("pods")
    (secret,) = kube.objects("secrets")
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    assert pod["spec"]["imagePullSecrets"] == [{"name": secret["metadata"]["name"]}]
    assert pod["spec"]["tolerations"] == [{"key": "sandbox", "operator": "Exists"}]
    await runtime.destroy(handle.container)
    await wait_until(lambda: not kube.objects("secrets"), timeout=10)


async def test_code_interpreter_runs_on_a_read_only_root(
    runtime: KubernetesRuntime, kube: FakeKube
) -> None:
    """The PythonLTS image writes where ACA sessions write (/mnt/data, /tmp): those are the
    pod's emptyDirs, everything else is read-only."""
    open_engine(CODE_IMAGE).close()  # built when missing
    p = parse_pool("lts", {"properties": {"containerType": "PythonLTS"}})
    handle = await runtime.create(spec_of(p))
    url = f"http://{handle.addr}"

    async def healthy() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/health") as r:
                return r.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await wait_until(healthy, timeout=60, interval=0.2)
    code = (
        "open('/mnt/data/a.txt', 'w').write('x'); open('/tmp/b.txt', 'w').write('y')\n"
        "try:\n    open('/etc/c.txt', 'w')\nexcept OSError as e:\n    print(e.errno)\n"
    )
    body = {"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": code}}
    params = {"api-version": "2024-02-02-preview", "identifier": "k8s"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/code/execute", params=params, json=body) as r,
    ):
        assert r.status == 200, await r.text()
        props = (await r.json())["properties"]
    assert props["status"] == "Success", props
    assert props["stdout"].strip() == "30"  # EROFS: the root is read-only
    await runtime.destroy(handle.container)


async def test_a_missing_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    rt = KubernetesRuntime(Settings(runtime="kubernetes", k8s_kubeconfig=str(tmp_path / "absent")))
    try:
        with pytest.raises(match="kubernetes configuration"):
            await rt.list("kt")
        with pytest.raises(match="kubernetes configuration"):
            await rt.engine_id()
    finally:
        await rt.close()
