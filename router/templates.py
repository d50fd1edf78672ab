"""A pool's container template: image, command, environment, resources, ingress and probes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from router.fields import Fields

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|K|M|G|T)?$")
MEMORY_UNITS = {
    None: 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
}
CODE_INTERPRETER_PORT = 6000
# Types whose sessions run one of our images and speak ACA's executions and files API: the
# router answers their session-management paths itself and may serve an MCP endpoint for them.
BUILTIN_TYPES = frozenset({"PythonLTS", "Shell"})


@dataclass(frozen=True, slots=True)
class Probe:
    """An ACA `SessionProbe`: `Startup` gates readiness, `Liveness` ends unhealthy sessions."""

    type: str
    port: int
    path: str | None = None  # None → tcpSocket probe
    scheme: str = "http"
    headers: tuple[tuple[str, str], ...] = ()
    initial_delay_s: float = 0.0
    period_s: float = 10.0
    timeout_s: float = 1.0
    failure_threshold: int = 3


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    value: str | None = None
    secret_ref: str | None = None


@dataclass(frozen=True, slots=True)
class Registry:
    """`registryCredentials`: where the image comes from and the secret holding the password."""

    server: str
    username: str
    password_secret_ref: str


@dataclass(frozen=True, slots=True)
class Template:
    """What every sandbox of a pool is made from (its one container)."""

    image: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[EnvVar, ...]
    cpu: float | None
    memory_bytes: int | None
    storage_bytes: int | None  # resources.ephemeralStorage: the writable space's size
    target_port: int
    probes: tuple[Probe, ...]
    registry: Registry | None = None


def parse_template(
    props: Fields, container_type: str, secrets: dict[str, str], builtin_image: str
) -> Template:
    """`customContainerTemplate` of `props`, validated.

    A PythonLTS or Shell pool without containers gets `builtin_image`, written into
    `props.data` so that the stored definition keeps this image if the default changes later.

    Raises:
        InvalidPoolError: the message names the offending field.
    """
    template = props.obj("customContainerTemplate")
    if container_type in BUILTIN_TYPES and not template.get("containers"):
        template.data = {
            **template.data,
            "containers": [{"name": "main", "image": builtin_image}],
            "ingress": template.get("ingress") or {"targetPort": CODE_INTERPRETER_PORT},
        }
        props.data["customContainerTemplate"] = template.data
    containers = template.get("containers", [])
    if not isinstance(containers, list) or len(containers) != 1:
        raise template.error("containers", "exactly one container is required")
    where = f"{template.where('containers')}[0]"
    if not isinstance(containers[0], dict):
        raise template.error("containers[0]", "must be an object")
    c = Fields(containers[0], where)
    image = c.get("image")
    if not isinstance(image, str) or not image or any(ch.isspace() for ch in image):
        raise c.error("image", "required, a non-empty image reference")
    command, args, env = c.strings("command"), c.strings("args"), _env(c, secrets)
    cpu, memory, storage = _resources(c.obj("resources", empty_if_falsy=True))
    ingress = template.obj("ingress")
    port = ingress.get("targetPort")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ingress.error("targetPort", "required, an integer 1-65535")
    probes = _probes(c)
    if container_type in BUILTIN_TYPES and not probes:
        probes = (
            Probe(type="Startup", port=port, path="/health", period_s=0.1, failure_threshold=600),
        )
    registry = _registry(template, secrets)
    return Template(image, command, args, env, cpu, memory, storage, port, probes, registry)


def _env(c: Fields, secrets: dict[str, str]) -> tuple[EnvVar, ...]:
    out: list[EnvVar] = []
    for at, item in c.items("env"):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise Fields({}, at).error("name", "required")
        e = Fields(item, at)
        name: str = item["name"]
        if not ENV_NAME.match(name):
            raise e.error("name", f"{name!r} is not a valid variable name")
        if any(v.name == name for v in out):
            raise e.error("name", f"{name!r} appears twice")
        value, ref = e.get("value"), e.get("secretRef")
        if (value is None) == (ref is None):
            raise e.error(None, "exactly one of value and secretRef")
        if value is not None and not isinstance(value, str):
            raise e.error("value", "must be a string")
        if ref is not None and (not isinstance(ref, str) or ref not in secrets):
            raise e.error("secretRef", f"no secret named {ref!r}")
        out.append(EnvVar(name, value, ref))
    return tuple(out)


def _resources(res: Fields) -> tuple[float | None, int | None, int | None]:
    cpu = res.number("cpu", 0.05, 64)
    return cpu, _size(res, "memory", 6 << 20), _size(res, "ephemeralStorage", 1 << 20)


def _size(res: Fields, key: str, least: int) -> int | None:
    raw = res.get(key)
    if raw is None:
        return None
    m = MEMORY.match(str(raw).strip()) if isinstance(raw, str | int) else None
    if not m:
        raise res.error(key, "must look like 512Mi or 1Gi")
    size = float(m.group(1)) * MEMORY_UNITS[m.group(2)]  # inf for 400 digits: compare first
    if not least <= size <= 1 << 40:
        raise res.error(key, f"must be {least >> 20}Mi-1Ti")
    return int(size)


def _probes(c: Fields) -> tuple[Probe, ...]:
    out: list[Probe] = []
    for at, item in c.items("probes"):
        if not isinstance(item, dict):
            raise Fields({}, at).error(None, "must be an object")
        p = Fields(item, at)
        kind = p.choice("type", ("Startup", "Liveness"), "", "must be Startup or Liveness")
        if any(q.type == kind for q in out):
            raise p.error("type", f"only one {kind} probe is allowed")
        if (p.get("httpGet") is None) == (p.get("tcpSocket") is None):
            raise p.error(None, "exactly one of httpGet and tcpSocket")
        kind_key = "httpGet" if p.get("httpGet") is not None else "tcpSocket"
        action = p.obj(kind_key)
        port = action.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise action.error("port", "required, an integer 1-65535")
        path: str | None = None
        scheme = "http"
        headers: tuple[tuple[str, str], ...] = ()
        if kind_key == "httpGet":
            path, scheme, headers = _http_get(action)
        out.append(
            Probe(
                type=kind,
                port=port,
                path=path,
                scheme=scheme,
                headers=headers,
                initial_delay_s=p.integer("initialDelaySeconds", 0, 0, 60),
                period_s=p.integer("periodSeconds", 10, 1, 240),
                timeout_s=p.integer("timeoutSeconds", 1, 1, 240),
                failure_threshold=p.integer("failureThreshold", 3, 1, 10),
            )
        )
    return tuple(out)


def _http_get(action: Fields) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    path = action.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/"):
        raise action.error("path", "must start with /")
    scheme = str(action.get("scheme", "HTTP")).lower()
    if scheme not in ("http", "https"):
        raise action.error("scheme", "must be HTTP or HTTPS")
    hdrs: Any = action.get("httpHeaders") or []
    if not isinstance(hdrs, list) or not all(
        isinstance(h, dict) and isinstance(h.get("name"), str) and isinstance(h.get("value"), str)
        for h in hdrs
    ):
        raise action.error("httpHeaders", "list of {name, value}")
    return path, scheme, tuple((h["name"], h["value"]) for h in hdrs)


def _registry(template: Fields, secrets: dict[str, str]) -> Registry | None:
    if template.get("registryCredentials") is None:
        return None
    raw = template.obj("registryCredentials")
    server, user = raw.get("server"), raw.get("username")
    for key, value in (("server", server), ("username", user)):
        if not isinstance(value, str) or not value or any(ch.isspace() for ch in value):
            raise raw.error(key, "required, a non-empty string")
    ref = raw.get("passwordSecretRef")
    if not isinstance(ref, str) or ref not in secrets:
        raise raw.error("passwordSecretRef", f"no secret named {ref!r}")
    return Registry(str(server), str(user), ref)
