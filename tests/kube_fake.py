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

The kubelet (`tests/kube_kubelet.py`) runs each scheduled pod as a real container on the
local Docker engine. NetworkPolicies are stored and validated, not enforced (the CNI's job).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from kubernetes_asyncio import client as kclient

from tests.kube_kubelet import Kubelet, now_rfc3339

Json = dict[str, Any]
MODELS = {"pods": "V1Pod", "secrets": "V1Secret", "networkpolicies": "V1NetworkPolicy"}
KINDS = {"pods": "Pod", "secrets": "Secret", "networkpolicies": "NetworkPolicy", "events": "Event"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


class Invalid(Exception):
    """An object the API server refuses (422)."""


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


class FakeKube:
    """The API server (aiohttp on 127.0.0.1, port 0) plus a kubelet over the Docker engine."""

    def __init__(self, engine: Any, *, token: str = "", node_labels: dict[str, str] | None = None):
        self.engine = engine
        self.id = uuid.uuid4().hex[:8]
        self.token = token or uuid.uuid4().hex  # the workers' credential: its calls are recorded
        self.admin_token = uuid.uuid4().hex  # the test's own (kubectl's) credential
        self.store: dict[str, dict[tuple[str, str], Json]] = {k: {} for k in KINDS}
        self.rv = 0
        self.history: list[tuple[int, str, str, Json]] = []  # (rv, kind, type, object)
        self.floor = 0  # versions below this are compacted away (410)
        self.queues: set[asyncio.Queue[tuple[int, str, str, Json]]] = set()
        self.rejected: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (RBAC verb, resource) of each call
        self.unserved: list[str] = []
        self.answering = asyncio.Event()  # cleared: every request hangs (an API server stall)
        self.answering.set()
        self.kubelet = Kubelet(self, engine, node_labels or {})
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
        await self.kubelet.start()
        await self.server.start_server()
        self.spawn(self.kubelet.run())
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
        await self.kubelet.close()
        if self._models is not None:
            await self._models.close()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # What tests look at -----------------------------------------------------------------------

    @property
    def containers(self) -> dict[str, str]:
        """Pod key "ns/name" → the container id the kubelet runs it as."""
        return self.kubelet.containers

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
        await self.answering.wait()
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
            if rc and rc not in self.kubelet.runtime_classes:
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
            self.put(kind, obj, "ADDED")
            if kind == "pods":
                self.spawn(self.kubelet.run_pod(key))
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
            self.put(kind, obj, "MODIFIED")
            return web.json_response(obj)
        if request.method == "DELETE":
            if kind != "pods":
                self.drop(kind, (ns, name))
                return web.json_response(
                    {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {}}
                )
            grace = int(request.query.get("gracePeriodSeconds", "30"))
            if not current["metadata"].get("deletionTimestamp"):
                current["metadata"]["deletionTimestamp"] = now_rfc3339()
                current["metadata"]["deletionGracePeriodSeconds"] = grace
                self.put(kind, current, "MODIFIED")
                self.spawn(self.kubelet.terminate((ns, name), grace))
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

    def put(self, kind: str, obj: Json, typ: str) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        self.store[kind][key] = obj
        self._publish(kind, typ, obj)

    def drop(self, kind: str, key: tuple[str, str]) -> None:
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

    # For the kubelet ----------------------------------------------------------------------------

    def event(self, ns: str, pod: str, reason: str, message: str) -> None:
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
        self.put("events", obj, "ADDED")

    def update_status(self, key: tuple[str, str], **changes: Any) -> Json | None:
        pod = self.store["pods"].get(key)
        if pod is None:
            return None
        pod = orjson.loads(orjson.dumps(pod))
        pod["status"].update(changes)
        self.put("pods", pod, "MODIFIED")
        return pod


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
