"""deploy/k8s/kubernetes-runtime, offline: valid objects, least privilege, nothing on the host."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client as kclient

from router.pools import parse_pool
from tests.kube_fake import _differences
from workers import podspec
from workers.runtime import SandboxSpec

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "deploy/k8s/kubernetes-runtime"
SHARED = [ROOT / "deploy/k8s/20-redis.yaml"]  # applied with this directory
CONTROL, SANDBOXES = "sessionpool", "sessionpool-sandboxes"
MODELS = {
    "Namespace": "V1Namespace",
    "ConfigMap": "V1ConfigMap",
    "Secret": "V1Secret",
    "ServiceAccount": "V1ServiceAccount",
    "Role": "V1Role",
    "RoleBinding": "V1RoleBinding",
    "Deployment": "V1Deployment",
    "StatefulSet": "V1StatefulSet",
    "Service": "V1Service",
    "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler",
    "PodDisruptionBudget": "V1PodDisruptionBudget",
    "NetworkPolicy": "V1NetworkPolicy",
    "ResourceQuota": "V1ResourceQuota",
}


def documents(paths: list[Path] | None = None) -> list[dict[str, Any]]:
    out = []
    for path in paths or sorted(DIR.glob("*.yaml")) + SHARED:
        out += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


def worker_role_rules() -> list[dict[str, Any]]:
    """The rules the workers' ServiceAccount is granted (for the runtime tests)."""
    (role,) = [d for d in documents() if d["kind"] == "Role"]
    return list(role["rules"])


@pytest.fixture
async def models() -> AsyncIterator[Any]:
    api = kclient.ApiClient()
    yield api
    await api.close()


async def test_every_object_is_valid_for_its_typed_model(models: Any) -> None:
    docs = documents()
    assert {d["kind"] for d in docs} <= MODELS.keys()
    for doc in docs:
        model = models._ApiClient__deserialize(doc, MODELS[doc["kind"]])
        back = models.sanitize_for_serialization(model)
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert list(_differences(doc, back)) == [], f"{where}: fields the API does not know"
        assert doc["metadata"].get("namespace") in (None, CONTROL, SANDBOXES), where


def test_only_workers_reach_the_api_and_only_in_the_sandbox_namespace() -> None:
    docs = documents()
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    (role,) = [d for d in docs if d["kind"] == "Role"]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert role["metadata"]["namespace"] == SANDBOXES
    assert binding["metadata"]["namespace"] == SANDBOXES
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    worker = {"kind": "ServiceAccount", "name": "worker", "namespace": CONTROL}
    assert binding["subjects"] == [worker]
    granted = {(v, r) for rule in role["rules"] for v in rule["verbs"] for r in rule["resources"]}
    # Least privilege: no wildcard, no escalation paths, nothing it does not call.
    assert not any("*" in pair for pair in granted)
    resources = {"pods", "pods/status", "secrets", "networkpolicies", "events"}
    assert {r for _, r in granted} <= resources
    assert not {v for v, _ in granted} & {"patch", "deletecollection", "escalate", "bind"}
    assert ("list", "secrets") not in granted and ("watch", "secrets") not in granted
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    for name, pod in pods.items():
        token = pod.get("automountServiceAccountToken")
        assert token is (name == "worker"), f"{name}: automountServiceAccountToken {token}"
        assert not pod.get("hostNetwork"), name
        assert "hostPath" not in json.dumps(pod.get("volumes", [])), name
    assert pods["worker"]["serviceAccountName"] == "worker"
    assert pods["router"]["serviceAccountName"] == "router"
    bound = {s["name"] for s in binding["subjects"]}
    assert "router" not in bound


def test_namespaces_enforce_restricted_and_sandboxes_are_fenced() -> None:
    docs = documents()
    namespaces = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Namespace"}
    assert set(namespaces) == {CONTROL, SANDBOXES}
    for ns in namespaces.values():
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    (deny,) = [
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == SANDBOXES
    ]
    assert deny["metadata"]["namespace"] == SANDBOXES
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    (config,) = [d for d in docs if d["metadata"]["name"] == "sessionpool-config"]
    assert config["data"]["SESSIONPOOL_RUNTIME"] == "kubernetes"
    assert config["data"]["SESSIONPOOL_K8S_NAMESPACE"] == SANDBOXES


def _admits(peer: dict[str, Any], namespace: str, labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy peer (namespaceSelector + podSelector) selects a pod."""
    ns_labels = {"kubernetes.io/metadata.name": namespace}
    for selector, have in ((peer["namespaceSelector"], ns_labels), (peer["podSelector"], labels)):
        if any(have.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
            return False
        for expr in selector.get("matchExpressions", []):
            assert expr["operator"] == "In"
            if have.get(expr["key"]) not in expr["values"]:
                return False
    return True


def test_pool_policies_let_in_exactly_the_deployed_routers_and_workers() -> None:
    """The runtime's ingress rule and these manifests agree: routers and workers (probes) reach
    sandboxes, Redis and anything else in the control namespace does not."""
    docs = documents()
    (config,) = [d for d in docs if d["metadata"]["name"] == "sessionpool-config"]
    control = config["data"]["SESSIONPOOL_K8S_CONTROL_NAMESPACE"]
    pool = parse_pool(
        "demo",
        {
            "properties": {
                "customContainerTemplate": {
                    "containers": [{"name": "main", "image": "sessionpool/echo:dev"}],
                    "ingress": {"targetPort": 8080},
                }
            }
        },
    )
    policy = podspec.pool_policy(SandboxSpec("sp", pool, "a" * 32), SANDBOXES, control, [])
    (peer,) = policy["spec"]["ingress"][0]["from"]
    pods = {
        d["metadata"]["name"]: (d["metadata"]["namespace"], d["spec"]["template"]["metadata"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    admitted = {name for name, (ns, meta) in pods.items() if _admits(peer, ns, meta["labels"])}
    assert admitted == {"router", "worker"}
    assert "redis" in pods
