"""The fake API server's kubelet: each scheduled pod runs as a real container on Docker.

A pod becomes a container on a bridge network of its own (image, command, args, env with
`secretKeyRef` resolved, cpu/memory limits, dropped capabilities, no-new-privileges, read-only
root, `emptyDir` as a size-limited tmpfs, hostname = pod name). The pod's IP is the container's;
its phase and container state follow the container (running, terminated with its exit code,
gone). A node selector that does not match the node's labels leaves the pod Pending and
Unschedulable; a missing image or Secret leaves it waiting with ErrImagePull or
CreateContainerConfigError; a container that cannot start fails the pod (StartError); each with
a Warning event, as a kubelet reports them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from tests.kube_fake import FakeKube

Json = dict[str, Any]
FAKE_LABEL = "io.sessionpool.fake-kube"
SIZE = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


class Kubelet:
    """One node, `fake-node`, whose container runtime is the local Docker engine."""

    def __init__(self, api: FakeKube, engine: Any, node_labels: dict[str, str]) -> None:
        self.api = api
        self.engine = engine
        self.id = api.id
        self.node_labels = {"kubernetes.io/hostname": "fake-node", **node_labels}
        self.runtime_classes: dict[str, str] = {}  # RuntimeClass name → Docker runtime
        self.containers: dict[str, str] = {}  # pod key "ns/name" → container id
        self.network = f"fk-{self.id}"
        self.root = tempfile.mkdtemp(prefix=f"fk-{self.id}-")  # disk emptyDirs live here

    async def start(self) -> None:
        await asyncio.to_thread(
            self.engine.api.create_network,
            self.network,
            driver="bridge",
            labels={FAKE_LABEL: self.id},
        )

    async def close(self) -> None:
        """Remove every container this kubelet made, and its network."""
        for cid in await asyncio.to_thread(self.own_containers):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.engine.api.remove_container, cid, force=True)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.engine.api.remove_network, self.network)
        await asyncio.to_thread(shutil.rmtree, self.root, True)

    async def run_pod(self, key: tuple[str, str]) -> None:
        ns, name = key
        pod = self.api.store["pods"][key]
        spec = pod["spec"]
        c = spec["containers"][0]
        wanted = spec.get("nodeSelector") or {}
        if any(self.node_labels.get(k) != v for k, v in wanted.items()):
            message = (
                "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
            )
            self.api.event(ns, name, "FailedScheduling", message)
            self.api.update_status(
                key, conditions=[condition("PodScheduled", "False", "Unschedulable", message)]
            )
            return
        pod = self.api.store["pods"][key]
        pod = orjson.loads(orjson.dumps(pod))
        pod["spec"]["nodeName"] = "fake-node"
        pod["status"]["conditions"] = [condition("PodScheduled", "True")]
        self.api.put("pods", pod, "MODIFIED")

        def waiting(reason: str, message: str) -> None:
            self.api.event(ns, name, "Failed", message)
            self.api.update_status(
                key,
                containerStatuses=[
                    container_status(c, {"waiting": {"reason": reason, "message": message}})
                ],
            )

        try:
            image = await asyncio.to_thread(self.engine.api.inspect_image, c["image"])
        except Exception:
            waiting("ErrImagePull", f'Failed to pull image "{c["image"]}": not found')
            return
        env = {}
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = e["value"]
                continue
            ref = e["valueFrom"]["secretKeyRef"]
            secret = self.api.store["secrets"].get((ns, ref["name"]))
            if secret is None or ref["key"] not in (secret.get("data") or {}):
                waiting("CreateContainerConfigError", f'secret "{ref["name"]}" not found')
                return
            env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        sc = c.get("securityContext") or {}
        user = (image.get("Config") or {}).get("User") or ""
        if sc.get("runAsNonRoot") and user.split(":")[0] in ("", "0", "root"):
            waiting(
                "CreateContainerConfigError",
                "Error: container has runAsNonRoot and image will run as root",
            )
            return
        uid, _, gid = user.partition(":")
        owner = f",uid={uid},gid={gid or uid}" if uid.isdigit() and (gid or uid).isdigit() else ""
        limits = (c.get("resources") or {}).get("limits") or {}
        vols = {v["name"]: v for v in spec.get("volumes") or []}
        tmpfs, binds = {}, {}
        for m in c.get("volumeMounts") or []:
            empty = vols[m["name"]]["emptyDir"]
            if empty.get("medium") == "Memory":
                # A kubelet makes an emptyDir mode 0777; Docker keeps the mode of the image's
                # directory under a tmpfs instead, so the pod's user is made its owner.
                size = quantity_bytes(empty.get("sizeLimit", "64Mi"))
                tmpfs[m["mountPath"]] = f"rw,nosuid,nodev,size={size},mode=1777{owner}"
            else:  # a directory on the node, mode 0777, as a kubelet makes it
                path = Path(self.root, name, m["name"])
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o777)
                binds[str(path)] = {"bind": m["mountPath"], "mode": "rw"}
        kwargs: dict[str, Any] = {
            "name": f"fk-{self.id}-{name}"[:128],
            "hostname": name[:63],
            "labels": {FAKE_LABEL: self.id, "io.sessionpool.fake-pod": f"{ns}/{name}"},
            "environment": env,
            "entrypoint": c.get("command"),
            "command": c.get("args"),
            "network": self.network,
            "detach": True,
            "cap_drop": [
                x for x in ["ALL"] if "ALL" in (sc.get("capabilities") or {}).get("drop", [])
            ],
            "security_opt": ["no-new-privileges"] if not sc.get("allowPrivilegeEscalation") else [],
            "read_only": bool(sc.get("readOnlyRootFilesystem")),
            "tmpfs": tmpfs,
            "volumes": binds,
            "restart_policy": {"Name": "no"},
        }
        if spec.get("runtimeClassName"):
            kwargs["runtime"] = self.runtime_classes[spec["runtimeClassName"]]
        if "memory" in limits:
            kwargs["mem_limit"] = quantity_bytes(limits["memory"])
            kwargs["memswap_limit"] = kwargs["mem_limit"]
        if "cpu" in limits:
            kwargs["nano_cpus"] = cpu_nanos(limits["cpu"])
        if key not in self.api.store["pods"] or self.api.store["pods"][key]["metadata"].get(
            "deletionTimestamp"
        ):
            return
        try:
            cid, ip = await asyncio.to_thread(self._start_container, c["image"], kwargs)
        except Exception as exc:  # the runtime could not start it: the pod fails, as in a kubelet
            self.api.event(ns, name, "Failed", f"Error: {exc}")
            terminated = {"exitCode": 128, "reason": "StartError", "message": str(exc)[:300]}
            self.api.update_status(
                key,
                phase="Failed",
                containerStatuses=[container_status(c, {"terminated": terminated})],
            )
            return
        self.containers[f"{ns}/{name}"] = cid
        if key not in self.api.store["pods"]:  # deleted meanwhile: the terminator missed it
            await asyncio.to_thread(self.engine.api.remove_container, cid, force=True)
            return
        started = now_rfc3339()
        self.api.update_status(
            key,
            phase="Running",
            podIP=ip,
            podIPs=[{"ip": ip}],
            hostIP="127.0.0.1",
            startTime=started,
            conditions=[condition("PodScheduled", "True"), condition("Ready", "True")],
            containerStatuses=[
                container_status(
                    c,
                    {"running": {"startedAt": started}},
                    imageID=str(image.get("Id", "")),
                    containerID=f"docker://{cid}",
                    ready=True,
                    started=True,
                )
            ],
        )

    def _start_container(self, image: str, kwargs: dict[str, Any]) -> tuple[str, str]:
        container = self.engine.containers.create(image, **kwargs)
        try:
            container.start()
            info = self.engine.api.inspect_container(container.id)
            return container.id, info["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        except BaseException:
            self.engine.api.remove_container(container.id, force=True)
            raise

    async def terminate(self, key: tuple[str, str], grace: int) -> None:
        cid = self.containers.pop(f"{key[0]}/{key[1]}", None)
        if cid is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.engine.api.stop, cid, timeout=grace)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.engine.api.remove_container, cid, force=True)
        self.api.drop("pods", key)

    def own_containers(self) -> list[str]:
        rows = self.engine.api.containers(all=True, filters={"label": f"{FAKE_LABEL}={self.id}"})
        return [r["Id"] for r in rows]

    async def run(self) -> None:
        """Container states → pod phases, every 0.2 s (one list call for all pods)."""
        while True:
            await asyncio.sleep(0.2)
            try:
                rows = await asyncio.to_thread(
                    self.engine.api.containers,
                    all=True,
                    filters={"label": f"{FAKE_LABEL}={self.id}"},
                )
            except Exception:
                continue
            alive = {r["Id"]: r for r in rows}
            for pod_key, cid in list(self.containers.items()):
                ns, name = pod_key.split("/", 1)
                pod = self.api.store["pods"].get((ns, name))
                if pod is None or pod["status"].get("phase") != "Running":
                    continue
                row = alive.get(cid)
                if row is not None and row.get("State") not in ("exited", "dead"):
                    continue
                code = 137
                if row is not None:
                    with contextlib.suppress(Exception):
                        info = await asyncio.to_thread(self.engine.api.inspect_container, cid)
                        code = int(info["State"]["ExitCode"])
                cs = dict(pod["status"]["containerStatuses"][0])
                cs.update(
                    ready=False,
                    started=False,
                    state={
                        "terminated": {
                            "exitCode": code,
                            "reason": "Completed" if code == 0 else "Error",
                            "finishedAt": now_rfc3339(),
                            "containerID": f"docker://{cid}",
                        }
                    },
                )
                self.api.update_status(
                    (ns, name),
                    phase="Succeeded" if code == 0 else "Failed",
                    conditions=[condition("PodScheduled", "True"), condition("Ready", "False")],
                    containerStatuses=[cs],
                )


def quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"([0-9]+)(k|M|G|Ki|Mi|Gi)?", q)
    if not m:
        raise ValueError(f"quantity {q!r} is not whole bytes")
    return int(m.group(1)) * SIZE[m.group(2) or ""]


def cpu_nanos(q: str) -> int:
    return int(q[:-1]) * 10**6 if q.endswith("m") else int(float(q) * 10**9)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def container_status(container: Json, state: Json, **fields: Any) -> Json:
    """A pod's status of `container` in `state` (not ready unless `fields` say so)."""
    status: Json = {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        **fields,
    }
    status["state"] = state
    return status


def condition(kind: str, state: str, reason: str = "", message: str = "") -> Json:
    out = {"type": kind, "status": state, "lastTransitionTime": now_rfc3339()}
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    return out
