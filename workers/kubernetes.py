"""The `kubernetes` runtime: each sandbox is a hardened pod in one sandbox namespace.

The client is `kubernetes_asyncio`: aiohttp-based like the rest of sessionpool, typed models,
kubeconfig (exec plugins, OIDC, contexts) and in-cluster loading with token refresh, maintained
since 2017 and used by kopf. The official client's `kubernetes.aio` is only months old and its
36.0.0 release overwrote this very package (kubernetes-client/python #2583); it can replace this
one when it has settled. Only this module imports the SDK. Every call is bounded: requests by
`k8s_api_timeout_s`, watches by a server-side timeout and a read timeout just above it.

Objects (built in `workers/podspec.py`): one pod per sandbox, named after its sandbox id and
labelled with scope, pool, sandbox id and template version like a docker container; per pool a
Secret for secret-backed env vars, a pull Secret for registry credentials and a NetworkPolicy;
per scope a deny-all NetworkPolicy under them. The router dials the pod IP and target port
directly: no Service per sandbox.

Lifecycle: `create` returns once the pod has an IP and its container runs; a pod that cannot
be scheduled within `k8s_schedule_timeout_s`, whose image cannot be pulled, or whose container
cannot be made fails creation with the reason from its status and events (the replenisher backs
off). `destroy` deletes with a one-second grace; when a pool's last pod goes, so do the pool's
Secrets and policy. `exits` follows a watch, resumes from the last resourceVersion and lists
again after `410 Gone`, reporting what ended in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig
from kubernetes_asyncio.config.config_exception import ConfigException

from router.limits import LimitPolicy
from router.settings import Settings
from workers import podspec
from workers.podspec import Json, SpecError
from workers.runtime import (
    LABEL_POOL,
    LABEL_SANDBOX,
    LABEL_SCOPE,
    LABEL_VERSION,
    Exit,
    Handle,
    Observed,
    RuntimeError_,
    SandboxSpec,
)

log = logging.getLogger("sessionpool.kubernetes")
WATCH_S = 60  # the server ends each watch after this; it is re-opened from the last version
RETRY_MAX_S = 5.0
# Waiting reasons a pod does not recover from by itself (restartPolicy Never).
FATAL_WAITING = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}


class KubeError(RuntimeError_):
    """The API answered with an error status (or not at all: status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason


class KubernetesRuntime:
    """Sandboxes as pods of one namespace, through the Kubernetes API."""

    name = "kubernetes"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.namespace = settings.k8s_namespace
        self._limits = LimitPolicy.from_settings(settings)  # no sandbox pod is unlimited
        self.timeout_s = settings.k8s_api_timeout_s
        self._api: kclient.ApiClient | None = None
        self._core: Any = None
        self._net: Any = None
        self._api_lock = asyncio.Lock()
        self._ensured: dict[tuple[str, str], str] = {}  # (scope, pool) → version in place
        self._deny: set[str] = set()  # scopes whose deny-all policy is in place
        self._watches: set[aiohttp.ClientResponse] = set()
        self._closed = asyncio.Event()

    # Runtime ----------------------------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> Handle:
        """Create the sandbox's pod; return its name and `<pod IP>:<target port>` once it runs.

        Raises:
            RuntimeError_: the API refused, the pod did not schedule, pull or start in time.
        """
        try:
            body = podspec.pod(
                spec,
                self.namespace,
                self.settings.k8s_ephemeral_storage_bytes,
                self._limits.resolve(spec.pool),
            )
        except SpecError as exc:
            raise RuntimeError_(f"pool {spec.pool.name}: {exc}") from exc
        name = body["metadata"]["name"]
        try:
            await self._ensure_pool_objects(spec)
            core = await self._client()
            try:
                await self._call(core.create_namespaced_pod, self.namespace, body)
            except KubeError as exc:
                if exc.status != 409:
                    raise
                await self._adopt(name, spec)  # a retried create: that pod is ours
            ip = await self._wait_running(name, spec)
        except BaseException as exc:
            # Cancelled, failed or timed out: the pod must not outlive its create.
            if isinstance(exc, RuntimeError_):
                self._ensured.pop((spec.scope, spec.pool.name), None)
            with contextlib.suppress(RuntimeError_):
                await asyncio.shield(self._delete_pod(name))
            if isinstance(exc, KubeError):
                raise RuntimeError_(f"pool {spec.pool.name}: pod {name}: {exc}") from exc
            raise
        return Handle(name, f"{ip}:{spec.pool.target_port}")

    async def destroy(self, container: str) -> None:
        """Delete a sandbox's pod with a short grace; when it was its pool's last, the pool's
        Secrets and policy go too. A pod already gone is not an error."""
        core = await self._client()
        try:
            pod = await self._call(core.read_namespaced_pod, container, self.namespace)
        except KubeError as exc:
            if exc.status == 404:
                return
            raise RuntimeError_(f"destroy {container}: {exc}") from exc
        labels = pod["metadata"].get("labels") or {}
        scope, pool = labels.get(LABEL_SCOPE, ""), labels.get(LABEL_POOL, "")
        self._ensured.pop((scope, pool), None)  # re-checked by the next create
        try:
            await self._delete_pod(container)
            if scope and pool:
                await self._collect_pool(scope, pool)
        except KubeError as exc:
            raise RuntimeError_(f"destroy {container}: {exc}") from exc

    async def list(self, scope: str) -> list[Observed]:
        """Every pod of this scope; one being deleted or that ended counts as not running."""
        try:
            pods = await self._list(podspec.scope_selector(scope))
        except KubeError as exc:
            raise RuntimeError_(f"list: {exc}") from exc
        return [_observed(p) for p in pods["items"]]

    async def exits(self, scope: str) -> AsyncIterator[Exit]:
        """Pods of this scope that end (container terminated, Failed/Succeeded, deleted)."""
        selector = podspec.scope_selector(scope)
        known: dict[str, tuple[Exit, bool]] = {}  # pod → (its exit, already reported)
        listed = False
        version = ""
        delay = 0.2
        while not self._closed.is_set():
            try:
                if not version:
                    found = await self._list(selector)
                    version = found["metadata"]["resourceVersion"]
                    now = {p["metadata"]["name"]: p for p in found["items"]}
                    # After a gap (410, errors), report what ended meanwhile. At the first
                    # list, pods that already ended are the reconciler's business.
                    for name, pod in now.items():
                        ex, told = known.get(name, (_exit(pod), not listed))
                        if _ended(pod) and not told:
                            yield ex
                    for name, (ex, told) in known.items():
                        if name not in now and not told:
                            yield ex
                    known = {n: (_exit(p), _ended(p)) for n, p in now.items()}
                    listed = True
                async for kind, pod in self._watch(selector, version):
                    version = pod["metadata"].get("resourceVersion") or version
                    if kind == "BOOKMARK":
                        continue
                    name = pod["metadata"]["name"]
                    ex, told = known.get(name, (_exit(pod), False))
                    ended = kind == "DELETED" or _ended(pod)
                    if ended and not told:
                        yield ex
                    if kind == "DELETED":
                        known.pop(name, None)
                    else:
                        known[name] = (ex, told or ended)
                delay = 0.2
            except RuntimeError_ as exc:  # KubeError, or no usable configuration
                if isinstance(exc, KubeError) and exc.status == 410:  # compacted: list again
                    log.info("watch: %s; listing again", exc.reason)
                    version = ""
                    continue
                log.warning("watch: %s", exc)
                await self._pause(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def engine_id(self) -> str:
        """`kubernetes:<API server>/<namespace>`: every worker of a cluster shares it."""
        await self._client()
        assert self._api is not None
        return f"kubernetes:{self._api.configuration.host}/{self.namespace}"

    async def close(self) -> None:
        """End every `exits()` iterator and the API connection."""
        self._closed.set()
        for resp in list(self._watches):
            resp.close()
        if self._api is not None:
            await self._api.close()
            self._api = None

    # Pool objects -----------------------------------------------------------------------------

    async def _ensure_pool_objects(self, spec: SandboxSpec) -> None:
        """The scope's deny-all policy, and the pool's Secrets and policy at its version."""
        pool = spec.pool
        key = (spec.scope, pool.name)
        if self._ensured.get(key) == pool.version:
            return
        ns = self.namespace
        await self._client()
        if spec.scope not in self._deny:
            await self._upsert("networkpolicies", podspec.deny_policy(spec.scope, ns))
            self._deny.add(spec.scope)
        if spec.env:
            await self._upsert("secrets", podspec.env_secret(spec, ns))
        registry = pool.registry
        if registry is not None:
            password = pool.secrets.get(registry.password_secret_ref, "")
            body = podspec.pull_secret(spec, ns, registry.server, registry.username, password)
            await self._upsert("secrets", body)
        cidrs = self.settings.k8s_cluster_cidrs.split(",")
        ctl = self.settings.k8s_control_namespace
        await self._upsert("networkpolicies", podspec.pool_policy(spec, ns, ctl, cidrs))
        self._ensured[key] = pool.version

    async def _upsert(self, kind: str, body: Json) -> None:
        """Create, or replace when it exists at another template version."""
        name = body["metadata"]["name"]
        create, read, replace = self._verbs(kind)
        try:
            await self._call(create, self.namespace, body)
            return
        except KubeError as exc:
            if exc.status != 409:
                raise
        current = await self._call(read, name, self.namespace)
        if current["metadata"].get("labels") == body["metadata"]["labels"]:
            return
        # Optimistic concurrency: a replica replacing it at the same moment makes this 409.
        body = {**body, "metadata": {**body["metadata"], **_version_of(current)}}
        try:
            await self._call(replace, name, self.namespace, body)
        except KubeError as exc:
            if exc.status != 409:
                raise

    def _verbs(self, kind: str) -> tuple[Callable[..., Any], ...]:
        if kind == "secrets":
            c = self._core
            return c.create_namespaced_secret, c.read_namespaced_secret, c.replace_namespaced_secret
        n = self._net
        return (
            n.create_namespaced_network_policy,
            n.read_namespaced_network_policy,
            n.replace_namespaced_network_policy,
        )

    async def _collect_pool(self, scope: str, pool: str) -> None:
        """Remove a pool's Secrets and policy once no pod of it is left (pool deleted)."""
        selector = f"{LABEL_SCOPE}={scope},{LABEL_POOL}={pool}"
        left = await self._list(selector)
        if any(not p["metadata"].get("deletionTimestamp") for p in left["items"]):
            return
        base = podspec.base_name(scope, pool)
        deletes = [
            (self._core.delete_namespaced_secret, f"{base}-env"),
            (self._core.delete_namespaced_secret, f"{base}-pull"),
            (self._net.delete_namespaced_network_policy, base),
        ]
        for delete, name in deletes:
            try:
                await self._call(delete, name, self.namespace)
            except KubeError as exc:
                if exc.status != 404:
                    raise

    # Pods -------------------------------------------------------------------------------------

    async def _adopt(self, name: str, spec: SandboxSpec) -> None:
        pod = await self._call(self._core.read_namespaced_pod, name, self.namespace)
        labels = pod["metadata"].get("labels") or {}
        if (
            labels.get(LABEL_SCOPE) != spec.scope
            or labels.get(LABEL_SANDBOX) != spec.sandbox_id
            or pod["metadata"].get("deletionTimestamp")
            or _ended(pod)
        ):
            raise RuntimeError_(f"pool {spec.pool.name}: pod {name} exists and is not reusable")

    async def _wait_running(self, name: str, spec: SandboxSpec) -> str:
        """Poll the pod until it runs with an IP; fail fast on what it cannot recover from."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        interval = 0.05
        while True:
            pod = await self._call(self._core.read_namespaced_pod, name, self.namespace)
            status = pod.get("status") or {}
            state = _container_state(pod)
            if status.get("podIP") and "running" in state:
                return str(status["podIP"])
            waited = loop.time() - started
            why = ""
            if _ended(pod):
                term = state.get("terminated") or {}
                why = (
                    f"ended before it was ready ({status.get('phase')}, "
                    f"{term.get('reason', '')} exit code {term.get('exitCode', '?')})"
                )
            elif (state.get("waiting") or {}).get("reason") in FATAL_WAITING:
                waiting = state["waiting"]
                why = f"{waiting['reason']}: {waiting.get('message', '')}"
            elif waited > self.settings.k8s_schedule_timeout_s and not _scheduled(pod):
                why = f"not scheduled after {waited:.0f} s: {_condition(pod, 'PodScheduled')}"
            elif waited > self.settings.k8s_start_timeout_s:
                why = f"not running after {waited:.0f} s ({status.get('phase')})"
            if why:
                events = await self._events(name)
                raise RuntimeError_(
                    f"pool {spec.pool.name}: pod {name} {why}"
                    + (f"; events: {events}" if events else "")
                )
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 1.0)

    async def _events(self, name: str) -> str:
        """The pod's warning events, oldest first, for an error message ("" if unreadable)."""
        try:
            found = await self._call(
                self._core.list_namespaced_event,
                self.namespace,
                field_selector=f"involvedObject.name={name}",
            )
        except KubeError:
            return ""
        items = [e for e in found.get("items", []) if e.get("type") == "Warning"]
        return "; ".join(f"{e.get('reason')}: {e.get('message')}" for e in items[-3:])

    async def _delete_pod(self, name: str) -> None:
        core = await self._client()
        try:
            await self._call(
                core.delete_namespaced_pod,
                name,
                self.namespace,
                grace_period_seconds=podspec.GRACE_S,
            )
        except KubeError as exc:
            if exc.status != 404:
                raise

    async def _list(self, selector: str) -> Json:
        core = await self._client()
        return await self._call(core.list_namespaced_pod, self.namespace, label_selector=selector)

    async def _watch(self, selector: str, version: str) -> AsyncIterator[tuple[str, Json]]:
        """One watch from `version` until the server ends it (WATCH_S) or we close.

        Raises:
            KubeError: the watch failed; status 410 when `version` is too old.
        """
        core = await self._client()
        try:
            resp = await asyncio.wait_for(
                core.list_namespaced_pod(
                    self.namespace,
                    label_selector=selector,
                    resource_version=version,
                    watch=True,
                    allow_watch_bookmarks=True,
                    timeout_seconds=WATCH_S,
                    _preload_content=False,
                    _request_timeout=(self.timeout_s, WATCH_S + self.timeout_s),
                ),
                self.timeout_s,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(0, "", f"watch: {str(exc) or type(exc).__name__}") from exc
        self._watches.add(resp)
        try:
            if resp.status != 200:
                raise _error(resp.status, await resp.read())
            async for line in resp.content:
                if not line.strip():
                    continue
                event = orjson.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise KubeError(
                        int(obj.get("code", 0)), obj.get("reason", ""), obj.get("message", "")
                    )
                # A BOOKMARK carries only a resourceVersion to resume from.
                if kind in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK") and "metadata" in obj:
                    yield kind, obj
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            if not self._closed.is_set():
                raise KubeError(0, "", f"watch: {str(exc) or type(exc).__name__}") from exc
        finally:
            self._watches.discard(resp)
            resp.close()

    # Client -----------------------------------------------------------------------------------

    async def _client(self) -> Any:
        """The core API, after loading the configuration on first use.

        Raises:
            RuntimeError_: no usable configuration (kubeconfig, context, in-cluster).
        """
        if self._core is not None:
            return self._core
        async with self._api_lock:
            if self._core is None:
                s = self.settings
                cfg = kclient.Configuration()
                try:
                    if not s.k8s_kubeconfig and not s.k8s_context and _in_cluster():
                        kconfig.load_incluster_config(client_configuration=cfg)
                    else:
                        await kconfig.load_kube_config(
                            config_file=s.k8s_kubeconfig or None,
                            context=s.k8s_context or None,
                            client_configuration=cfg,
                            persist_config=False,
                        )
                except (ConfigException, OSError) as exc:
                    raise RuntimeError_(f"kubernetes configuration: {exc}") from exc
                self._api = kclient.ApiClient(cfg)
                self._net = kclient.NetworkingV1Api(self._api)
                self._core = kclient.CoreV1Api(self._api)
        return self._core

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Json:
        """One API call, its JSON body, bounded by `k8s_api_timeout_s`.

        Raises:
            KubeError: an error status, or no answer in time (status 0).
        """
        await self._client()
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await fn(
                    *args, _preload_content=False, _request_timeout=self.timeout_s, **kwargs
                )
                try:
                    raw = await resp.read()
                finally:
                    resp.release()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(0, "", f"kubernetes API: {str(exc) or type(exc).__name__}") from exc
        if not 200 <= resp.status < 300:
            raise _error(resp.status, raw)
        body: Json = orjson.loads(raw) if raw else {}
        return body

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)


def _in_cluster() -> bool:
    """In a pod (the service account's token is mounted), as the SDK's in-cluster loader sees it."""
    try:
        with open(kconfig.incluster_config.SERVICE_TOKEN_FILENAME):
            return True
    except OSError:
        return False


def _error(status: int, raw: bytes) -> KubeError:
    """A Status body (`{"kind": "Status", "reason": …, "message": …}`) as an error."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    return KubeError(status, str(doc.get("reason", "")), str(doc.get("message", raw[:200])))


def _version_of(obj: Json) -> Json:
    return {"resourceVersion": obj["metadata"].get("resourceVersion", "")}


def _container_state(pod: Json) -> Json:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return dict(statuses[0].get("state") or {}) if statuses else {}


def _ended(pod: Json) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase in ("Failed", "Succeeded") or "terminated" in _container_state(pod)


def _scheduled(pod: Json) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "PodScheduled" and c.get("status") == "True" for c in conds)


def _condition(pod: Json, kind: str) -> str:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
    return "no condition reported"


def _exit(pod: Json) -> Exit:
    labels = pod["metadata"].get("labels") or {}
    return Exit(pod["metadata"]["name"], labels.get(LABEL_POOL, ""), labels.get(LABEL_SANDBOX, ""))


def _observed(pod: Json) -> Observed:
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    created = meta.get("creationTimestamp") or ""
    try:
        created_s = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        created_s = time.time()
    return Observed(
        container=meta["name"],
        pool=labels.get(LABEL_POOL, ""),
        sandbox_id=labels.get(LABEL_SANDBOX, ""),
        version=labels.get(LABEL_VERSION, ""),
        # Pending (being scheduled, pulled, started) counts as alive, as "created" does in
        # Docker; a pod being deleted or that ended does not.
        running=not meta.get("deletionTimestamp") and not _ended(pod),
        created_s=created_s,
    )
