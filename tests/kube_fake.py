"""A Kubernetes API server in the test process, whose stand-in kubelet runs real containers.

It implements exactly what `workers/kubernetes.py` uses, with the API's semantics: namespaced
create/get/list/delete of pods, and create/get/replace/delete of Secrets and NetworkPolicies;
label selectors; one resourceVersion counter; `watch=true` streams of ADDED/MODIFIED/DELETED
(synthetic ADDED without a version, replay from a version, `410 Gone` as an ERROR event once
the version is compacted away); Status bodies for 401/404/409/410/422; events for a pod.

Every object a client sends is read into the client library's typed model (V1Pod, V1Secret,
V1NetworkPolicy) and written back: a field the model does not know, a missing required field or
a bad name, label or quantity is refused with 422 as the real API would, and recorded in
`rejected` so a test can assert there were none.

The kubelet: each scheduled pod becomes a container on the local Docker engine (image, command,
args, env with `secretKeyRef` resolved, cpu/memory limits, dropped capabilities,
no-new-privileges, read-only root, `emptyDir` as a size-limited tmpfs, hostname = pod name) on a
bridge network of its own; the pod's IP is the container's, its phase and container state follow
the container (running, terminated with its exit code, gone). A node selector that does not
match `node_labels` leaves the pod Pending and Unschedulable; a missing image or Secret leaves
it waiting with ErrImagePull or CreateContainerConfigError, with a Warning event, as a kubelet
reports them. NetworkPolicies are stored and validated, not enforced (that is the CNI's job).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from kubernetes_asyncio import client as kclient

Json = dict[str, Any]
FAKE_LABEL = "io.sessionpool.fake-kube"
MODELS = {"pods": "V1Pod", "secrets": "V1Secret", "networkpolicies": "V1NetworkPolicy"}
KINDS = {"pods": "Pod", "secrets": "Secret", "networkpolicies": "NetworkPolicy", "events": "Event"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
SIZE = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


class Invalid(Exception):
    """An object the API server refuses (422)."""


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str, **details: Any) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    }
    return web.json_response(body, status=code)


def parse_selector(raw: str) -> list[tuple[str, str, str]]:
    """`a=b,c!=d,e,!f` → [(key, op, value)] (set-based `in`/`notin` are not used here)."""
    out = []
    for term in filter(None, (t.strip() for t in raw.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            out.append((k.strip(), "!=", v.strip()))
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            out.append((k.strip(), "=", v.strip()))
        elif term.startswith("!"):
            out.append((term[1:], "!", ""))
        else:
            out.append((term, "exists", ""))
    return out


def matches(labels: dict[str, str], selector: list[tuple[str, str, str]]) -> bool:
    for key, op, value in selector:
        have = labels.get(key)
        if (
            (op == "=" and have != value)
            or (op == "!=" and have == value)
            or (op == "exists" and have is None)
            or (op == "!" and have is not None)
        ):
            return False
    return True


def quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"([0-9]+)(k|M|G|Ki|Mi|Gi)?", q)
    if not m:
        raise Invalid(f"quantity {q!r} is not whole bytes")
    return int(m.group(1)) * SIZE[m.group(2) or ""]


def cpu_nanos(q: str) -> int:
    return int(q[:-1]) * 10**6 if q.endswith("m") else int(float(q) * 10**9)


class FakeKube:
    """The API server (aiohttp on 127.0.0.1, port 0) plus a kubelet over the Docker engine."""

    def __init__(self, engine: Any, *, token: str = "", node_labels: dict[str, str] | None = None):
        self.engine = engine
        self.id = uuid.uuid4().hex[:8]
        self.token = token or uuid.uuid4().hex  # the workers' credential: its calls are recorded
        self.admin_token = uuid.uuid4().hex  # the test's own (kubectl's) credential
        self.runtime_classes: dict[str, str] = {}  # RuntimeClass name → Docker runtime
        self.node_labels = {"kubernetes.io/hostname": "fake-node", **(node_labels or {})}
        self.store: dict[str, dict[tuple[str, str], Json]] = {k: {} for k in KINDS}
        self.rv = 0
        self.history: list[tuple[int, str, str, Json]] = []  # (rv, kind, type, object)
        self.floor = 0  # versions below this are compacted away (410)
        self.queues: set[asyncio.Queue[tuple[int, str, str, Json]]] = set()
        self.rejected: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (RBAC verb, resource) of each call
        self.unserved: list[str] = []
        self.containers: dict[str, str] = {}  # pod key "ns/name" → container id
        self.network = f"fk-{self.id}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._models: Any = None
        app = web.Application(middlewares=[self._auth])
        for base, kinds in (
            ("/api/v1/namespaces/{ns}", ("pods", "secrets", "events")),
            ("/apis/networking.k8s.io/v1/namespaces/{ns}", ("networkpolicies",)),
        ):
            for kind in kinds:
                app.router.add_route("*", f"{base}/{kind}", self._collection)
                app.router.add_route("*", f"{base}/{kind}/{{name}}", self._item)
        app.router.add_route("*", "/{tail:.*}", self._unserved)
        self.server = TestServer(app, host="127.0.0.1")

    # Setup ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def start(self) -> FakeKube:
        self._models = kclient.ApiClient()
        await asyncio.to_thread(
            self.engine.api.create_network,
            self.network,
            driver="bridge",
            labels={FAKE_LABEL: self.id},
        )
        await self.server.start_server()
        self._spawn(self._kubelet_loop())
        return self

    def write_kubeconfig(self, path: Path, namespace: str = "default", admin: bool = False) -> Path:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [
                {"name": "fake", "user": {"token": self.admin_token if admin else self.token}}
            ],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_bytes(orjson.dumps(doc))  # JSON is YAML
        return path

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for q in list(self.queues):
            q.put_nowait((0, "", "END", {}))
        await self.server.close()
        for cid in await asyncio.to_thread(self._own_containers):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.engine.api.remove_container, cid, force=True)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.engine.api.remove_network, self.network)
        if self._models is not None:
            await self._models.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # What tests look at -----------------------------------------------------------------------

    def objects(self, kind: str, selector: str = "") -> list[Json]:
        sel = parse_selector(selector)
        return [o for o in self.store[kind].values() if matches(_labels(o), sel)]

    def compact(self) -> None:
        """Forget every version so far and end open watches: resuming one gets 410 Gone."""
        self.floor = self.rv + 1
        for q in list(self.queues):
            q.put_nowait((0, "", "END", {}))

    # HTTP -------------------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        credential = request.headers.get("Authorization")
        if credential not in (f"Bearer {self.token}", f"Bearer {self.admin_token}"):
            return status(401, "Unauthorized", "Unauthorized")
        if credential == f"Bearer {self.token}":
            self.requests.append((_verb(request), self._kind(request)))
        resp: web.StreamResponse = await handler(request)
        return resp

    async def _unserved(self, request: web.Request) -> web.Response:
        self.unserved.append(f"{request.method} {request.path}")
        return status(404, "NotFound", "the server could not find the requested resource")

    def _kind(self, request: web.Request) -> str:
        name = request.match_info.get("name")
        parts = request.path.rstrip("/").split("/")
        return parts[-2] if name else parts[-1]

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        kind, ns = self._kind(request), request.match_info["ns"]
        if request.method == "POST" and kind != "events":
            try:
                body = await request.json()
                obj = self._admit(kind, ns, body)
            except (Invalid, ValueError) as exc:
                return self._invalid(kind, exc)
            key = (ns, obj["metadata"]["name"])
            rc = obj.get("spec", {}).get("runtimeClassName") if kind == "pods" else None
            if rc and rc not in self.runtime_classes:
                return status(
                    403,
                    "Forbidden",
                    f'pods "{key[1]}" is forbidden: pod rejected: RuntimeClass "{rc}" not found',
                    name=key[1],
                    kind=kind,
                )
            if key in self.store[kind]:
                return status(
                    409,
                    "AlreadyExists",
                    f'{kind} "{key[1]}" already exists',
                    name=key[1],
                    kind=kind,
                )
            obj["metadata"].update(
                uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), namespace=ns
            )
            if kind == "pods":
                obj["status"] = {"phase": "Pending", "qosClass": _qos(obj)}
            self._put(kind, obj, "ADDED")
            if kind == "pods":
                self._spawn(self._run_pod(key))
            return web.json_response(obj, status=201)
        if request.method != "GET":
            return status(405, "MethodNotAllowed", f"{request.method} is not supported")
        # Go's strconv.ParseBool, as the API server reads it (the SDK sends "True").
        if request.query.get("watch") in ("1", "t", "T", "true", "TRUE", "True"):
            return await self._watch(request, kind, ns)
        sel = parse_selector(request.query.get("labelSelector", ""))
        fields = dict(
            f.split("=", 1) for f in request.query.get("fieldSelector", "").split(",") if "=" in f
        )
        items = [
            o
            for (o_ns, _), o in sorted(self.store[kind].items())
            if o_ns == ns and matches(_labels(o), sel) and _fields_match(o, fields)
        ]
        return web.json_response(
            {
                "kind": f"{KINDS[kind]}List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def _item(self, request: web.Request) -> web.StreamResponse:
        kind, ns, name = self._kind(request), request.match_info["ns"], request.match_info["name"]
        current = self.store[kind].get((ns, name))
        if current is None:
            return status(404, "NotFound", f'{kind} "{name}" not found', name=name, kind=kind)
        if request.method == "GET":
            return web.json_response(current)
        if request.method == "PUT" and kind != "pods":
            try:
                body = await request.json()
                obj = self._admit(kind, ns, body)
            except (Invalid, ValueError) as exc:
                return self._invalid(kind, exc)
            if obj["metadata"]["name"] != name:
                return self._invalid(kind, Invalid("metadata.name: does not match the URL"))
            wanted = obj["metadata"].get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                return status(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {kind} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                    name=name,
                    kind=kind,
                )
            for field in ("uid", "creationTimestamp", "namespace"):
                obj["metadata"][field] = current["metadata"][field]
            self._put(kind, obj, "MODIFIED")
            return web.json_response(obj)
        if request.method == "DELETE":
            if kind != "pods":
                self._drop(kind, (ns, name))
                return web.json_response(
                    {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {}}
                )
            grace = int(request.query.get("gracePeriodSeconds", "30"))
            if not current["metadata"].get("deletionTimestamp"):
                current["metadata"]["deletionTimestamp"] = now_rfc3339()
                current["metadata"]["deletionGracePeriodSeconds"] = grace
                self._put(kind, current, "MODIFIED")
                self._spawn(self._terminate((ns, name), grace))
            return web.json_response(current)
        return status(405, "MethodNotAllowed", f"{request.method} is not supported")

    def _invalid(self, kind: str, exc: Exception) -> web.Response:
        self.rejected.append(f"{kind}: {exc}")
        return status(422, "Invalid", f"{KINDS[kind]} is invalid: {exc}", kind=kind)

    async def _watch(self, request: web.Request, kind: str, ns: str) -> web.StreamResponse:
        sel = parse_selector(request.query.get("labelSelector", ""))
        since = request.query.get("resourceVersion", "")
        timeout_s = float(request.query.get("timeoutSeconds", "1800"))
        queue: asyncio.Queue[tuple[int, str, str, Json]] = asyncio.Queue()
        self.queues.add(queue)  # before the replay: nothing falls in between
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)

        async def send(kind_: str, obj: Json) -> None:
            await resp.write(orjson.dumps({"type": kind_, "object": obj}) + b"\n")

        def wanted(rv: int, k: str, obj: Json) -> bool:
            meta = obj.get("metadata", {})
            return k == kind and meta.get("namespace") == ns and matches(_labels(obj), sel)

        try:
            if since in ("", "0"):
                last = self.rv
                for (o_ns, _), obj in sorted(self.store[kind].items()):
                    if o_ns == ns and matches(_labels(obj), sel):
                        await send("ADDED", obj)
            elif int(since) < self.floor:
                await send(
                    "ERROR",
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": f"too old resource version: {since} ({self.floor})",
                        "reason": "Expired",
                        "code": 410,
                    },
                )
                return resp
            else:
                last = int(since)
                for rv, k, typ, obj in list(self.history):
                    if rv > last and wanted(rv, k, obj):
                        await send(typ, obj)
                        last = rv
            deadline = asyncio.get_running_loop().time() + timeout_s
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    rv, k, typ, obj = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
                if typ == "END":
                    break
                if rv > last and wanted(rv, k, obj):
                    await send(typ, obj)
                    last = rv
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.queues.discard(queue)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    # Store ------------------------------------------------------------------------------------

    def _put(self, kind: str, obj: Json, typ: str) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        self.store[kind][key] = obj
        self._publish(kind, typ, obj)

    def _drop(self, kind: str, key: tuple[str, str]) -> None:
        obj = self.store[kind].pop(key, None)
        if obj is not None:
            self.rv += 1
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
            self._publish(kind, "DELETED", obj)

    def _publish(self, kind: str, typ: str, obj: Json) -> None:
        snapshot = orjson.loads(orjson.dumps(obj))
        self.history.append((self.rv, kind, typ, snapshot))
        del self.history[:-5000]
        for q in self.queues:
            q.put_nowait((self.rv, kind, typ, snapshot))

    def _admit(self, kind: str, ns: str, body: Any) -> Json:
        """Validate as the API server would, through the client's typed model.

        Raises:
            Invalid: the message names the field.
        """
        if not isinstance(body, dict):
            raise Invalid("body: must be an object")
        try:
            model = self._models._ApiClient__deserialize(body, MODELS[kind])
        except (ValueError, TypeError) as exc:
            raise Invalid(str(exc)) from None
        back = self._models.sanitize_for_serialization(model)
        for path in _differences(body, back):
            raise Invalid(f"{path}: unknown or mistyped field")
        meta = body.get("metadata") or {}
        name = meta.get("name", "")
        if not DNS_SUBDOMAIN.match(name) or len(name) > 253:
            raise Invalid(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
        if meta.get("namespace", ns) != ns:
            raise Invalid("metadata.namespace: does not match the request")
        for key, value in (meta.get("labels") or {}).items():
            prefix, _, label = key.rpartition("/")
            if not LABEL_NAME.match(label) or (prefix and not DNS_SUBDOMAIN.match(prefix)):
                raise Invalid(f"metadata.labels: {key!r} is not a label key")
            if not LABEL_VALUE.match(value):
                raise Invalid(f"metadata.labels: {value!r} is not a label value")
        if kind == "pods":
            _check_pod(body)
        if kind == "secrets":
            for k, v in (body.get("data") or {}).items():
                try:
                    base64.b64decode(v, validate=True)
                except ValueError:
                    raise Invalid(f"data[{k}]: not base64") from None
        obj: Json = orjson.loads(orjson.dumps(body))
        obj["metadata"]["namespace"] = ns
        obj.setdefault("apiVersion", "v1")
        obj.setdefault("kind", KINDS[kind])
        if kind == "secrets":
            obj.setdefault("type", "Opaque")
        return obj

    # Kubelet ----------------------------------------------------------------------------------

    def _event(self, ns: str, pod: str, reason: str, message: str) -> None:
        obj = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{pod}.{uuid.uuid4().hex[:12]}", "namespace": ns},
            "involvedObject": {"kind": "Pod", "name": pod, "namespace": ns},
            "reason": reason,
            "message": message,
            "type": "Warning",
            "count": 1,
        }
        self._put("events", obj, "ADDED")

    def _update_status(self, key: tuple[str, str], **changes: Any) -> Json | None:
        pod = self.store["pods"].get(key)
        if pod is None:
            return None
        pod = orjson.loads(orjson.dumps(pod))
        pod["status"].update(changes)
        self._put("pods", pod, "MODIFIED")
        return pod

    async def _run_pod(self, key: tuple[str, str]) -> None:
        ns, name = key
        pod = self.store["pods"][key]
        spec = pod["spec"]
        c = spec["containers"][0]
        wanted = spec.get("nodeSelector") or {}
        if any(self.node_labels.get(k) != v for k, v in wanted.items()):
            message = (
                "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
            )
            self._event(ns, name, "FailedScheduling", message)
            self._update_status(
                key, conditions=[_cond("PodScheduled", "False", "Unschedulable", message)]
            )
            return
        pod = self.store["pods"][key]
        pod = orjson.loads(orjson.dumps(pod))
        pod["spec"]["nodeName"] = "fake-node"
        pod["status"]["conditions"] = [_cond("PodScheduled", "True")]
        self._put("pods", pod, "MODIFIED")

        def waiting(reason: str, message: str) -> None:
            self._event(ns, name, "Failed", message)
            self._update_status(
                key,
                containerStatuses=[
                    {
                        "name": c["name"],
                        "image": c["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"waiting": {"reason": reason, "message": message}},
                    }
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
            secret = self.store["secrets"].get((ns, ref["name"]))
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
        limits = (c.get("resources") or {}).get("limits") or {}
        vols = {v["name"]: v for v in spec.get("volumes") or []}
        tmpfs = {}
        for m in c.get("volumeMounts") or []:
            size = quantity_bytes(vols[m["name"]]["emptyDir"].get("sizeLimit", "64Mi"))
            tmpfs[m["mountPath"]] = f"rw,nosuid,nodev,size={size}"
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
            "restart_policy": {"Name": "no"},
        }
        if spec.get("runtimeClassName"):
            kwargs["runtime"] = self.runtime_classes[spec["runtimeClassName"]]
        if "memory" in limits:
            kwargs["mem_limit"] = quantity_bytes(limits["memory"])
            kwargs["memswap_limit"] = kwargs["mem_limit"]
        if "cpu" in limits:
            kwargs["nano_cpus"] = cpu_nanos(limits["cpu"])
        if key not in self.store["pods"] or self.store["pods"][key]["metadata"].get(
            "deletionTimestamp"
        ):
            return
        try:
            cid, ip = await asyncio.to_thread(self._start_container, c["image"], kwargs)
        except Exception as exc:  # the runtime could not start it: the pod fails, as in a kubelet
            self._event(ns, name, "Failed", f"Error: {exc}")
            terminated = {"exitCode": 128, "reason": "StartError", "message": str(exc)[:300]}
            self._update_status(
                key,
                phase="Failed",
                containerStatuses=[
                    {
                        "name": c["name"],
                        "image": c["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            )
            return
        self.containers[f"{ns}/{name}"] = cid
        if key not in self.store["pods"]:  # deleted meanwhile: the terminator missed it
            await asyncio.to_thread(self.engine.api.remove_container, cid, force=True)
            return
        started = now_rfc3339()
        self._update_status(
            key,
            phase="Running",
            podIP=ip,
            podIPs=[{"ip": ip}],
            hostIP="127.0.0.1",
            startTime=started,
            conditions=[_cond("PodScheduled", "True"), _cond("Ready", "True")],
            containerStatuses=[
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": str(image.get("Id", "")),
                    "containerID": f"docker://{cid}",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": started}},
                }
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

    async def _terminate(self, key: tuple[str, str], grace: int) -> None:
        cid = self.containers.pop(f"{key[0]}/{key[1]}", None)
        if cid is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.engine.api.stop, cid, timeout=grace)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.engine.api.remove_container, cid, force=True)
        self._drop("pods", key)

    def _own_containers(self) -> list[str]:
        rows = self.engine.api.containers(all=True, filters={"label": f"{FAKE_LABEL}={self.id}"})
        return [r["Id"] for r in rows]

    async def _kubelet_loop(self) -> None:
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
                pod = self.store["pods"].get((ns, name))
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
                self._update_status(
                    (ns, name),
                    phase="Succeeded" if code == 0 else "Failed",
                    conditions=[_cond("PodScheduled", "True"), _cond("Ready", "False")],
                    containerStatuses=[cs],
                )


def forbidden(requests: list[tuple[str, str]], rules: list[Json]) -> list[str]:
    """The calls a Role's rules (core and networking groups, no resourceNames) would refuse."""
    allowed = {
        (verb, res) for r in rules for verb in r.get("verbs", []) for res in r.get("resources", [])
    }
    return sorted({f"{v} {res}" for v, res in requests if (v, res) not in allowed})


def _verb(request: web.Request) -> str:
    """The RBAC verb a request needs, as the API server's authorizer names it."""
    item = "name" in request.match_info
    if request.method == "GET":
        if item:
            return "get"
        return "watch" if request.query.get("watch") in ("1", "true", "True") else "list"
    return {"POST": "create", "PUT": "update", "DELETE": "delete"}.get(request.method, "?")


def _labels(obj: Json) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("labels") or {})


def _fields_match(obj: Json, fields: dict[str, str]) -> bool:
    for path, want in fields.items():
        value: Any = obj
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value != want:
            return False
    return True


def _cond(kind: str, state: str, reason: str = "", message: str = "") -> Json:
    out = {"type": kind, "status": state, "lastTransitionTime": now_rfc3339()}
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    return out


def _qos(pod: Json) -> str:
    res = [c.get("resources") or {} for c in pod["spec"]["containers"]]
    if all(
        r.get("limits", {}).get(k) and r.get("requests", {}).get(k) == r["limits"][k]
        for r in res
        for k in ("cpu", "memory")
    ):
        return "Guaranteed"
    return "Burstable" if any(r for r in res) else "BestEffort"


def _differences(sent: Any, back: Any, path: str = "") -> Iterator[str]:
    """Where `sent` has something the typed model did not keep (unknown or mistyped field)."""
    if isinstance(sent, dict):
        if not isinstance(back, dict):
            yield path or "."
            return
        for k, v in sent.items():
            if v is None:
                continue
            if k not in back:
                yield f"{path}.{k}".lstrip(".")
            else:
                yield from _differences(v, back[k], f"{path}.{k}")
    elif isinstance(sent, list):
        if not isinstance(back, list) or len(back) != len(sent):
            yield path
            return
        for i, (a, b) in enumerate(zip(sent, back, strict=True)):
            yield from _differences(a, b, f"{path}[{i}]")
    elif sent != back:
        yield path


def _check_pod(body: Json) -> None:
    """What the API's pod validation refuses that the model alone does not."""
    spec = body.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        raise Invalid("spec.containers: Required value")
    vols = {v.get("name") for v in spec.get("volumes") or []}
    for i, c in enumerate(containers):
        at = f"spec.containers[{i}]"
        if not DNS_LABEL.match(c.get("name", "")):
            raise Invalid(f"{at}.name: must be a DNS-1123 label")
        if not c.get("image"):
            raise Invalid(f"{at}.image: Required value")
        for part in ("limits", "requests"):
            for res, q in ((c.get("resources") or {}).get(part) or {}).items():
                if not QUANTITY.match(str(q)):
                    raise Invalid(f"{at}.resources.{part}[{res}]: {q!r} is not a quantity")
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in vols:
                raise Invalid(f"{at}.volumeMounts.name: Not found: {m.get('name')!r}")
        for e in c.get("env") or []:
            if ("value" in e) == ("valueFrom" in e):
                raise Invalid(f"{at}.env[{e.get('name')}]: exactly one of value and valueFrom")
    if spec.get("restartPolicy") not in (None, "Always", "OnFailure", "Never"):
        raise Invalid("spec.restartPolicy: Unsupported value")
