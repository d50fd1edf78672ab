"""The `sessionpool` command line. Every flag also reads a `SESSIONPOOL_*` variable."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from router.errors import InvalidPoolError
from router.keys import Keys
from router.limits import LimitPolicy
from router.logs import configure
from router.settings import Settings, parse_bytes
from router.store import Store, open_redis
from sessionpool import keys
from sessionpool.poolfile import apply_file
from sessionpool.up import up, up_settings


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="Redis URL (SESSIONPOOL_REDIS_URL)")
    p.add_argument("--key-prefix", help="key prefix of this deployment (SESSIONPOOL_KEY_PREFIX)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--code-interpreter-image",
        help="image of PythonLTS pools that name none (SESSIONPOOL_CODE_INTERPRETER_IMAGE)",
    )
    p.add_argument(
        "--shell-image", help="image of Shell pools that name none (SESSIONPOOL_SHELL_IMAGE)"
    )


LIMIT_FLAGS = (
    ("cpu", float, "CPUs"),
    ("memory_bytes", parse_bytes, "memory, e.g. 1Gi"),
    ("pids", int, "processes"),
    ("storage_bytes", parse_bytes, "writable storage, e.g. 512Mi"),
)
SANDBOX_FIELDS = {
    f"sandbox_{kind}_{name}" for kind in ("default", "max") for name, _, _ in LIMIT_FLAGS
} | {"firewall_check_s", "insecure_skip_host_firewall", "docker_network_attach"}


def _limits(p: argparse.ArgumentParser) -> None:
    """Sandbox limit flags (router/limits.py): pools are checked against the maximums."""
    for kind, what in (("default", "a pool that names none gets"), ("max", "no pool may ask")):
        for name, parse, unit in LIMIT_FLAGS:
            field = f"sandbox_{kind}_{name}"
            p.add_argument(
                "--" + field.replace("_", "-"),
                type=parse,
                help=f"{unit} {what} (SESSIONPOOL_{field.upper()})",
            )


def _firewall(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--firewall-check-s",
        type=float,
        help="re-check the sandbox firewall rules this often (SESSIONPOOL_FIREWALL_CHECK_S)",
    )
    p.add_argument(
        "--insecure-skip-host-firewall",
        action="store_const",
        const=True,
        help="start sandboxes without host firewall rules: they can reach this host "
        "(SESSIONPOOL_INSECURE_SKIP_HOST_FIREWALL)",
    )
    p.add_argument(
        "--docker-network-attach",
        choices=("engine", "direct"),
        help="engine: Docker attaches each sandbox; direct: the worker does, with no "
        "per-container libnetwork work (SESSIONPOOL_DOCKER_NETWORK_ATTACH)",
    )


def _tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS/WSS (re-read on change)")
    p.add_argument("--tls-key", help="its private key (PEM)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sessionpool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="the whole stack on this machine, in the foreground")
    _common(up)
    up.add_argument("-f", "--file", type=Path, help="pools to apply (YAML or JSON)")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--runtime", choices=["docker", "process"])
    _limits(up)
    _firewall(up)
    up.add_argument(
        "--auth",
        choices=["none", "required"],
        help="default: required when a credential source is given, else none (loopback only)",
    )
    up.add_argument("--api-keys-file", help="API keys (sessionpool new-key NAME --file F)")
    _tls(up)

    router = sub.add_parser("router", help="an edge (data plane, management, admin API)")
    _common(router)
    router.add_argument("--host")
    router.add_argument("--port", type=int)
    router.add_argument("--processes", type=int, help="processes sharing the port")
    router.add_argument("--host-suffix", help="serve http://{pool}.{suffix}/… too")
    router.add_argument("--auth", choices=["none", "required"])
    _limits(router)
    router.add_argument(
        "--header-timeout-s", type=float, help="a request's headers must arrive this fast"
    )
    router.add_argument("--keepalive-timeout-s", type=float, help="idle keep-alive close")
    router.add_argument("--max-connections", type=int, help="connection cap per process")
    router.add_argument(
        "--max-open-files", type=int, help="raise RLIMIT_NOFILE to this at start (where allowed)"
    )
    router.add_argument(
        "--upstream-pool-max-idle", type=int, help="idle connections kept per sandbox"
    )
    router.add_argument(
        "--upstream-pool-idle-s", type=float, help="idle sandbox connections close after this"
    )
    router.add_argument(
        "--upstream-max-connections", type=int, help="connections open to one sandbox, at most"
    )
    router.add_argument("--redis-max-connections", type=int, help="Redis client pool size")
    router.add_argument(
        "--redis-pool-wait-s", type=float, help="wait for a free Redis connection this long"
    )
    router.add_argument("--api-keys-file", help="API keys (sessionpool new-key NAME --file F)")
    router.add_argument(
        "--trusted-proxies", help="CIDRs whose X-Forwarded-*/Forwarded headers are believed"
    )
    _tls(router)

    worker = sub.add_parser("worker", help="replenisher and/or reaper")
    _common(worker)
    worker.add_argument("--runtime", choices=["docker", "process", "kubernetes"])
    worker.add_argument("--k8s-namespace", help="sandbox namespace (SESSIONPOOL_K8S_NAMESPACE)")
    worker.add_argument("--k8s-kubeconfig", help="kubeconfig file; none: in-cluster or default")
    worker.add_argument("--k8s-context", help="kubeconfig context (SESSIONPOOL_K8S_CONTEXT)")
    worker.add_argument(
        "--k8s-control-namespace", help="namespace of routers and workers (ingress source)"
    )
    worker.add_argument(
        "--k8s-cluster-cidrs", help="pod/service ranges EgressEnabled pools cannot reach"
    )
    worker.add_argument("--k8s-api-timeout-s", type=float, help="bound on every API call")
    worker.add_argument(
        "--k8s-schedule-timeout-s", type=float, help="a pod not scheduled by then fails"
    )
    worker.add_argument("--k8s-start-timeout-s", type=float, help="a pod not running by then fails")
    worker.add_argument("--role", choices=["all", "replenisher", "reaper"])
    worker.add_argument("--metrics-port", type=int, help="serve Prometheus metrics here")
    _limits(worker)
    _firewall(worker)
    worker.add_argument(
        "--create-concurrency", type=int, help="sandboxes started in parallel per worker"
    )
    worker.add_argument(
        "--demand-window-s", type=float, help="allocation window the warm pool follows"
    )
    worker.add_argument(
        "--surplus-grace-s", type=float, help="unclaimed surplus sandboxes retired after this"
    )

    apply = sub.add_parser("apply", help="create or update pools from a file")
    _common(apply)
    apply.add_argument("-f", "--file", type=Path, required=True)
    _limits(apply)

    pools = sub.add_parser("pools", help="table of pools with live counts")
    _common(pools)
    sessions = sub.add_parser("sessions", help="table of a pool's sessions")
    _common(sessions)
    sessions.add_argument("pool")
    events = sub.add_parser("events", help="session lifecycle events (allocated, expired, …)")
    _common(events)
    events.add_argument("pool", nargs="?", help="one pool (default: every pool)")
    events.add_argument("--follow", action="store_true", help="keep printing new events")
    keys.add_commands(sub)
    return parser


async def print_events(store: Store, pool: str | None, follow: bool) -> None:
    """Print the pools' lifecycle streams as JSON lines, oldest first, then follow."""
    after = dict.fromkeys([pool] if pool else await store.pool_names(), "0-0")
    while True:
        entries = await store.read_logs(after, block_ms=1000 if follow else None)
        if not entries and not follow:
            return
        for name, mid, event in entries:
            after[name] = mid
            print(orjson.dumps({**event, "pool": name}).decode(), flush=True)


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    fields = {
        "redis_url",
        "key_prefix",
        "host",
        "port",
        "processes",
        "host_suffix",
        "auth",
        "runtime",
        "role",
        "metrics_port",
        "code_interpreter_image",
        "shell_image",
        "create_concurrency",
        "demand_window_s",
        "surplus_grace_s",
        "redis_max_connections",
        "header_timeout_s",
        "keepalive_timeout_s",
        "max_connections",
        "max_open_files",
        "upstream_pool_max_idle",
        "upstream_pool_idle_s",
        "upstream_max_connections",
        "redis_pool_wait_s",
        "api_keys_file",
        "trusted_proxies",
        "tls_cert",
        "tls_key",
        "k8s_namespace",
        "k8s_kubeconfig",
        "k8s_context",
        "k8s_control_namespace",
        "k8s_cluster_cidrs",
        "k8s_api_timeout_s",
        "k8s_schedule_timeout_s",
        "k8s_start_timeout_s",
    }
    fields |= SANDBOX_FIELDS
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    overrides.update(extra)
    return Settings.from_env(**overrides)


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


async def _with_store(settings: Settings, action: str, args: argparse.Namespace) -> int:
    redis = open_redis(settings.redis_url)
    store = Store(redis, Keys(settings.key_prefix))
    try:
        if action == "apply":
            images = (settings.code_interpreter_image, settings.shell_image)
            limits = LimitPolicy.from_settings(settings)
            for name, change in await apply_file(store, args.file, *images, limits=limits):
                print(f"pool {name}: {change}")
        elif action == "pools":
            rows = []
            for name in await store.pool_names():
                pool = await store.get_pool(name)
                c = await store.counts(name)
                if pool is not None:
                    rows.append(
                        [
                            name,
                            pool.image,
                            str(pool.ready_instances),
                            str(pool.max_sessions),
                            str(c["ready"]),
                            str(c["warming"]),
                            str(c["allocated"]),
                        ]
                    )
            print_table(rows, ["POOL", "IMAGE", "TARGET", "MAX", "READY", "WARMING", "ALLOCATED"])
        elif action == "events":
            await print_events(store, args.pool, args.follow)
        elif action == "sessions":
            from router.management import iso

            sessions, _ = await store.list_sessions(args.pool, 0, 10_000)
            print_table(
                [
                    [
                        s.identifier,
                        s.sandbox[:12],
                        iso(s.created_ms) or "",
                        iso(s.last_accessed_ms) or "",
                        iso(s.expires_ms) or "",
                    ]
                    for s in sessions
                ],
                ["IDENTIFIER", "SANDBOX", "CREATED", "LAST ACCESS", "EXPIRES"],
            )
    finally:
        await redis.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "new-key":
            return keys.run_new_key(args)
        if args.command == "hash-key":
            return keys.run_hash_key()
        configure(args.log_level, json=Settings.from_env().log_json)
        if args.command == "router":
            from router.server import run_router

            run_router(settings_from(args))
        elif args.command == "worker":
            from router.server import install_uvloop
            from workers.main import run

            install_uvloop()
            asyncio.run(run(settings_from(args)))
        elif args.command == "up":
            # `up` is the laptop command: port 8080, and auth off unless credentials are
            # given; check_listener then keeps an open stack on loopback.
            settings = up_settings(settings_from(args), args.auth)
            if args.port is None:
                settings = settings.replace(port=8080)
            own_redis = args.redis_url is None
            return asyncio.run(up(settings, args.file, args.runtime, own_redis=own_redis))
        else:
            return asyncio.run(_with_store(settings_from(args), args.command, args))
    except (InvalidPoolError, ValueError) as exc:
        print(f"sessionpool: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
