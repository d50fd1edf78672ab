"""The pool model: ACA ARM `sessionPools` properties parsed, defaulted and validated."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.errors import InvalidPoolError
from router.fields import Fields
from router.settings import CODE_INTERPRETER_IMAGE, SHELL_IMAGE
from router.templates import BUILTIN_TYPES, EnvVar, Probe, Registry, Template, parse_template

__all__ = [
    "BUILTIN_TYPES",
    "CODE_INTERPRETER_IMAGE",
    "POOL_NAME",
    "SHELL_IMAGE",
    "EnvVar",
    "Placement",
    "Pool",
    "Probe",
    "Registry",
    "parse_pool",
]

POOL_NAME = re.compile(r"^[a-z][a-z0-9-]{2,62}$")
CONTAINER_TYPES = {"CustomContainer", "PythonLTS", "Shell"}
MCP_SETTINGS_KEYS = frozenset({"isMCPServerEnabled", "mcpServerEndpoint"})
OCI_RUNTIMES = {"runc", "runsc", "kata", "kata-runtime", "io.containerd.kata.v2"}
TOLERATION_FIELDS = {"key", "operator", "value", "effect", "tolerationSeconds"}


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a sandbox may run (kubernetes runtime only): `sandboxConfiguration.nodeSelector`
    and `.tolerations`, passed to the pod as they are."""

    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Pool(Template):
    """One validated pool: its template (what a sandbox is made from) and how many to keep.

    `version` changes whenever what a new sandbox looks like changes."""

    name: str
    container_type: str
    max_sessions: int
    ready_instances: int
    lifecycle: str
    cooldown_s: int
    max_alive_s: int
    egress_enabled: bool
    oci_runtime: str | None
    pids_limit: int | None  # None: the operator's default (router/limits.py), like cpu/memory
    tenant_binding: bool
    mcp_enabled: bool
    secrets: dict[str, str] = field(repr=False)
    properties: dict[str, Any] = field(repr=False)
    version: str  # sha256 prefix of what a new sandbox is made from (see _version)
    placement: Placement = Placement()

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
    no container get (the router passes its `Settings`' images).

    Raises:
        InvalidPoolError: the message names the offending field.
    """
    if not isinstance(name, str) or not POOL_NAME.match(name):
        raise InvalidPoolError(f"name: {name!r} must match {POOL_NAME.pattern}")
    if not isinstance(body, dict):
        raise InvalidPoolError("body: must be a JSON object")
    raw = body.get("properties", body)
    if not isinstance(raw, dict):
        raise InvalidPoolError("properties: must be an object")
    props = Fields(orjson.loads(orjson.dumps(raw)), "properties")  # own copy, JSON types only

    ctype = props.choice("containerType", CONTAINER_TYPES, "CustomContainer")
    scale = props.obj("scaleConfiguration")
    max_sessions = scale.integer("maxConcurrentSessions", 10, 1, 100_000)
    ready = scale.integer("readySessionInstances", 5, 0, 10_000)

    dyn = props.obj("dynamicPoolConfiguration")
    life = dyn.obj("lifecycleConfiguration")
    lifecycle = life.get("lifecycleType", dyn.get("executionType", "Timed"))
    if lifecycle not in ("Timed", "OnContainerExit"):
        raise life.error("lifecycleType", "must be Timed or OnContainerExit")
    # The older shape keeps the cooldown beside executionType; name the field that was sent.
    legacy = not life.has("cooldownPeriodInSeconds") and dyn.has("cooldownPeriodInSeconds")
    cooldown = (dyn if legacy else life).integer("cooldownPeriodInSeconds", 300, 1, 86_400 * 7)
    max_alive = life.integer("maxAlivePeriodInSeconds", 3600, 1, 86_400 * 30)
    if lifecycle == "OnContainerExit" and ctype != "CustomContainer":
        raise life.error("lifecycleType", "OnContainerExit needs containerType CustomContainer")

    secrets = _secrets(props)
    builtin_image = code_interpreter_image if ctype == "PythonLTS" else shell_image
    template = parse_template(props, ctype, secrets, builtin_image)
    status = props.obj("sessionNetworkConfiguration").choice(
        "status",
        ("EgressEnabled", "EgressDisabled"),
        "EgressDisabled",
        "must be EgressEnabled or EgressDisabled",
    )
    sandbox = props.obj("sandboxConfiguration")
    runtime = sandbox.optional_choice("runtime", OCI_RUNTIMES)
    pids = None
    if sandbox.get("pidsLimit") is not None:
        pids = sandbox.integer("pidsLimit", 0, 16, 65_536)
    placement = _placement(sandbox)
    tenant = props.flag("tenantBinding", False)
    mcp_enabled = _mcp_settings(props, ctype)

    return Pool(
        name=name,
        container_type=ctype,
        max_sessions=max_sessions,
        ready_instances=ready,
        lifecycle=lifecycle,
        cooldown_s=cooldown,
        max_alive_s=max_alive,
        image=template.image,
        command=template.command,
        args=template.args,
        env=template.env,
        cpu=template.cpu,
        memory_bytes=template.memory_bytes,
        storage_bytes=template.storage_bytes,
        target_port=template.target_port,
        probes=template.probes,
        registry=template.registry,
        egress_enabled=status == "EgressEnabled",
        oci_runtime=runtime,
        pids_limit=pids,
        tenant_binding=tenant,
        mcp_enabled=mcp_enabled,
        secrets=secrets,
        properties=props.data,
        version=_version(template, secrets, status, runtime, pids, placement),
        placement=placement,
    )


def _version(
    template: Template,
    secrets: dict[str, str],
    status: str,
    runtime: str | None,
    pids: int | None,
    placement: Placement,
) -> str:
    """What a new sandbox is made from, hashed: not scale or lifecycle settings."""
    t, registry = template, template.registry
    fingerprint = orjson.dumps(
        [
            t.image,
            t.command,
            t.args,
            [(e.name, e.value, e.secret_ref) for e in t.env],
            [secrets.get(e.secret_ref or "") for e in t.env],
            t.cpu,
            t.memory_bytes,
            t.target_port,
            [p.__repr__() for p in t.probes],
            status,
            runtime,
            pids,
            t.storage_bytes,
            placement.node_selector,
            placement.tolerations,
            registry
            and (registry.server, registry.username, secrets[registry.password_secret_ref]),
        ],
    )
    return hashlib.sha256(fingerprint).hexdigest()[:12]


def _secrets(props: Fields) -> dict[str, str]:
    out: dict[str, str] = {}
    for at, s in props.items("secrets"):
        if (
            not isinstance(s, dict)
            or not isinstance(s.get("name"), str)
            or not s["name"]
            or not isinstance(s.get("value"), str)
        ):
            raise InvalidPoolError(f"{at}: needs string name and value")
        if s["name"] in out:
            raise InvalidPoolError(f"{at}.name: {s['name']!r} appears twice")
        out[s["name"]] = s["value"]
    return out


def _placement(sandbox: Fields) -> Placement:
    selector = sandbox.get("nodeSelector") or {}
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        raise sandbox.error("nodeSelector", "must map strings to strings")
    tolerations = sandbox.get("tolerations") or []
    if not isinstance(tolerations, list) or len(tolerations) > 16:
        raise sandbox.error("tolerations", "must be a list of at most 16")
    for at, t in sandbox.items("tolerations"):
        if not isinstance(t, dict) or not set(t) <= TOLERATION_FIELDS:
            raise InvalidPoolError(f"{at}: an object with only {sorted(TOLERATION_FIELDS)}")
        tol = Fields(t, at)
        if tol.get("operator", "Equal") not in ("Equal", "Exists"):
            raise tol.error("operator", "Equal or Exists")
        if tol.get("effect", "") not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise tol.error("effect", "NoSchedule, PreferNoSchedule or NoExecute")
        for key in ("key", "value"):
            if not isinstance(tol.get(key, ""), str):
                raise tol.error(key, "must be a string")
        seconds = tol.get("tolerationSeconds")
        if seconds is not None and (not isinstance(seconds, int) or isinstance(seconds, bool)):
            raise tol.error("tolerationSeconds", "an integer")
    return Placement(tuple(sorted(selector.items())), tuple(tolerations))


def _mcp_settings(props: Fields, ctype: str) -> bool:
    """`mcpServerSettings.isMCPServerEnabled`; the read-only endpoint a GET shows is dropped,
    so that a definition read with GET can be sent back as it is."""
    mcp = props.obj("mcpServerSettings")
    for key in mcp.data:
        if key not in MCP_SETTINGS_KEYS:
            raise mcp.error(key, "unknown field")
    mcp.data.pop("mcpServerEndpoint", None)
    enabled = mcp.flag("isMCPServerEnabled", False)
    if enabled and ctype not in BUILTIN_TYPES:
        # ACA ignores the setting here without a word; a silent no-op hides a mistake.
        raise mcp.error(
            "isMCPServerEnabled",
            "the platform MCP endpoint runs Python and shell tools in sessions of our own "
            f"images, so it needs containerType PythonLTS or Shell, not {ctype}; a custom "
            "container can serve MCP itself",
        )
    return enabled
