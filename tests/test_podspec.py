"""The kubernetes runtime's objects as pure data: pod fields, egress policies, pool placement."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from router.errors import InvalidPoolError
from router.limits import LimitPolicy
from router.pools import Pool, parse_pool
from router.settings import Settings
from workers import podspec
from workers.runtime import SandboxSpec

CIDRS = ["10.0.0.0/8", "fd00::/8"]


def pool(name: str = "ppool", **props: Any) -> Pool:
    container: dict[str, Any] = {"name": "main", "image": "sessionpool/echo:dev"}
    container.update(props.pop("container", {}))
    return parse_pool(
        name,
        {
            "properties": {
                "customContainerTemplate": {
                    "containers": [container],
                    "ingress": {"targetPort": 8080},
                    **props.pop("template", {}),
                },
                **props,
            }
        },
    )


def test_egress_disabled_allows_nothing_out_and_only_routers_and_workers_in() -> None:
    p = pool(container={"probes": [{"type": "Liveness", "tcpSocket": {"port": 9000}}]})
    doc = podspec.pool_policy(SandboxSpec("sc", p, "a" * 32), "ns", "ctl", CIDRS)
    spec = doc["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["egress"] == []  # no DNS either
    (rule,) = spec["ingress"]
    assert [x["port"] for x in rule["ports"]] == [8080, 9000]  # target and probe ports
    (peer,) = rule["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ctl"}}
    names = peer["podSelector"]["matchExpressions"][0]
    assert names["operator"] == "In" and names["values"] == ["router", "worker"]


def test_egress_enabled_excludes_cluster_and_metadata_ranges_but_allows_dns() -> None:
    p = pool(sessionNetworkConfiguration={"status": "EgressEnabled"})
    spec = podspec.pool_policy(SandboxSpec("sc", p, "a" * 32), "ns", "ctl", CIDRS)["spec"]
    internet, dns = spec["egress"]
    v4, v6 = (b["ipBlock"] for b in internet["to"])
    assert v4 == {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "169.254.0.0/16"]}
    assert v6 == {"cidr": "::/0", "except": ["fd00::/8", "fe80::/10"]}
    assert "ports" not in internet
    assert {p["port"] for p in dns["ports"]} == {53}
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}


def test_pod_carries_placement_runtime_class_and_pull_secret() -> None:
    p = pool(
        secrets=[{"name": "regpw", "value": "hunter2"}],
        template={
            "registryCredentials": {
                "server": "registry.example",
                "username": "bot",
                "passwordSecretRef": "regpw",
            }
        },
        sandboxConfiguration={
            "runtime": "runsc",
            "nodeSelector": {"sandbox": "yes"},
            "tolerations": [{"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}],
        },
    )
    spec = SandboxSpec("sc", p, "b" * 32)
    pod = podspec.pod(spec, "ns", LimitPolicy().resolve(p))["spec"]
    base = podspec.base_name("sc", "ppool")
    assert pod["runtimeClassName"] == "gvisor"
    assert pod["nodeSelector"] == {"sandbox": "yes"}
    assert pod["tolerations"] == [{"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["imagePullSecrets"] == [{"name": f"{base}-pull"}]
    secret = podspec.pull_secret(spec, "ns", "registry.example", "bot", "hunter2")
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    config = orjson.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    auth = config["auths"]["registry.example"]
    assert base64.b64decode(auth["auth"]) == b"bot:hunter2"
    assert b"hunter2" not in orjson.dumps(pod)


def test_pod_is_hardened_and_sized_like_the_docker_sandbox() -> None:
    p = pool(
        container={
            "resources": {"cpu": 1.5, "memory": "300Mi"},
            "command": ["run"],
            "env": [{"name": "HOME", "value": "/home/app"}],
        }
    )
    doc = podspec.pod(SandboxSpec("sc", p, "c" * 32), "ns", LimitPolicy().resolve(p))
    pod = doc["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["run"] and "args" not in c
    storage = str(150 << 20)  # no storage asked: the default, at most half the memory
    assert c["resources"]["limits"] == {
        "cpu": "1500m",
        "memory": str(300 << 20),
        "ephemeral-storage": storage,
    }
    assert c["resources"]["requests"] == c["resources"]["limits"]
    # The docker runtime's writable paths, each a capped memory-backed emptyDir.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert sorted(mounts.values()) == ["/home/app", "/mnt/data", "/run", "/tmp", "/var/tmp"]
    assert all(v["emptyDir"] == {"medium": "Memory", "sizeLimit": storage} for v in pod["volumes"])
    assert {v["name"] for v in pod["volumes"]} == set(mounts)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    for flag in ("hostNetwork", "hostPID", "hostIPC", "automountServiceAccountToken"):
        assert pod[flag] is False
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["restartPolicy"] == "Never"
    assert "runtimeClassName" not in pod and "imagePullSecrets" not in pod
    # Defaults when the pool names no resources.
    plain = podspec.pod(SandboxSpec("sc", pool(), "c" * 32), "ns", LimitPolicy().resolve(pool()))
    assert plain["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "1000m"


def test_a_pool_without_resources_gets_the_operator_defaults() -> None:
    policy = LimitPolicy.from_settings(
        Settings(sandbox_default_cpu=0.5, sandbox_default_memory_bytes=384 << 20)
    )
    bare = pool()
    doc = podspec.pod(SandboxSpec("sc", bare, "d" * 32), "ns", policy.resolve(bare))
    (c,) = doc["spec"]["containers"]
    assert c["resources"]["limits"] == {
        "cpu": "500m",
        "memory": str(384 << 20),
        "ephemeral-storage": str(192 << 20),  # the default storage, at most half the memory
    }


def test_names_and_labels_the_api_would_refuse_are_caught_here() -> None:
    with pytest.raises(podspec.SpecError, match="pod name"):
        podspec.pod_name("sc", "Not_A_Valid_Id")
    with pytest.raises(podspec.SpecError, match="label value"):
        podspec.labels(SandboxSpec("-bad-scope", pool(), "d" * 32))
    # Long key prefixes still give valid, distinct names.
    a, b = podspec.base_name("x" * 64, "ppool"), podspec.base_name("y" * 64, "ppool")
    assert a != b and len(a) < 64


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({"sandboxConfiguration": {"nodeSelector": {"a": 1}}}, "nodeSelector"),
        ({"sandboxConfiguration": {"tolerations": [{"bogus": 1}]}}, r"tolerations\[0\]"),
        ({"sandboxConfiguration": {"tolerations": [{"operator": "Maybe"}]}}, "operator"),
        (
            {"template": {"registryCredentials": {"server": "r", "username": "u"}}},
            "passwordSecretRef",
        ),
    ],
)
def test_placement_and_registry_are_validated(props: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPoolError, match=field):
        pool(**props)


def test_placement_changes_the_template_version() -> None:
    assert pool().version != pool(sandboxConfiguration={"nodeSelector": {"a": "b"}}).version


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"key_prefix": "_bad"}, "label value"),
        ({"k8s_namespace": "Not_A_Namespace"}, "namespace name"),
        ({"k8s_cluster_cidrs": "10.0.0.0/8,nonsense"}, "CIDR"),
        ({"k8s_api_timeout_s": 0}, "positive"),
    ],
)
def test_kubernetes_settings_are_validated(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(runtime="kubernetes", **fields)
    assert Settings.from_env({"SESSIONPOOL_K8S_NAMESPACE": "sb"}).k8s_namespace == "sb"


def test_worker_flags_set_the_kubernetes_settings() -> None:
    from sessionpool.cli import build_parser, settings_from

    args = build_parser().parse_args(
        [
            "worker",
            "--runtime",
            "kubernetes",
            "--k8s-namespace",
            "sbx",
            "--k8s-context",
            "prod",
            "--k8s-api-timeout-s",
            "3",
            "--k8s-schedule-timeout-s",
            "30",
        ]
    )
    s = settings_from(args)
    assert (s.runtime, s.k8s_namespace, s.k8s_context) == ("kubernetes", "sbx", "prod")
    assert (s.k8s_api_timeout_s, s.k8s_schedule_timeout_s) == (3.0, 30.0)
