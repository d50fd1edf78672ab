"""One frozen `Settings` object for every process, from defaults, `SESSIONPOOL_*` and flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from router.addresses import parse_networks

ENV_PREFIX = "SESSIONPOOL_"
# What PythonLTS and Shell pools that name no container run (the defaults of the settings).
CODE_INTERPRETER_IMAGE = "sessionpool/code-interpreter:dev"
SHELL_IMAGE = "sessionpool/shell:dev"
GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Settings:
    """Configuration shared by routers and workers; nothing else reads the environment."""

    # Where state lives.
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "sp"
    redis_timeout_s: float = 2.0
    # The router's Redis client pool: callers wait (up to redis_pool_wait_s) for a free
    # connection rather than failing when all are busy.
    redis_max_connections: int = 64
    redis_pool_wait_s: float = 10.0

    # Router.
    host: str = "127.0.0.1"
    port: int = 8080
    processes: int = 1
    host_suffix: str = ""
    allocation_wait_s: float = 30.0
    upstream_connect_timeout_s: float = 5.0
    upstream_idle_timeout_s: float = 240.0
    # Idle keep-alive connections kept per sandbox address, and for how long.
    upstream_pool_max_idle: int = 1024
    upstream_pool_idle_s: float = 4.0
    # Connections open to one sandbox at once; past it a request waits (FIFO, up to
    # upstream_connect_timeout_s) for one to come free. A thousand callers of one session
    # then share 64 kept-alive connections instead of opening a thousand (bench.path: the
    # router did 20-25 % more per CPU second at c=1000). Not counted: WebSockets, and an
    # exchange once it has lasted a second (streams, long polls), so nobody waits behind those.
    upstream_max_connections: int = 64
    max_body_bytes: int = 2 * GiB
    ws_max_msg_bytes: int = 16 * MiB
    route_cache_ttl_s: float = 2.0  # how long a router trusts a cached route
    activity_flush_s: float = 0.5  # session activity is written in batches this often
    shutdown_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long
    # Client connections: a request's line and headers must arrive within header_timeout_s;
    # idle keep-alive connections close after keepalive_timeout_s; past max_connections per
    # process a new connection is answered 503 with Retry-After.
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 16_384
    # The router raises its RLIMIT_NOFILE to this at start (router/server.py): the soft limit
    # to the hard one always, the hard one too where permitted (root), at most fs.nr_open.
    # Each relayed connection holds two descriptors: 65,536 covers max_connections relayed.
    max_open_files: int = 65_536
    # "required": every request but /healthz, /readyz, /metrics needs a credential; "none"
    # must be asked for explicitly (a router with no credential configured refuses to start).
    auth: str = "required"
    api_keys_file: str = ""  # YAML/JSON list of {name, key_sha256, roles, pools?}
    jwt_hs256_secret: str = field(default="", repr=False)
    jwt_jwks: str = ""  # RS256 key set: a file path or an http(s) URL
    jwt_issuer: str = ""  # when set, tokens must carry exactly this `iss`
    jwt_audience: str = "https://dynamicsessions.io"  # comma-separated: any one matches
    jwt_leeway_s: float = 30.0
    jwks_ttl_s: float = 300.0
    code_interpreter_image: str = CODE_INTERPRETER_IMAGE  # PythonLTS default
    shell_image: str = SHELL_IMAGE  # Shell default
    # Comma-separated CIDRs whose X-Forwarded-*/Forwarded/X-Real-IP are believed (appended
    # to); from any other peer those headers are replaced by what the router saw.
    trusted_proxies: str = ""
    tls_cert: str = ""  # PEM certificate chain: with tls_key, serve HTTPS and WSS
    tls_key: str = field(default="", repr=False)  # a path, but say nothing more about it

    # Workers.
    runtime: str = "docker"
    role: str = "all"
    worker_id: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    reconcile_interval_s: float = 10.0  # records <-> containers reconciliation period
    orphan_grace_s: float = 30.0  # an unrecorded container this old is removed
    warm_timeout_s: float = 120.0  # a sandbox not ready by then is abandoned
    create_concurrency: int = 8  # sandboxes started in parallel per worker
    # Demand-following warm pool: allocations over this window set how many ready sandboxes
    # to keep above readySessionInstances; unclaimed ones above that go after the grace.
    demand_window_s: float = 10.0
    surplus_grace_s: float = 15.0
    network_prefix: str = "sessionpool"
    claim_idle_ms: int = 30_000
    metrics_port: int = 0  # worker's Prometheus port; 0 = not served
    # Sandbox limits (router/limits.py): what a pool that names none gets, and what no pool
    # may ask for. Sizes accept Ki/Mi/Gi suffixes in variables and flags.
    sandbox_default_cpu: float = 1.0
    sandbox_default_memory_bytes: int = 1 * GiB
    sandbox_default_pids: int = 256
    sandbox_default_storage_bytes: int = 512 * MiB
    sandbox_max_cpu: float = 2.0
    sandbox_max_memory_bytes: int = 4 * GiB
    sandbox_max_pids: int = 4096
    sandbox_max_storage_bytes: int = 4 * GiB
    # The docker runtime re-checks the sandbox networks' host firewall rules this often and
    # puts back any that went missing.
    firewall_check_s: float = 10.0
    # Start sandboxes even where the host firewall rules cannot be installed: sandboxes can
    # then reach this host's services and metadata addresses. Warned about at every start.
    insecure_skip_host_firewall: bool = False
    # How the docker runtime puts a sandbox on its network: "engine" (Docker's libnetwork
    # endpoint) or "direct" (the container's network is disabled and the worker attaches a
    # veth to the same bridge itself: no per-container libnetwork work, see
    # workers/docker_attach.py). Direct needs root with `ip` and `nsenter` on the Docker host.
    docker_network_attach: str = "engine"
    # Kubernetes runtime (workers/kubernetes.py). No kubeconfig: in-cluster config when the
    # worker runs in a pod, else the default kubeconfig ($KUBECONFIG or ~/.kube/config).
    k8s_namespace: str = "sessionpool-sandboxes"  # where sandbox pods, Secrets, policies live
    k8s_kubeconfig: str = ""
    k8s_context: str = ""
    k8s_control_namespace: str = "sessionpool"  # routers and workers: the only ingress allowed
    # EgressEnabled pools reach anything but these (the cluster's pod and service ranges) and
    # link-local metadata, which is always excluded.
    k8s_cluster_cidrs: str = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10"
    k8s_api_timeout_s: float = 10.0  # every API call but watches, which re-open each minute
    k8s_schedule_timeout_s: float = 60.0  # a pod not scheduled by then fails creation
    k8s_start_timeout_s: float = 120.0  # a pod not running with an IP by then fails creation

    # Logs.
    log_json: bool = True

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.key_prefix):
            raise ValueError(f"key_prefix: {self.key_prefix!r} is not 1-64 of [A-Za-z0-9_.-]")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is out of range")
        if self.processes < 1:
            raise ValueError("processes: must be at least 1")
        for name in (
            "redis_timeout_s",
            "redis_pool_wait_s",
            "header_timeout_s",
            "keepalive_timeout_s",
            "upstream_connect_timeout_s",
            "upstream_idle_timeout_s",
            "upstream_pool_idle_s",
            "route_cache_ttl_s",
            "activity_flush_s",
            "reconcile_interval_s",
            "jwks_ttl_s",
            "firewall_check_s",
            "k8s_api_timeout_s",
            "k8s_schedule_timeout_s",
            "k8s_start_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive")
        if self.allocation_wait_s < 0:
            raise ValueError("allocation_wait_s: must not be negative")
        if self.activity_flush_s > 1.0:
            raise ValueError("activity_flush_s: must be at most 1 s to keep expiry exact")
        if self.max_body_bytes < 0 or self.ws_max_msg_bytes <= 0:
            raise ValueError("max_body_bytes / ws_max_msg_bytes: must be positive")
        if self.runtime not in ("docker", "process", "kubernetes"):
            raise ValueError(f"runtime: {self.runtime!r} is not docker, process or kubernetes")
        if self.role not in ("all", "replenisher", "reaper"):
            raise ValueError(f"role: {self.role!r} is not all, replenisher or reaper")
        if self.auth not in ("none", "required"):
            raise ValueError(f"auth: {self.auth!r} is not none or required")
        if self.jwt_hs256_secret and len(self.jwt_hs256_secret.encode()) < 32:
            raise ValueError("jwt_hs256_secret: must be at least 32 bytes (RFC 7518 §3.2)")
        if not self.jwt_audience.strip(" ,"):
            raise ValueError("jwt_audience: must name at least one audience")
        if self.jwt_leeway_s < 0:
            raise ValueError("jwt_leeway_s: must not be negative")
        if self.upstream_pool_max_idle < 0:
            raise ValueError("upstream_pool_max_idle: must not be negative")
        if self.upstream_max_connections < 1:
            raise ValueError("upstream_max_connections: must be at least 1")
        if self.max_connections < 1:
            raise ValueError("max_connections: must be at least 1")
        if self.docker_network_attach not in ("engine", "direct"):
            raise ValueError("docker_network_attach: must be engine or direct")
        if self.max_open_files < 1:
            raise ValueError("max_open_files: must be at least 1")
        if self.redis_max_connections < 4:
            raise ValueError("redis_max_connections: must be at least 4")
        if self.runtime == "kubernetes" and not re.fullmatch(
            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", self.key_prefix
        ):
            raise ValueError(
                f"key_prefix: {self.key_prefix!r} must be a Kubernetes label value for the "
                "kubernetes runtime (1-63 characters, letters or digits at both ends)"
            )
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", self.k8s_namespace):
            raise ValueError(f"k8s_namespace: {self.k8s_namespace!r} is not a namespace name")
        for cidr in self.k8s_cluster_cidrs.split(","):
            try:
                ipaddress.ip_network(cidr.strip())
            except ValueError:
                raise ValueError(f"k8s_cluster_cidrs: {cidr!r} is not a CIDR range") from None
        try:
            parse_networks(self.trusted_proxies)
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {exc}") from None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key: give both or neither")
        if self.create_concurrency < 1:
            raise ValueError("create_concurrency: must be at least 1")
        for kind in ("cpu", "memory_bytes", "pids", "storage_bytes"):
            default = getattr(self, f"sandbox_default_{kind}")
            most = getattr(self, f"sandbox_max_{kind}")
            if not 0 < default <= most:
                raise ValueError(
                    f"sandbox_default_{kind}: must be positive and at most sandbox_max_{kind}"
                )
        if self.demand_window_s <= 0:
            raise ValueError("demand_window_s: must be positive")
        if self.surplus_grace_s < 0:
            raise ValueError("surplus_grace_s: must not be negative")

    def check_router_auth(self) -> None:
        """A router refuses to start with auth required and nothing to check it against.

        Raises:
            ValueError: no credential source, and `auth` is not explicitly "none".
        """
        if self.auth == "required" and not (
            self.api_keys_file or self.jwt_hs256_secret or self.jwt_jwks
        ):
            raise ValueError(
                "auth: 'required' needs a credential source (api_keys_file, "
                "jwt_hs256_secret or jwt_jwks); pass --auth none to run without one"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `SESSIONPOOL_<FIELD>` variables, then explicit overrides.

        Raises:
            ValueError: a variable does not parse or a value is out of range.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, str(f.type), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti)?", re.IGNORECASE)
SIZE_UNITS = {"": 1, "ki": 1 << 10, "mi": MiB, "gi": GiB, "ti": 1 << 40}


def parse_bytes(raw: str) -> int:
    """A size: bytes, or a number with a Ki/Mi/Gi/Ti suffix (`512Mi`).

    Raises:
        ValueError: not a size.
    """
    m = SIZE.fullmatch(raw.strip())
    if m is None:
        raise ValueError(f"{raw!r} is not a size like 536870912, 512Mi or 1Gi")
    return int(float(m.group(1)) * SIZE_UNITS[(m.group(2) or "").lower()])


def _parse(name: str, type_name: str, raw: str) -> Any:
    try:
        if type_name == "int" and name.endswith("_bytes"):
            return parse_bytes(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "bool":
            return raw.strip().lower() in ("1", "true", "yes", "on")
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: {raw!r} is not a {type_name}") from None
    return raw
