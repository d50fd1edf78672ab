"""The Kubernetes objects of a sandbox, as plain JSON: its pod, its pool's Secret and policies.

Pure functions (no SDK, no I/O) so every field can be read and tested on its own. The runtime
(`workers/kubernetes.py`) sends them as they are; the test double checks each one against the
client library's typed models, so a misspelt field fails a test instead of being dropped.

Per pool, in the sandbox namespace (`<base>` = `sp-<8 hex of the scope>-<pool>`):

- `<base>-env` (Secret): the values of the pool's secret-backed env vars, one key per variable;
  pods read them through `secretKeyRef`, so no secret value is ever in a pod spec.
- `<base>-pull` (Secret, `kubernetes.io/dockerconfigjson`): the pool's registry credentials.
- `<base>` (NetworkPolicy): ingress from the control namespace's sessionpool pods on the target
  and probe ports; egress none (`EgressDisabled`, DNS included) or anywhere but the cluster's
  ranges and link-local metadata, plus DNS to kube-dns (`EgressEnabled`).

Per scope, `sp-<8 hex>-deny` (NetworkPolicy) selects every sandbox and allows nothing: policies
add up, so a pod whose pool policy is missing (being re-created) is cut off, not open.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from typing import Any

import orjson

from router.limits import Limits
from workers.runtime import LABEL_POOL, LABEL_SCOPE, LABEL_VERSION, SandboxSpec

Json = dict[str, Any]
LINK_LOCAL = ("169.254.0.0/16", "fe80::/10")
GRACE_S = 1  # SIGTERM to SIGKILL when a sandbox is destroyed: the session is over
# The root filesystem is read-only; these are writable, each a memory-backed emptyDir capped at
# the sandbox's storage size: the paths and sizes of the docker runtime's tmpfs mode
# (workers/docker_storage.py). Memory-backed, as there: a full one is ENOSPC, and what a session
# writes counts toward its memory limit. (The image's own $HOME, which Docker reads from the
# image, is not known here: it is writable only when the pool's env sets HOME.)
WRITABLE = {"tmp": "/tmp", "var-tmp": "/var/tmp", "run": "/run", "data": "/mnt/data"}
# The pool's `sandboxConfiguration.runtime` (an OCI runtime) → the RuntimeClass to ask for.
RUNTIME_CLASSES = {
    "runc": None,
    "runsc": "gvisor",
    "kata": "kata",
    "kata-runtime": "kata",
    "io.containerd.kata.v2": "kata",
}
PART_OF = {"app.kubernetes.io/part-of": "sessionpool"}
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class SpecError(ValueError):
    """A name or label the Kubernetes API would refuse (the message names it)."""


def base_name(scope: str, pool: str) -> str:
    """The name shared by a pool's Secret and policy: stable, DNS-safe, scope-unique."""
    return f"sp-{_scope_hash(scope)}-{pool}"


def deny_name(scope: str) -> str:
    return f"sp-{_scope_hash(scope)}-deny"


def pod_name(scope: str, sandbox_id: str) -> str:
    """One name per sandbox, so a retried create meets its own pod (409) instead of a twin."""
    name = f"sp-{_scope_hash(scope)}-{sandbox_id}"
    if not POD_NAME.match(name):
        raise SpecError(f"sandbox id {sandbox_id!r} does not make a valid pod name ({name!r})")
    return name


def scope_selector(scope: str) -> str:
    return f"{LABEL_SCOPE}={scope}"


def labels(spec: SandboxSpec) -> dict[str, str]:
    """The docker runtime's identity labels, checked against Kubernetes' label-value syntax."""
    out = spec.labels
    for key, value in out.items():
        if not LABEL_VALUE.match(value):
            raise SpecError(f"label {key}={value!r} is not a valid Kubernetes label value")
    return out


def pod(spec: SandboxSpec, namespace: str, limits: Limits) -> Json:
    """The sandbox's pod: the pool's template, hardened, with its limits (router/limits.py:
    the pool's own, else the operator's defaults) as requests too."""
    pool = spec.pool
    base = base_name(spec.scope, pool.name)
    env: list[Json] = [{"name": e.name, "value": e.value} for e in pool.env if e.value is not None]
    env += [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": f"{base}-env", "key": name}}}
        for name in sorted(spec.env)
    ]
    resources = {
        "cpu": f"{round(limits.cpu * 1000)}m",
        "memory": str(limits.memory_bytes),
        # Disk outside the emptyDirs (the container's logs): bounded by the kubelet too.
        "ephemeral-storage": str(limits.storage_bytes),
    }
    writable = dict(WRITABLE)
    home = next((e.value for e in pool.env if e.name == "HOME" and e.value), None)
    if home and home.startswith("/") and home not in writable.values():
        writable["home"] = home
    container: Json = {
        "name": "sandbox",
        "image": pool.image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "ports": [{"containerPort": pool.target_port, "protocol": "TCP"}],
        # Requests = limits: the scheduler reserves what the sandbox may use (Guaranteed QoS),
        # so a node is never promised twice.
        "resources": {"requests": dict(resources), "limits": resources},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": n, "mountPath": path} for n, path in writable.items()],
    }
    size = str(limits.storage_bytes)
    volumes = [{"name": n, "emptyDir": {"medium": "Memory", "sizeLimit": size}} for n in writable]
    # ACA/Kubernetes semantics, as in the docker runtime: command replaces the entrypoint.
    if pool.command:
        container["command"] = list(pool.command)
    if pool.args:
        container["args"] = list(pool.args)
    pod_spec: Json = {
        "containers": [container],
        "restartPolicy": "Never",  # a sandbox that exits ends its session
        "terminationGracePeriodSeconds": GRACE_S,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": volumes,
    }
    runtime_class = RUNTIME_CLASSES.get(pool.oci_runtime or "runc")
    if runtime_class:
        pod_spec["runtimeClassName"] = runtime_class
    if pool.placement.node_selector:
        pod_spec["nodeSelector"] = dict(pool.placement.node_selector)
    if pool.placement.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in pool.placement.tolerations]
    if pool.registry is not None:
        pod_spec["imagePullSecrets"] = [{"name": f"{base}-pull"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(spec.scope, spec.sandbox_id),
            "namespace": namespace,
            "labels": {**labels(spec), **PART_OF},
        },
        "spec": pod_spec,
    }


def env_secret(spec: SandboxSpec, namespace: str) -> Json:
    """The pool's secret-backed env values, keyed by variable name."""
    return _secret(
        spec,
        namespace,
        f"{base_name(spec.scope, spec.pool.name)}-env",
        "Opaque",
        {k: v.encode() for k, v in spec.env.items()},
    )


def pull_secret(spec: SandboxSpec, namespace: str, server: str, user: str, password: str) -> Json:
    """A `dockerconfigjson` Secret for the pool's registry credentials."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config = {"auths": {server: {"username": user, "password": password, "auth": auth}}}
    return _secret(
        spec,
        namespace,
        f"{base_name(spec.scope, spec.pool.name)}-pull",
        "kubernetes.io/dockerconfigjson",
        {".dockerconfigjson": orjson.dumps(config)},
    )


def _secret(
    spec: SandboxSpec, namespace: str, name: str, kind: str, data: dict[str, bytes]
) -> Json:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": _pool_labels(spec),
        },
        "type": kind,
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())},
    }


def _pool_labels(spec: SandboxSpec) -> dict[str, str]:
    return {
        LABEL_SCOPE: spec.scope,
        LABEL_POOL: spec.pool.name,
        LABEL_VERSION: spec.pool.version,
        **PART_OF,
    }


def pool_policy(
    spec: SandboxSpec, namespace: str, control_namespace: str, cluster_cidrs: list[str]
) -> Json:
    """Ingress from sessionpool's own pods only; egress per the pool's network status."""
    pool = spec.pool
    ports = sorted({pool.target_port, *(p.port for p in pool.probes)})
    ingress = [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": control_namespace}
                    },
                    # Routers (traffic) and workers (probes); not Redis nor anything else.
                    "podSelector": {
                        "matchLabels": dict(PART_OF),
                        "matchExpressions": [
                            {
                                "key": "app.kubernetes.io/name",
                                "operator": "In",
                                "values": ["router", "worker"],
                            }
                        ],
                    },
                }
            ],
            "ports": [{"protocol": "TCP", "port": p} for p in ports],
        }
    ]
    egress: list[Json] = []
    if pool.egress_enabled:
        egress = [
            {"to": _internet(cluster_cidrs)},
            {
                # Cluster DNS lives inside the excluded ranges: allow it by name.
                "to": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                        },
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    }
                ],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            },
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": base_name(spec.scope, pool.name),
            "namespace": namespace,
            "labels": _pool_labels(spec),
        },
        "spec": {
            "podSelector": {
                "matchLabels": {LABEL_SCOPE: spec.scope, LABEL_POOL: pool.name},
            },
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,  # empty with Egress listed: nothing at all
        },
    }


def deny_policy(scope: str, namespace: str) -> Json:
    """Every sandbox of the scope: no ingress, no egress, unless a pool policy adds some."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": deny_name(scope),
            "namespace": namespace,
            "labels": {LABEL_SCOPE: scope, **PART_OF},
        },
        "spec": {
            "podSelector": {"matchLabels": {LABEL_SCOPE: scope}},
            "policyTypes": ["Ingress", "Egress"],
        },
    }


def _internet(cluster_cidrs: list[str]) -> list[Json]:
    """An ipBlock per address family: everything but the cluster and link-local ranges."""
    blocked = [ipaddress.ip_network(c.strip()) for c in (*cluster_cidrs, *LINK_LOCAL) if c.strip()]
    out = []
    for everything in (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")):
        excepts = sorted(str(n) for n in blocked if n.version == everything.version)
        out.append({"ipBlock": {"cidr": str(everything), "except": excepts}})
    return out


def _scope_hash(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:8]
