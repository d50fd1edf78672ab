"""Deployment artefacts: the compose stack end to end on Docker, the k8s manifests offline."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.auth import load_api_keys
from sessionpool.testing import unused_ports
from workers.docker import DockerRuntime
from workers.runtime import LABEL_SCOPE

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "deploy/compose/docker-compose.yml"
K8S_DIR = ROOT / "deploy/k8s"
TAG = "dev"
# Images the stack runs (router, worker, haproxy, redis) and the session image of its pool.
IMAGES = ("router", "worker", "haproxy", "redis", "echo")
ECHO_IMAGE = f"sessionpool/echo:{TAG}"
POOL = "echo"
IDENTIFIER = "deploy-user-1"


def sh(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, capture_output=True, text=True, env=env, timeout=timeout, check=False, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def compose_command() -> list[str]:
    """Compose v1 (Debian's docker-compose) or v2 (`docker compose`): whichever is installed."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if sh("docker", "compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("neither docker-compose nor `docker compose` is installed (apt: docker-compose)")


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    """Poll `predicate` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


@dataclass
class Stack:
    project: str
    prefix: str  # key prefix, sandbox scope label and network prefix at once
    lb_port: int
    redis_port: int
    env: dict[str, str]
    compose: list[str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.compose, "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        return sh(*cmd, env=self.env, check=check)

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).stdout.strip()

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "40", check=False).stdout

    def sandboxes(self) -> list[str]:
        out = sh("docker", "ps", "-aq", "--filter", f"label={LABEL_SCOPE}={self.prefix}").stdout
        return out.split()

    def down(self) -> None:
        self.run("down", "--volumes", "--timeout", "10", check=False)
        left = self.sandboxes()
        if left:  # the worker died with the stack: what it had made is ours to remove
            sh("docker", "rm", "-f", *left, check=False)
        asyncio.run(_remove_networks(self.prefix))


async def _remove_networks(prefix: str) -> None:
    runtime = DockerRuntime(network_prefix=prefix)
    try:
        await runtime.remove_networks()  # also deletes the worker's firewall rules
    finally:
        await runtime.close()


def ensure_images() -> None:
    missing = [
        image
        for image in IMAGES
        if sh("docker", "image", "inspect", f"sessionpool/{image}:{TAG}", check=False).returncode
    ]
    if missing:
        sh("bash", str(ROOT / "deploy/images/build.sh"), *missing, timeout=1500)


@pytest.fixture
def stack() -> Iterator[Stack]:
    info = sh("docker", "info", "--format", "{{.ServerVersion}}", check=False)
    assert info.returncode == 0, f"Docker engine unreachable: {info.stderr.strip()}"
    compose = compose_command()
    ensure_images()
    prefix = f"dt{uuid.uuid4().hex[:8]}"
    lb, r1, r2, redis = unused_ports(4)  # the stack binds them moments later
    env = {
        **os.environ,
        "SP_TAG": TAG,
        "SP_LB_BIND": "127.0.0.1",
        "SP_LB_PORT": str(lb),
        "SP_ROUTER1_PORT": str(r1),
        "SP_ROUTER2_PORT": str(r2),
        "SP_REDIS_PORT": str(redis),
        "SP_KEY_PREFIX": prefix,
        "SP_NETWORK_PREFIX": prefix,
    }
    s = Stack(project=prefix, prefix=prefix, lb_port=lb, redis_port=redis, env=env, compose=compose)
    try:
        s.run("up", "-d")
        yield s
    finally:
        s.down()


def get(
    url: str, timeout: float = 40.0, key: str = "", method: str = "GET", body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body); connection errors are status 0."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
    except (OSError, TimeoutError):
        return 0, {}, b""


ECHO_POOL = {
    "properties": {
        "scaleConfiguration": {"maxConcurrentSessions": 4, "readySessionInstances": 1},
        "dynamicPoolConfiguration": {
            "lifecycleConfiguration": {"lifecycleType": "Timed", "cooldownPeriodInSeconds": 300}
        },
        "customContainerTemplate": {
            "containers": [{"name": "main", "image": ECHO_IMAGE}],
            "ingress": {"targetPort": 8080},
        },
    }
}


def admin_key(stack: Stack) -> str:
    """The key the `credentials` service made and printed once at the first start."""
    logs = stack.run("logs", "--no-color", "credentials").stdout
    keys = re.findall(r"the key \(shown once, give it to the client\): (sp_\S+)", logs)
    assert len(keys) == 1, f"no admin key in the credentials service's log:\n{logs}"
    return keys[0]


def redis_says(port: int, *commands: str) -> list[bytes]:
    """The first line of Redis's answer to each command, over a plain socket (inline
    commands): what any client, a sandbox's included, would be told."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        answers = []
        for command in commands:
            sock.sendall(command.encode() + b"\r\n")
            answers.append(reader.readline().rstrip())
        return answers


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_compose_stack_survives_a_router_kill(stack: Stack) -> None:
    lb = f"http://127.0.0.1:{stack.lb_port}"
    try:
        wait_for(lambda: get(f"{lb}/readyz", timeout=2)[0] == 200, 60, "LB /readyz 200")
        # Secure by default: the stack made its own credentials and asks for them.
        key = admin_key(stack)
        url = f"{lb}/pools/{POOL}/hello?identifier={IDENTIFIER}"
        for anonymous in (url, f"{lb}/admin/pools"):
            status, headers, _ = get(anonymous)
            assert status == 401 and headers["www-authenticate"].startswith("Bearer"), status
        assert get(f"{lb}/admin/pools", key="sp_not-the-key")[0] == 401
        status, _, body = get(f"{lb}/admin/pools/{POOL}", key=key, method="PUT", body=ECHO_POOL)
        assert status in (200, 201), body
        redis = stack.container("redis")
        password = sh("docker", "exec", redis, "cat", "/credentials/redis-password").stdout
        # No password, no data; a wrong one is refused; the generated one works.
        nothing, guess, good = (
            redis_says(stack.redis_port, "PING", "KEYS *"),
            redis_says(stack.redis_port, "AUTH a-guess", "PING"),
            redis_says(stack.redis_port, f"AUTH {password.strip()}", "PING"),
        )
        assert [a.split()[0] for a in nothing] == [b"-NOAUTH", b"-NOAUTH"], nothing
        assert guess[0].startswith(b"-WRONGPASS") and guess[1].startswith(b"-NOAUTH"), guess
        assert good == [b"+OK", b"+PONG"], good

        def echoed() -> dict[str, Any] | None:
            status, headers, body = get(url, key=key)
            if status != 200:
                return None
            return {"router": headers.get("x-sessionpool-router"), **json.loads(body)}

        first = wait_for(echoed, 180, "a 200 from the echo sandbox through the LB")
        # Another key, the documented way: hashed into the stack's file, picked up live.
        made = stack.run("run", "--rm", "credentials", "new-key", "ci", "--pool", POOL)
        (ci_key,) = re.findall(r"\(shown once, give it to the client\): (sp_\S+)", made.stderr)

        # Each router re-reads the key file on its own clock and the LB alternates between
        # them: the key is live once several requests in a row (both routers) accept it.
        def accepted() -> bool:
            return all(get(url, key=ci_key)[0] == 200 for _ in range(4))

        wait_for(accepted, 30, "the new key accepted by both routers")
        assert get(f"{lb}/admin/pools", key=ci_key)[0] == 403  # executor, one pool
        assert first["path"] == "/hello"
        assert IDENTIFIER in first["query"]
        sandboxes = stack.sandboxes()
        assert sandboxes, "the worker made no sandbox labelled with the stack's scope"
        hostnames = {
            sh("docker", "inspect", "-f", "{{.Config.Hostname}}", c).stdout.strip()
            for c in sandboxes
        }
        assert first["hostname"] in hostnames

        router_1 = stack.container("router-1")
        sh("docker", "kill", router_1)
        killed_at = time.monotonic()
        after = wait_for(echoed, 5, "the same identifier answering after a router kill")
        assert after["hostname"] == first["hostname"], "the session moved to another sandbox"
        assert after["router"] == "router-2", after
        assert time.monotonic() - killed_at < 5
        state = sh("docker", "inspect", "-f", "{{.State.Running}}", router_1).stdout.strip()
        assert state == "false", "router-1 came back: the request above proved nothing"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- compose logs ---\n{stack.logs()}") from None

    stack.down()
    assert stack.sandboxes() == [], "sandbox containers outlived `down`"
    assert stack.run("ps", "-q").stdout.strip() == ""


# Kubernetes manifests, checked without a cluster --------------------------------------------

REQUIRED_SECURITY = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
                doc["__file"] = path.name
                docs.append(doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def where(doc: dict[str, Any]) -> str:
    return f"{doc['__file']}: {doc['kind']}/{doc['metadata']['name']}"


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs = k8s_documents()
    assert docs, f"no manifests in {K8S_DIR}"
    return docs


def test_k8s_documents_have_the_basics(manifests: list[dict[str, Any]]) -> None:
    names = set()
    for doc in manifests:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc["__file"]
        assert doc["metadata"].get("name"), doc["__file"]
        assert doc["metadata"].get("namespace") in (None, "sessionpool"), where(doc)
        if doc["kind"] not in ("ConfigMap", "Secret", "Namespace"):
            assert isinstance(doc.get("spec"), dict), f"{where(doc)}: no spec"
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in names, f"{where(doc)}: defined twice"
        names.add(key)
    kinds = {d["kind"] for d in manifests}
    wanted = {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "StatefulSet",
        "ConfigMap",
    }
    assert wanted <= kinds, f"missing kinds: {wanted - kinds}"


def test_k8s_workloads_are_hardened_and_probed(manifests: list[dict[str, Any]]) -> None:
    workloads = [d for d in manifests if d["kind"] in WORKLOADS]
    assert {w["metadata"]["name"] for w in workloads} >= {"router", "worker", "redis"}
    for w in workloads:
        spec = w["spec"]
        selector = spec["selector"]["matchLabels"]
        labels = spec["template"]["metadata"]["labels"]
        assert matches(selector, labels), f"{where(w)}: selector does not match its pods"
        pod = spec["template"]["spec"]
        pod_sc = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, where(w)
        for c in pod["containers"] + pod.get("initContainers", []):
            at = f"{where(w)} container {c['name']}"
            assert c.get("image") and ":" in c["image"], f"{at}: image without a tag"
            sc = c.get("securityContext", {})
            # The docker-runtime worker installs the sandboxes' host firewall rules: root with
            # NET_ADMIN and NET_RAW only (it holds the node's Docker socket anyway).
            firewaller = w["metadata"]["name"] == "worker" and any(
                "docker.sock" in json.dumps(v) for v in pod.get("volumes", [])
            )
            for field, value in REQUIRED_SECURITY.items():
                got = sc.get(field, pod_sc.get(field) if field == "runAsNonRoot" else None)
                if firewaller and field == "runAsNonRoot":
                    value = False
                assert got == value, f"{at}: securityContext.{field} is {got!r}"
            run_as = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(run_as, int) and (run_as > 0 or firewaller), f"{at}: runAsUser"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{at}: capabilities"
            added = sc.get("capabilities", {}).get("add", [])
            assert added == (["NET_ADMIN", "NET_RAW"] if firewaller else []), f"{at}: {added}"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= res.get(kind, {}).keys(), f"{at}: {kind}"
            if c in pod.get("initContainers", []):
                continue
            assert "readinessProbe" in c and "livenessProbe" in c, f"{at}: probes"
            port_names = {p.get("name") for p in c.get("ports", [])}
            port_numbers = {p["containerPort"] for p in c.get("ports", [])}
            for probe in (c["readinessProbe"], c["livenessProbe"], c.get("startupProbe")):
                if probe is None:
                    continue
                handler = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("exec")
                assert handler, f"{at}: a probe without a handler"
                port = handler.get("port") if isinstance(handler, dict) else None
                if port is not None:
                    assert port in port_names | port_numbers, f"{at}: probe port {port}"
            volume_names = {v["name"] for v in pod.get("volumes", [])}
            claim_names = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
            for m in c.get("volumeMounts", []):
                assert m["name"] in volume_names | claim_names, f"{at}: mount {m['name']}"


def test_k8s_router_and_worker_specifics(manifests: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in by_kind(manifests, "Deployment")}
    router = deployments["router"]["spec"]["template"]["spec"]["containers"][0]
    assert router["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert router["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert router["ports"], "the router Service needs a named port"
    worker_pod = deployments["worker"]["spec"]["template"]["spec"]
    config_refs = set()
    for d in deployments.values():
        for c in d["spec"]["template"]["spec"]["containers"]:
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef") or src.get("secretRef")
                config_refs.add(ref["name"])
            for e in c.get("env", []):
                assert e["name"].startswith("SESSIONPOOL_") or "valueFrom" in e, e
    known = {d["metadata"]["name"] for d in manifests if d["kind"] == "ConfigMap"}
    known |= {d["metadata"]["name"] for d in made_secrets()[0]}
    assert config_refs and config_refs <= known, f"envFrom names {config_refs - known}"
    # Only the worker talks to a Docker engine: nothing else mounts a socket or runs DinD.
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        sockets = [v for v in pod.get("volumes", []) if "docker" in json.dumps(v)]
        if name != "worker":
            assert not sockets, f"{name} must not reach the Docker engine"
    assert any("docker" in json.dumps(v) for v in worker_pod.get("volumes", []))


def test_k8s_references_resolve(manifests: list[dict[str, Any]]) -> None:
    workloads = {(d["kind"], d["metadata"]["name"]): d for d in manifests if d["kind"] in WORKLOADS}
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads.values()]

    hpas = by_kind(manifests, "HorizontalPodAutoscaler")
    assert hpas
    for hpa in hpas:
        assert hpa["apiVersion"] == "autoscaling/v2", where(hpa)
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in workloads, f"{where(hpa)}: target {ref}"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], where(hpa)
        assert hpa["spec"]["metrics"], where(hpa)
        target = workloads[(ref["kind"], ref["name"])]
        for c in target["spec"]["template"]["spec"]["containers"]:
            # Utilisation targets are a share of the requests: without them HPA cannot work.
            assert "cpu" in c["resources"]["requests"], f"{where(hpa)}: {c['name']}"

    pdbs = by_kind(manifests, "PodDisruptionBudget")
    assert pdbs
    router_labels = workloads[("Deployment", "router")]["spec"]["template"]["metadata"]["labels"]
    assert any(matches(p["spec"]["selector"]["matchLabels"], router_labels) for p in pdbs)
    for pdb in pdbs:
        assert pdb["apiVersion"] == "policy/v1", where(pdb)
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(matches(selector, labels) for labels in pod_labels), where(pdb)
        assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"]), where(pdb)

    services = by_kind(manifests, "Service")
    assert {"router", "redis"} <= {s["metadata"]["name"] for s in services}
    for svc in services:
        selector = svc["spec"]["selector"]
        chosen = [
            w
            for w in workloads.values()
            if matches(selector, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert chosen, f"{where(svc)}: selects no pods"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            offered = {
                value
                for w in chosen
                for c in w["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
                for value in (p["containerPort"], p.get("name"))
            }
            assert target in offered, f"{where(svc)}: targetPort {target} not on its pods"

    for sts in by_kind(manifests, "StatefulSet"):
        names = {s["metadata"]["name"] for s in services}
        assert sts["spec"]["serviceName"] in names, f"{where(sts)}: serviceName"


# Credentials: made by make-secrets.sh, never in a manifest --------------------------------

ALL_K8S = sorted(K8S_DIR.glob("*.yaml")) + sorted((K8S_DIR / "kubernetes-runtime").glob("*.yaml"))


def made_secrets() -> tuple[list[dict[str, Any]], str]:
    """What `sh deploy/k8s/make-secrets.sh` prints: the Secrets, and the admin key."""
    out = sh("sh", str(K8S_DIR / "make-secrets.sh"))
    docs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    (key,) = re.findall(r"the admin key \(shown once, keep it\): (sp_\S+)", out.stderr)
    return docs, key


def secret_data(doc: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in doc["data"].items()}


def test_k8s_ships_no_credential_and_make_secrets_makes_them(tmp_path: Path) -> None:
    for path in ALL_K8S:
        text = path.read_text()
        assert "change-me" not in text, path.name
        for doc in yaml.safe_load_all(text):
            assert doc is None or doc["kind"] != "Secret", f"{path.name}: a Secret is shipped"
    docs, key = made_secrets()
    again, other_key = made_secrets()
    by_name = {d["metadata"]["name"]: secret_data(d) for d in docs}
    assert set(by_name) == {"sessionpool-secrets", "sessionpool-api-keys"}
    assert all(d["kind"] == "Secret" and d["metadata"]["namespace"] == "sessionpool" for d in docs)
    password = by_name["sessionpool-secrets"]["REDIS_PASSWORD"]
    assert len(password) >= 32
    # Fresh every run: nothing is a constant of the repository.
    assert key != other_key
    assert password != secret_data(again[0])["REDIS_PASSWORD"]
    keys_file = tmp_path / "api-keys.yaml"
    keys_file.write_text(by_name["sessionpool-api-keys"]["api-keys.yaml"])
    (admin,) = load_api_keys(str(keys_file))
    assert admin.principal.id == "key:admin" and admin.principal.pools is None
    assert admin.principal.roles == {"admin", "executor"}
    assert admin.digest == hashlib.sha256(key.encode()).digest()
    assert key not in keys_file.read_text()


def test_k8s_workloads_use_the_made_secrets_and_redis_needs_its_password() -> None:
    made = {d["metadata"]["name"]: set(d["data"]) for d in made_secrets()[0]}
    docs = [d for p in ALL_K8S for d in yaml.safe_load_all(p.read_text()) if d is not None]
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        pod = w["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in made, w["metadata"]["name"]
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in made[ref["name"]], (w["metadata"]["name"], ref)
            url = next((e["value"] for e in c.get("env", []) if "REDIS_URL" in e["name"]), None)
            if url is not None:  # the routers' and workers' Redis URL carries the password
                assert url.startswith("redis+sentinel://:$(REDIS_PASSWORD)@"), url
        for v in pod.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] in made, w["metadata"]["name"]
        if w["metadata"]["name"] in ("router", "worker"):
            (c,) = pod["containers"]
            assert any(e["name"] == "SESSIONPOOL_REDIS_URL" for e in c["env"]), where(w)
    (script,) = [d["data"]["init.sh"] for d in docs if d["metadata"]["name"] == "redis-scripts"]
    for line in (
        "requirepass $REDISCLI_AUTH",
        "masterauth $REDISCLI_AUTH",
        "sentinel auth-pass sessionpool $REDISCLI_AUTH",
        "sentinel sentinel-pass $REDISCLI_AUTH",
    ):
        assert line in script, line
    assert "protected-mode no" not in script


def test_k8s_sandboxes_are_kept_from_redis_and_the_routers() -> None:
    docs = [
        d
        for p in sorted((K8S_DIR / "kubernetes-runtime").glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d is not None
        and d["kind"] == "NetworkPolicy"
        and d["metadata"]["namespace"] == "sessionpool"
    ]
    policies = {d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]: d for d in docs}
    redis = policies["redis"]["spec"]
    assert redis["policyTypes"] == ["Ingress"]
    (rule,) = redis["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # same namespace only: never the sandboxes'
    (expr,) = peer["podSelector"]["matchExpressions"]
    assert expr["operator"] == "In" and set(expr["values"]) == {"router", "worker", "redis"}
    router = policies["router"]["spec"]
    (rule,) = router["ingress"]
    namespaces = next(p for p in rule["from"] if "namespaceSelector" in p)
    (expr,) = namespaces["namespaceSelector"]["matchExpressions"]
    assert expr["operator"] == "NotIn" and expr["values"] == ["sessionpool-sandboxes"]
    block = next(p for p in rule["from"] if "ipBlock" in p)["ipBlock"]
    config = next(
        d
        for d in yaml.safe_load_all((K8S_DIR / "kubernetes-runtime/10-config.yaml").read_text())
        if d["kind"] == "ConfigMap"
    )
    cluster = config["data"]["SESSIONPOOL_K8S_CLUSTER_CIDRS"].split(",")
    assert block["except"] == cluster  # pod addresses (sandboxes included) are not "outside"
