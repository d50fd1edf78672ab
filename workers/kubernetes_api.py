"""The Kubernetes API as the kubernetes runtime uses it: JSON verbs on one namespace, bounded.

The client is `kubernetes_asyncio`: aiohttp-based like the rest of sessionpool, typed models,
kubeconfig (exec plugins, OIDC, contexts) and in-cluster loading with token refresh, maintained
since 2017 and used by kopf. The official client's `kubernetes.aio` is only months old and its
36.0.0 release overwrote this very package (kubernetes-client/python #2583); it can replace this
one when it has settled. Only this module and `workers/kubernetes.py` import the SDK.

Bodies go out and come back as plain JSON (`_preload_content=False`): the objects are built in
`workers/podspec.py`, and reading a pod's status needs no model. Every call is bounded by
`k8s_api_timeout_s`; a watch by a server-side timeout and a read timeout just above it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig
from kubernetes_asyncio.config.config_exception import ConfigException

from router.errors import SandboxRuntimeError
from router.settings import Settings

Json = dict[str, Any]
WATCH_S = 60  # the server ends each watch after this; the caller re-opens it
# What every pod watch asks for besides its selector and resourceVersion: events as raw JSON
# lines, BOOKMARKs included, ended by the server after WATCH_S.
WATCH = {
    "watch": True,
    "allow_watch_bookmarks": True,
    "timeout_seconds": WATCH_S,
    "_preload_content": False,
}
# resource → (API group attribute, the SDK's name for one of it)
RESOURCES = {
    "pods": ("core", "pod"),
    "secrets": ("core", "secret"),
    "events": ("core", "event"),
    "networkpolicies": ("net", "network_policy"),
}


class KubeError(SandboxRuntimeError):
    """The API answered with an error status (or not at all: `api_status` 0).

    `api_status` is the Kubernetes API's HTTP status; `status` stays the error tree's (500).
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.api_status = status
        self.reason = reason


class KubeApi:
    """Create/read/replace/delete/list on one namespace, and watches of its pods."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.namespace = settings.k8s_namespace
        self.timeout_s = settings.k8s_api_timeout_s
        self.host = ""
        self._api: Any = None
        self._groups: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._watches: set[aiohttp.ClientResponse] = set()
        self._closed = False

    async def open(self) -> None:
        """Load the configuration and make the client, once.

        Raises:
            SandboxRuntimeError: no usable configuration (kubeconfig, context, in-cluster).
        """
        if self._api is not None:
            return
        async with self._lock:
            if self._api is not None:
                return
            s = self.settings
            cfg = kclient.Configuration()
            try:
                if not s.k8s_kubeconfig and not s.k8s_context and _in_cluster():
                    kconfig.load_incluster_config(client_configuration=cfg)
                else:
                    # Bounded too: a kubeconfig's exec plugin (cloud login) may hang.
                    async with asyncio.timeout(self.timeout_s):
                        await kconfig.load_kube_config(
                            config_file=s.k8s_kubeconfig or None,
                            context=s.k8s_context or None,
                            client_configuration=cfg,
                            persist_config=False,
                        )
            except (ConfigException, OSError, TimeoutError) as exc:
                raise SandboxRuntimeError(f"kubernetes configuration: {_text(exc)}") from exc
            api = kclient.ApiClient(cfg)
            self._groups = {"core": kclient.CoreV1Api(api), "net": kclient.NetworkingV1Api(api)}
            self.host = str(cfg.host)
            self._api = api

    async def create(self, resource: str, body: Json) -> Json:
        return await self._call("create", resource, self.namespace, body)

    async def read(self, resource: str, name: str) -> Json:
        return await self._call("read", resource, name, self.namespace)

    async def replace(self, resource: str, name: str, body: Json) -> Json:
        return await self._call("replace", resource, name, self.namespace, body)

    async def delete(self, resource: str, name: str, **options: Any) -> Json:
        return await self._call("delete", resource, name, self.namespace, **options)

    async def list(self, resource: str, **selectors: str) -> Json:
        return await self._call("list", resource, self.namespace, **selectors)

    async def watch_pods(self, selector: str, version: str) -> AsyncIterator[tuple[str, Json]]:
        """(type, pod) from `version` on, until the server ends the watch or we close.
        BOOKMARKs come through too: only their resourceVersion means anything.

        Raises:
            KubeError: the watch failed; status 410 when `version` is too old.
        """
        await self.open()
        try:
            resp = await asyncio.wait_for(
                self._groups["core"].list_namespaced_pod(
                    self.namespace,
                    label_selector=selector,
                    resource_version=version,
                    _request_timeout=(self.timeout_s, WATCH_S + self.timeout_s),
                    **WATCH,
                ),
                self.timeout_s,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(0, "", f"watch: {_text(exc)}") from exc
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
                if kind in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK") and "metadata" in obj:
                    yield kind, obj
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            if not self._closed:
                raise KubeError(0, "", f"watch: {_text(exc)}") from exc
        finally:
            self._watches.discard(resp)
            resp.close()

    async def close(self) -> None:
        """End open watches (their iterators finish) and the connection pool."""
        self._closed = True
        for resp in list(self._watches):
            resp.close()
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def _call(self, verb: str, resource: str, *args: Any, **kwargs: Any) -> Json:
        """One API call and its JSON body, bounded by `k8s_api_timeout_s`.

        Raises:
            KubeError: an error status, or no answer in time (status 0).
        """
        await self.open()
        group, singular = RESOURCES[resource]
        fn = getattr(self._groups[group], f"{verb}_namespaced_{singular}")
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
            raise KubeError(0, "", f"kubernetes API: {_text(exc)}") from exc
        if not 200 <= resp.status < 300:
            raise _error(resp.status, raw)
        body: Json = orjson.loads(raw) if raw else {}
        return body


def _in_cluster() -> bool:
    """In a pod (the service account's token is mounted), as the SDK's in-cluster loader sees it."""
    with contextlib.suppress(OSError), open(kconfig.incluster_config.SERVICE_TOKEN_FILENAME):
        return True
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


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
