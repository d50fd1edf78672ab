"""The pool model: ACA ARM `sessionPools` properties parsed, defaulted and validated."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.errors import InvalidPoolError

POOL_NAME = re.compile(r"^[a-z][a-z0-9-]{2,62}$")
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
CONTAINER_TYPES = {"CustomContainer", "PythonLTS", "Shell"}
# Types whose sessions run one of our images and speak ACA's executions and files API: the
# router answers their session-management paths itself and may serve an MCP endpoint for them.
BUILTIN_TYPES = frozenset({"PythonLTS", "Shell"})
OCI_RUNTIMES = {"runc", "runsc", "kata", "kata-runtime", "io.containerd.kata.v2"}
CODE_INTERPRETER_IMAGE = "sessionpool/code-interpreter:dev"
CODE_INTERPRETER_PORT = 6000
SHELL_IMAGE = "sessionpool/shell:dev"
MCP_SETTINGS_KEYS = frozenset({"isMCPServerEnabled", "mcpServerEndpoint"})
TOLERATION_FIELDS = {"key", "operator", "value", "effect", "tolerationSeconds"}


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
class Placement:
    """Where a sandbox may run (kubernetes runtime only): `sandboxConfiguration.nodeSelector`
    and `.tolerations`, passed to the pod as they are."""

    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Pool:
    """One validated pool; `version` changes whenever what a new sandbox looks like changes."""

    name: str
    container_type: str
    max_sessions: int
    ready_instances: int
    lifecycle: str
    cooldown_s: int
    max_alive_s: int
    image: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[EnvVar, ...]
    cpu: float | None
    memory_bytes: int | None
    storage_bytes: int | None  # resources.ephemeralStorage: the writable space's size
    target_port: int
    probes: tuple[Probe, ...]
    egress_enabled: bool
    oci_runtime: str | None
    pids_limit: int | None  # None: the operator's default (router/limits.py), like cpu/memory
    tenant_binding: bool
    mcp_enabled: bool
    secrets: dict[str, str] = field(repr=False)
    properties: dict[str, Any] = field(repr=False)
    version: str = ""
    placement: Placement = Placement()
    registry: Registry | None = None

    def probe(self, kind: str) -> Probe | None:
        return next((p for p in self.probes if p.type == kind), None)

    def public_properties(self) -> dict[str, Any]:
        """The definition as stored, secret values removed (never echoed)."""
        props = orjson.loads(orjson.dumps(self.properties))
        if "secrets" in props:
            props["secrets"] = [{"name": s["name"]} for s in props["secrets"]]
        return dict(props)

    def dumps(self) -> bytes:
        """What the store keeps: the full definition, secrets included, and its version."""
        return orjson.dumps(
            {"name": self.name, "version": self.version, "properties": self.properties}
        )

    @classmethod
    def loads(cls, raw: bytes | str) -> Pool:
        doc = orjson.loads(raw)
        return parse_pool(doc["name"], {"properties": doc["properties"]})


def parse_pool(
    name: str,
    body: Any,
    *,
    code_interpreter_image: str = CODE_INTERPRETER_IMAGE,
    shell_image: str = SHELL_IMAGE,
) -> Pool:
    """Validate an ARM-shaped pool definition (`{"properties": {...}}`) and apply defaults.

    `code_interpreter_image` and `shell_image` are what `PythonLTS` and `Shell` pools that name
    no container get.

    Raises:
        InvalidPoolError: the message names the offending field.
    """
    if not isinstance(name, str) or not POOL_NAME.match(name):
        raise InvalidPoolError(f"name: {name!r} must match {POOL_NAME.pattern}")
    if not isinstance(body, dict):
        raise InvalidPoolError("body: must be a JSON object")
    props = body.get("properties", body)
    if not isinstance(props, dict):
        raise InvalidPoolError("properties: must be an object")
    props = orjson.loads(orjson.dumps(props))  # own copy, JSON types only

    ctype = _get(props, "containerType", str, "CustomContainer")
    if ctype not in CONTAINER_TYPES:
        raise InvalidPoolError(
            f"properties.containerType: must be one of {sorted(CONTAINER_TYPES)}"
        )

    scale = _obj(props, "scaleConfiguration")
    max_sessions = _int(
        scale,
        "properties.scaleConfiguration.maxConcurrentSessions",
        "maxConcurrentSessions",
        10,
        1,
        100_000,
    )
    ready = _int(
        scale,
        "properties.scaleConfiguration.readySessionInstances",
        "readySessionInstances",
        5,
        0,
        10_000,
    )

    dyn = _obj(props, "dynamicPoolConfiguration")
    life = _obj(dyn, "lifecycleConfiguration", "dynamicPoolConfiguration.")
    lifecycle = life.get("lifecycleType", dyn.get("executionType", "Timed"))
    if lifecycle not in ("Timed", "OnContainerExit"):
        raise InvalidPoolError(
            "properties.dynamicPoolConfiguration.lifecycleConfiguration"
            ".lifecycleType: must be Timed or OnContainerExit"
        )
    # The older shape keeps the cooldown beside executionType; name the field that was sent.
    legacy = "cooldownPeriodInSeconds" not in life and "cooldownPeriodInSeconds" in dyn
    cooldown = _int(
        dyn if legacy else life,
        "properties.dynamicPoolConfiguration."
        + ("" if legacy else "lifecycleConfiguration.")
        + "cooldownPeriodInSeconds",
        "cooldownPeriodInSeconds",
        300,
        1,
        86_400 * 7,
    )
    max_alive = _int(
        life,
        "properties.dynamicPoolConfiguration.lifecycleConfiguration.maxAlivePeriodInSeconds",
        "maxAlivePeriodInSeconds",
        3600,
        1,
        86_400 * 30,
    )
    if lifecycle == "OnContainerExit" and ctype != "CustomContainer":
        raise InvalidPoolError(
            "properties.dynamicPoolConfiguration.lifecycleConfiguration.lifecycleType: "
            "OnContainerExit needs containerType CustomContainer"
        )

    secrets = _secrets(props)
    template = _obj(props, "customContainerTemplate")
    containers = template.get("containers", [])
    if ctype in BUILTIN_TYPES and not containers:
        # Written into the stored definition: the pool keeps this image even if the
        # router's default changes later.
        default_image = code_interpreter_image if ctype == "PythonLTS" else shell_image
        containers = [{"name": "main", "image": default_image}]
        template = {
            **template,
            "containers": containers,
            "ingress": template.get("ingress") or {"targetPort": CODE_INTERPRETER_PORT},
        }
        props["customContainerTemplate"] = template
    if not isinstance(containers, list) or len(containers) != 1:
        raise InvalidPoolError(
            "properties.customContainerTemplate.containers: exactly one container is required"
        )
    c = containers[0]
    where = "properties.customContainerTemplate.containers[0]"
    if not isinstance(c, dict):
        raise InvalidPoolError(f"{where}: must be an object")
    image = c.get("image")
    if not isinstance(image, str) or not image or any(ch.isspace() for ch in image):
        raise InvalidPoolError(f"{where}.image: required, a non-empty image reference")
    command = _strs(c, "command", where)
    args = _strs(c, "args", where)
    env = _env(c, where, secrets)
    cpu, memory, storage = _resources(c, where)

    ingress = _obj(template, "ingress", "customContainerTemplate.")
    port = ingress.get("targetPort")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidPoolError(
            "properties.customContainerTemplate.ingress.targetPort: required, an integer 1-65535"
        )
    probes = _probes(c, where)
    if ctype in BUILTIN_TYPES and not probes:
        probes = (
            Probe(type="Startup", port=port, path="/health", period_s=0.1, failure_threshold=600),
        )

    net = _obj(props, "sessionNetworkConfiguration")
    status = net.get("status", "EgressDisabled")
    if status not in ("EgressEnabled", "EgressDisabled"):
        raise InvalidPoolError(
            "properties.sessionNetworkConfiguration.status: must be EgressEnabled or EgressDisabled"
        )

    sandbox = _obj(props, "sandboxConfiguration")
    runtime = sandbox.get("runtime")
    if runtime is not None and (not isinstance(runtime, str) or runtime not in OCI_RUNTIMES):
        raise InvalidPoolError(
            f"properties.sandboxConfiguration.runtime: must be one of {sorted(OCI_RUNTIMES)}"
        )
    pids = None
    if sandbox.get("pidsLimit") is not None:
        pids = _int(
            sandbox, "properties.sandboxConfiguration.pidsLimit", "pidsLimit", 0, 16, 65_536
        )
    placement = _placement(sandbox)
    registry = _registry(template, secrets)
    tenant = props.get("tenantBinding", False)
    if not isinstance(tenant, bool):
        raise InvalidPoolError("properties.tenantBinding: must be true or false")
    mcp_enabled = _mcp_settings(props, ctype)

    pool = Pool(
        name=name,
        container_type=ctype,
        max_sessions=max_sessions,
        ready_instances=ready,
        lifecycle=lifecycle,
        cooldown_s=cooldown,
        max_alive_s=max_alive,
        image=image,
        command=command,
        args=args,
        env=env,
        cpu=cpu,
        memory_bytes=memory,
        storage_bytes=storage,
        target_port=port,
        probes=probes,
        egress_enabled=status == "EgressEnabled",
        oci_runtime=runtime,
        pids_limit=pids,
        tenant_binding=tenant,
        mcp_enabled=mcp_enabled,
        secrets=secrets,
        properties=props,
        placement=placement,
        registry=registry,
    )
    # The version covers what a new sandbox is made from, not scale or lifecycle settings.
    fingerprint = orjson.dumps(
        [
            image,
            command,
            args,
            [(e.name, e.value, e.secret_ref) for e in env],
            [secrets.get(e.secret_ref or "") for e in env],
            cpu,
            memory,
            port,
            [p.__repr__() for p in probes],
            status,
            runtime,
            pids,
            storage,
            placement.node_selector,
            placement.tolerations,
            registry
            and (registry.server, registry.username, secrets[registry.password_secret_ref]),
        ],
    )
    object.__setattr__(pool, "version", hashlib.sha256(fingerprint).hexdigest()[:12])
    return pool


def _mcp_settings(props: dict[str, Any], ctype: str) -> bool:
    """`mcpServerSettings.isMCPServerEnabled`; the read-only endpoint a GET shows is dropped,
    so that a definition read with GET can be sent back as it is."""
    mcp = _obj(props, "mcpServerSettings")
    where = "properties.mcpServerSettings"
    for key in mcp:
        if key not in MCP_SETTINGS_KEYS:
            raise InvalidPoolError(f"{where}.{key}: unknown field")
    mcp.pop("mcpServerEndpoint", None)
    enabled = mcp.get("isMCPServerEnabled", False)
    if not isinstance(enabled, bool):
        raise InvalidPoolError(f"{where}.isMCPServerEnabled: must be true or false")
    if enabled and ctype not in BUILTIN_TYPES:
        # ACA ignores the setting here without a word; a silent no-op hides a mistake.
        raise InvalidPoolError(
            f"{where}.isMCPServerEnabled: the platform MCP endpoint runs Python and shell tools "
            f"in sessions of our own images, so it needs containerType PythonLTS or Shell, "
            f"not {ctype}; a custom container can serve MCP itself"
        )
    return enabled


def _placement(sandbox: dict[str, Any]) -> Placement:
    where = "properties.sandboxConfiguration"
    selector = sandbox.get("nodeSelector") or {}
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        raise InvalidPoolError(f"{where}.nodeSelector: must map strings to strings")
    tolerations = sandbox.get("tolerations") or []
    if not isinstance(tolerations, list) or len(tolerations) > 16:
        raise InvalidPoolError(f"{where}.tolerations: must be a list of at most 16")
    for i, t in enumerate(tolerations):
        if not isinstance(t, dict) or not set(t) <= TOLERATION_FIELDS:
            raise InvalidPoolError(
                f"{where}.tolerations[{i}]: an object with only {sorted(TOLERATION_FIELDS)}"
            )
        if t.get("operator", "Equal") not in ("Equal", "Exists"):
            raise InvalidPoolError(f"{where}.tolerations[{i}].operator: Equal or Exists")
        if t.get("effect", "") not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise InvalidPoolError(
                f"{where}.tolerations[{i}].effect: NoSchedule, PreferNoSchedule or NoExecute"
            )
        for key in ("key", "value"):
            if not isinstance(t.get(key, ""), str):
                raise InvalidPoolError(f"{where}.tolerations[{i}].{key}: must be a string")
        seconds = t.get("tolerationSeconds")
        if seconds is not None and (not isinstance(seconds, int) or isinstance(seconds, bool)):
            raise InvalidPoolError(f"{where}.tolerations[{i}].tolerationSeconds: an integer")
    return Placement(tuple(sorted(selector.items())), tuple(tolerations))


def _registry(template: dict[str, Any], secrets: dict[str, str]) -> Registry | None:
    where = "properties.customContainerTemplate.registryCredentials"
    raw = template.get("registryCredentials")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidPoolError(f"{where}: must be an object")
    server, user, ref = raw.get("server"), raw.get("username"), raw.get("passwordSecretRef")
    for key, value in (("server", server), ("username", user)):
        if not isinstance(value, str) or not value or any(ch.isspace() for ch in value):
            raise InvalidPoolError(f"{where}.{key}: required, a non-empty string")
    if not isinstance(ref, str) or ref not in secrets:
        raise InvalidPoolError(f"{where}.passwordSecretRef: no secret named {ref!r}")
    return Registry(str(server), str(user), ref)


def _get(d: dict[str, Any], key: str, typ: type, default: Any) -> Any:
    value = d.get(key, default)
    if not isinstance(value, typ):
        raise InvalidPoolError(f"properties.{key}: must be a {typ.__name__}")
    return value


def _obj(d: dict[str, Any], key: str, parent: str = "") -> dict[str, Any]:
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidPoolError(f"properties.{parent}{key}: must be an object")
    return value


def _int(d: dict[str, Any], path: str, key: str, default: int, lo: int, hi: int) -> int:
    value = d.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidPoolError(f"{path}: must be an integer {lo}-{hi}")
    return value


def _strs(c: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = c.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidPoolError(f"{where}.{key}: must be a list of strings")
    return tuple(value)


def _secrets(props: dict[str, Any]) -> dict[str, str]:
    raw = props.get("secrets") or []
    if not isinstance(raw, list):
        raise InvalidPoolError("properties.secrets: must be a list")
    out: dict[str, str] = {}
    for i, s in enumerate(raw):
        if (
            not isinstance(s, dict)
            or not isinstance(s.get("name"), str)
            or not s["name"]
            or not isinstance(s.get("value"), str)
        ):
            raise InvalidPoolError(f"properties.secrets[{i}]: needs string name and value")
        if s["name"] in out:
            raise InvalidPoolError(f"properties.secrets[{i}].name: {s['name']!r} appears twice")
        out[s["name"]] = s["value"]
    return out


def _env(c: dict[str, Any], where: str, secrets: dict[str, str]) -> tuple[EnvVar, ...]:
    raw = c.get("env") or []
    if not isinstance(raw, list):
        raise InvalidPoolError(f"{where}.env: must be a list")
    out: list[EnvVar] = []
    for i, e in enumerate(raw):
        at = f"{where}.env[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise InvalidPoolError(f"{at}.name: required")
        if not ENV_NAME.match(e["name"]):
            raise InvalidPoolError(f"{at}.name: {e['name']!r} is not a valid variable name")
        if any(v.name == e["name"] for v in out):
            raise InvalidPoolError(f"{at}.name: {e['name']!r} appears twice")
        value, ref = e.get("value"), e.get("secretRef")
        if (value is None) == (ref is None):
            raise InvalidPoolError(f"{at}: exactly one of value and secretRef")
        if value is not None and not isinstance(value, str):
            raise InvalidPoolError(f"{at}.value: must be a string")
        if ref is not None and (not isinstance(ref, str) or ref not in secrets):
            raise InvalidPoolError(f"{at}.secretRef: no secret named {ref!r}")
        out.append(EnvVar(e["name"], value, ref))
    return tuple(out)


def _resources(c: dict[str, Any], where: str) -> tuple[float | None, int | None, int | None]:
    res = c.get("resources") or {}
    if not isinstance(res, dict):
        raise InvalidPoolError(f"{where}.resources: must be an object")
    cpu = res.get("cpu")
    if cpu is not None and (
        not isinstance(cpu, int | float) or isinstance(cpu, bool) or not 0.05 <= cpu <= 64
    ):
        raise InvalidPoolError(f"{where}.resources.cpu: must be a number 0.05-64")
    memory = _size(res, "memory", f"{where}.resources.memory", 6 << 20)
    storage = _size(res, "ephemeralStorage", f"{where}.resources.ephemeralStorage", 1 << 20)
    return (float(cpu) if cpu is not None else None), memory, storage


def _size(res: dict[str, Any], key: str, field: str, least: int) -> int | None:
    raw = res.get(key)
    if raw is None:
        return None
    m = MEMORY.match(str(raw).strip()) if isinstance(raw, str | int) else None
    if not m:
        raise InvalidPoolError(f"{field}: must look like 512Mi or 1Gi")
    size = float(m.group(1)) * MEMORY_UNITS[m.group(2)]  # inf for 400 digits: compare first
    if not least <= size <= 1 << 40:
        raise InvalidPoolError(f"{field}: must be {least >> 20}Mi-1Ti")
    return int(size)


def _probes(c: dict[str, Any], where: str) -> tuple[Probe, ...]:
    raw = c.get("probes") or []
    if not isinstance(raw, list):
        raise InvalidPoolError(f"{where}.probes: must be a list")
    out: list[Probe] = []
    for i, p in enumerate(raw):
        at = f"{where}.probes[{i}]"
        if not isinstance(p, dict):
            raise InvalidPoolError(f"{at}: must be an object")
        kind = p.get("type")
        if kind not in ("Startup", "Liveness"):
            raise InvalidPoolError(f"{at}.type: must be Startup or Liveness")
        if any(q.type == kind for q in out):
            raise InvalidPoolError(f"{at}.type: only one {kind} probe is allowed")
        http, tcp = p.get("httpGet"), p.get("tcpSocket")
        if (http is None) == (tcp is None):
            raise InvalidPoolError(f"{at}: exactly one of httpGet and tcpSocket")
        action = http if http is not None else tcp
        kind_key = "httpGet" if http is not None else "tcpSocket"
        if not isinstance(action, dict):
            raise InvalidPoolError(f"{at}.{kind_key}: must be an object")
        port = action.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise InvalidPoolError(f"{at}.{kind_key}.port: required, an integer 1-65535")
        path = None
        scheme = "http"
        headers: tuple[tuple[str, str], ...] = ()
        if http is not None:
            path = action.get("path", "/")
            if not isinstance(path, str) or not path.startswith("/"):
                raise InvalidPoolError(f"{at}.httpGet.path: must start with /")
            scheme = str(action.get("scheme", "HTTP")).lower()
            if scheme not in ("http", "https"):
                raise InvalidPoolError(f"{at}.httpGet.scheme: must be HTTP or HTTPS")
            hdrs = action.get("httpHeaders") or []
            if not isinstance(hdrs, list) or not all(
                isinstance(h, dict)
                and isinstance(h.get("name"), str)
                and isinstance(h.get("value"), str)
                for h in hdrs
            ):
                raise InvalidPoolError(f"{at}.httpGet.httpHeaders: list of {{name, value}}")
            headers = tuple((h["name"], h["value"]) for h in hdrs)
        out.append(
            Probe(
                type=kind,
                port=port,
                path=path,
                scheme=scheme,
                headers=headers,
                initial_delay_s=_int(
                    p, f"{at}.initialDelaySeconds", "initialDelaySeconds", 0, 0, 60
                ),
                period_s=_int(p, f"{at}.periodSeconds", "periodSeconds", 10, 1, 240),
                timeout_s=_int(p, f"{at}.timeoutSeconds", "timeoutSeconds", 1, 1, 240),
                failure_threshold=_int(p, f"{at}.failureThreshold", "failureThreshold", 3, 1, 10),
            )
        )
    return tuple(out)
