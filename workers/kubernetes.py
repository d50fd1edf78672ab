"""The `kubernetes` runtime: each sandbox is a hardened pod in one sandbox namespace.

Objects (built in `workers/podspec.py`): one pod per sandbox, named after its sandbox id and
labelled with scope, pool, sandbox id and template version like a docker container; per pool a
Secret for secret-backed env vars, a pull Secret for registry credentials and a NetworkPolicy;
per scope a deny-all NetworkPolicy under them. The router dials the pod IP and target port
directly: no Service per sandbox. API calls go through `workers/kubernetes_api.py` (the SDK,
every call bounded).

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
from collections.abc import AsyncIterator
from datetime import datetime

from router.errors import SandboxRuntimeError
from router.limits import LimitPolicy
from router.settings import Settings
from router.waiting import wait_set
from workers import podspec
from workers.kubernetes_api import KubeApi, KubeError
from workers.podspec import Json, SpecError
from workers.runtime import (
    LABEL_POOL,
    LABEL_SCOPE,
    Exit,
    Handle,
    Observed,
    SandboxSpec,
)

log = logging.getLogger("sessionpool.kubernetes")
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


class KubernetesRuntime:
    """Sandboxes as pods of one namespace, through the Kubernetes API."""

    name = "kubernetes"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.namespace = settings.k8s_namespace
        self.api = KubeApi(settings)
        self.limits = LimitPolicy.from_settings(settings)
        self._ensured: dict[tuple[str, str], str] = {}  # (scope, pool) → version in place
        self._deny: set[str] = set()  # scopes whose deny-all policy is in place
        self._closed = asyncio.Event()

    # Runtime ----------------------------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> Handle:
        """Create the sandbox's pod; return its name and `<pod IP>:<target port>` once it runs.

        Raises:
            SandboxRuntimeError: the API refused, the pod did not schedule, pull or start in time.
        """
        try:
            body = podspec.pod(spec, self.namespace, self.limits.resolve(spec.pool))
        except SpecError as exc:
            raise SandboxRuntimeError(f"pool {spec.pool.name}: {exc}") from exc
        name = body["metadata"]["name"]
        try:
            await self._ensure_pool_objects(spec)
            try:
                await self.api.create("pods", body)
            except KubeError as exc:
                if exc.api_status != 409:
                    raise
                await self._adopt(name, spec)  # a retried create: that pod is ours
            ip = await self._wait_running(name, spec)
        except BaseException as exc:
            # Cancelled, failed or timed out: the pod must not outlive its create.
            if isinstance(exc, SandboxRuntimeError):
                self._ensured.pop((spec.scope, spec.pool.name), None)
            with contextlib.suppress(SandboxRuntimeError):
                await asyncio.shield(self._delete_pod(name))
            if isinstance(exc, KubeError):
                raise SandboxRuntimeError(f"pool {spec.pool.name}: pod {name}: {exc}") from exc
            raise
        return Handle(name, f"{ip}:{spec.pool.target_port}")

    async def destroy(self, container: str) -> None:
        """Delete a sandbox's pod with a short grace; when it was its pool's last, the pool's
        Secrets and policy go too. A pod already gone is not an error."""
        try:
            pod = await self.api.read("pods", container)
        except KubeError as exc:
            if exc.api_status == 404:
                return
            raise SandboxRuntimeError(f"destroy {container}: {exc}") from exc
        labels = pod["metadata"].get("labels") or {}
        scope, pool = labels.get(LABEL_SCOPE, ""), labels.get(LABEL_POOL, "")
        self._ensured.pop((scope, pool), None)  # re-checked by the next create
        try:
            await self._delete_pod(container)
            if scope and pool:
                await self._collect_pool(scope, pool)
        except KubeError as exc:
            raise SandboxRuntimeError(f"destroy {container}: {exc}") from exc

    async def list(self, scope: str) -> list[Observed]:
        """Every pod of this scope; one being deleted or that ended counts as not running."""
        try:
            pods = await self.api.list("pods", label_selector=podspec.scope_selector(scope))
        except SandboxRuntimeError as exc:
            raise SandboxRuntimeError(f"list: {exc}") from exc
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
                    found = await self.api.list("pods", label_selector=selector)
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
                async for kind, pod in self.api.watch_pods(selector, version):
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
            except SandboxRuntimeError as exc:  # KubeError, or no usable configuration
                if isinstance(exc, KubeError) and exc.api_status == 410:  # compacted: list again
                    log.info("watch: %s; listing again", exc.reason)
                    version = ""
                    continue
                log.warning("watch: %s", exc)
                await self._pause(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def engine_id(self) -> str:
        """`kubernetes:<API server>/<namespace>`: every worker of a cluster shares it."""
        await self.api.open()
        return f"kubernetes:{self.api.host}/{self.namespace}"

    async def close(self) -> None:
        """End every `exits()` iterator and the API connection."""
        self._closed.set()
        await self.api.close()

    # Pool objects -----------------------------------------------------------------------------

    async def _ensure_pool_objects(self, spec: SandboxSpec) -> None:
        """The scope's deny-all policy, and the pool's Secrets and policy at its version."""
        pool = spec.pool
        key = (spec.scope, pool.name)
        if self._ensured.get(key) == pool.version:
            return
        ns = self.namespace
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

    async def _upsert(self, resource: str, body: Json) -> None:
        """Create, or replace when it exists at another template version."""
        name = body["metadata"]["name"]
        try:
            await self.api.create(resource, body)
            return
        except KubeError as exc:
            if exc.api_status != 409:
                raise
        current = await self.api.read(resource, name)
        if current["metadata"].get("labels") == body["metadata"]["labels"]:
            return
        # Optimistic concurrency: a replica replacing it at the same moment makes this 409.
        body = {**body, "metadata": {**body["metadata"], **_version_of(current)}}
        try:
            await self.api.replace(resource, name, body)
        except KubeError as exc:
            if exc.api_status != 409:
                raise

    async def _collect_pool(self, scope: str, pool: str) -> None:
        """Remove a pool's Secrets and policy once no pod of it is left (pool deleted)."""
        selector = f"{LABEL_SCOPE}={scope},{LABEL_POOL}={pool}"
        left = await self.api.list("pods", label_selector=selector)
        if any(not p["metadata"].get("deletionTimestamp") for p in left["items"]):
            return
        base = podspec.base_name(scope, pool)
        for resource, name in (
            ("secrets", f"{base}-env"),
            ("secrets", f"{base}-pull"),
            ("networkpolicies", base),
        ):
            try:
                await self.api.delete(resource, name)
            except KubeError as exc:
                if exc.api_status != 404:
                    raise

    # Pods -------------------------------------------------------------------------------------

    async def _adopt(self, name: str, spec: SandboxSpec) -> None:
        pod = await self.api.read("pods", name)
        labels = pod["metadata"].get("labels") or {}
        if not spec.owns(labels) or pod["metadata"].get("deletionTimestamp") or _ended(pod):
            raise SandboxRuntimeError(
                f"pool {spec.pool.name}: pod {name} exists and is not reusable"
            )

    async def _wait_running(self, name: str, spec: SandboxSpec) -> str:
        """Poll the pod until it runs with an IP; fail fast on what it cannot recover from."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        interval = 0.05
        while True:
            pod = await self.api.read("pods", name)
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
                raise SandboxRuntimeError(
                    f"pool {spec.pool.name}: pod {name} {why}"
                    + (f"; events: {events}" if events else "")
                )
            await asyncio.sleep(interval)
            # Quick while a pod usually starts (a warm pool's refill waits on it), gentler on
            # the API server once it is slow (pulling, scheduling).
            interval = min(interval * 1.5, 0.2 if waited < 10 else 1.0)

    async def _events(self, name: str) -> str:
        """The pod's warning events, oldest first, for an error message ("" if unreadable)."""
        try:
            found = await self.api.list("events", field_selector=f"involvedObject.name={name}")
        except KubeError:
            return ""
        items = [e for e in found.get("items", []) if e.get("type") == "Warning"]
        return "; ".join(f"{e.get('reason')}: {e.get('message')}" for e in items[-3:])

    async def _delete_pod(self, name: str) -> None:
        try:
            await self.api.delete("pods", name, grace_period_seconds=podspec.GRACE_S)
        except KubeError as exc:
            if exc.api_status != 404:
                raise

    async def _pause(self, seconds: float) -> None:
        await wait_set(self._closed, seconds)


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
    return Exit.of(pod["metadata"]["name"], labels)


def _observed(pod: Json) -> Observed:
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    created = meta.get("creationTimestamp") or ""
    try:
        created_s = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        created_s = time.time()
    return Observed.of(
        meta["name"],
        labels,
        # Pending (being scheduled, pulled, started) counts as alive, as "created" does in
        # Docker; a pod being deleted or that ended does not.
        running=not meta.get("deletionTimestamp") and not _ended(pod),
        created_s=created_s,
    )
