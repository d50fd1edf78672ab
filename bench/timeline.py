"""The timeline of one cold request: an empty pool, one new identifier, until its answer.

    python -m bench.timeline [-n 5] [--out bench/results]

Runs its own redis-server, a worker (`--runtime docker`, INFO logs) and a router, defines a pool
with `readySessionInstances` 0, and sends `n` first requests one at a time. For each it puts
every step on one clock (wall time of this host; Redis `TIME`, the engine's event times and the
worker's log all read it):

| step | where it comes from |
|---|---|
| demand recorded | the `pool-empty` entry's stream id (CLAIM returned "no ready sandbox") |
| replenisher reserved | the sandbox record's `createdAt` (RESERVE) |
| docker create / start | the engine's `create` and `start` events for the container |
| create returned | worker log: `runtime.create` returned (after its inspect) |
| probe passed | worker log: the Startup probe answered |
| MARK_READY + publish | the record's `readyAt` (the script publishes on the ready channel) |
| router claims | the record's `allocatedAt` (the waiting router's second CLAIM) |
| upstream answered | this client got the response |

and, in the same run, bare `docker run -d`s of the same image (like for like: the pool's limits,
hardening, read-only root, tmpfs mounts and network; the pool's limits only; none): CLI started
→ `create` → `start` → port answers. Prints a table of medians (ms after the request was
sent) and writes `timeline.json` and `timeline.md` to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import pool as docker_bench
from bench.common import RESULTS
from bench.seed import IMAGE, pool_def
from router.keys import Keys
from router.store import Store, open_redis, text

POOL = "dry"
LABEL_SCOPE = docker_bench.LABEL_SCOPE
STEPS = (
    "demand recorded",
    "replenisher reserved",
    "docker create",
    "docker start",
    "create returned",
    "probe passed",
    "MARK_READY + publish",
    "router claims",
    "upstream answered",
)
BARE_STEPS = ("docker create", "docker start", "port answers")


def _engine_events(
    client: Any, scope: str, since: float, until: float
) -> dict[str, dict[str, float]]:
    """container id → {"create": t, "start": t} (unix seconds) for this scope's containers."""
    out: dict[str, dict[str, float]] = {}
    for ev in client.events(
        since=int(since) - 1,
        until=int(until) + 2,
        decode=True,
        filters={"type": "container", "label": f"{LABEL_SCOPE}={scope}"},
    ):
        action = ev.get("Action") or ev.get("status")
        if action in ("create", "start"):
            out.setdefault(ev["id"], {})[action] = ev["timeNano"] / 1e9
    return out


def _worker_steps(log: Path) -> dict[str, dict[str, float]]:
    """sandbox id → the replenisher's step times, from its JSON log lines."""
    out: dict[str, dict[str, float]] = {}
    if not log.exists():
        return out
    for line in log.read_bytes().splitlines():
        if b'"steps"' not in line:
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        out[doc["sandbox"]] = doc["steps"]
    return out


# The pool's own limits (bench.seed.pool_def): a sandbox is never unlimited, so the fair bare
# run has them too; the plain run is reported beside it.
POOL_LIMITS = ("--cpus", "0.5", "--memory", "256m")


def like_for_like(client: Any, scope: str) -> tuple[str, ...]:
    """`docker run` options for a container like the pool's sandboxes (bench.cold.bare_kwargs
    as command-line options): limits, hardening, read-only root and tmpfs mounts, network."""
    from bench.cold import NETWORK, bare_kwargs

    host = bare_kwargs(client, scope)["host_config"]
    args = [
        *("--cpus", str(host["NanoCpus"] / 1e9), "--memory", str(host["Memory"])),
        *("--memory-swap", str(host["MemorySwap"]), "--pids-limit", str(host["PidsLimit"])),
        *("--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--init"),
        *("--network", NETWORK),
    ]
    if host.get("ReadonlyRootfs"):
        args.append("--read-only")
    for path, opts in (host.get("Tmpfs") or {}).items():
        args += ["--tmpfs", f"{path}:{opts}"]
    for key, value in (host.get("StorageOpt") or {}).items():
        args += ["--storage-opt", f"{key}={value}"]
    return tuple(args)


async def _bare(
    http: aiohttp.ClientSession, scope: str, extra: tuple[str, ...] = ()
) -> dict[str, float]:
    t0 = time.time()
    total_ms = await docker_bench.bare_docker_run(http, scope, extra)
    return {"sent": t0, "port answers": t0 + total_ms / 1000}


async def _measure(
    store: Store, client: Any, router_url: str, scope: str, worker_log: Path, n: int
) -> dict[str, Any]:
    await store.put_pool(pool_def(POOL, ready=0, max_sessions=n + 5))
    k = store.pk(POOL)
    cold: list[dict[str, float]] = []
    alike: list[dict[str, float]] = []
    bare: list[dict[str, float]] = []
    plain: list[dict[str, float]] = []
    alike_args = await asyncio.to_thread(like_for_like, client, scope)
    timeout = aiohttp.ClientTimeout(total=120, sock_connect=1)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{router_url}/healthz") as r:
            assert r.status == 200
        for i in range(n):
            ident = f"timeline-{i}-{uuid.uuid4().hex[:6]}"
            t0 = time.time()
            async with http.get(f"{router_url}/pools/{POOL}/health?identifier={ident}") as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"cold request: {r.status}")
            done = time.time()
            session = await store.get_session(POOL, ident)
            assert session is not None
            rec = (await store.sandboxes(POOL))[session.sandbox]
            empties = await store.redis.xrange(k.events, min=f"{int(t0 * 1000)}", max="+")
            demand = next(
                (
                    int(text(mid).split("-")[0]) / 1000
                    for mid, fields in empties
                    if orjson.loads(fields[b"data"]).get("kind") == "pool-empty"
                ),
                float("nan"),
            )
            cold.append(
                {
                    "sent": t0,
                    "demand recorded": demand,
                    "replenisher reserved": rec.created_ms / 1000,
                    "MARK_READY + publish": (rec.ready_ms or 0) / 1000,
                    "router claims": (rec.allocated_ms or 0) / 1000,
                    "upstream answered": done,
                    "_sandbox": session.sandbox,  # type: ignore[dict-item]
                    "_container": session.container,  # type: ignore[dict-item]
                }
            )
            alike.append(await _bare(http, scope, alike_args))
            bare.append(await _bare(http, scope, POOL_LIMITS))
            plain.append(await _bare(http, scope))
    until = time.time()
    events = _engine_events(client, scope, cold[0]["sent"], until)
    steps = _worker_steps(worker_log)
    cold_containers = {str(row["_container"]) for row in cold}
    for row in cold:
        ev = events.get(str(row.pop("_container")), {})
        row["docker create"] = ev.get("create", float("nan"))
        row["docker start"] = ev.get("start", float("nan"))
        w = steps.get(str(row.pop("_sandbox")), {})
        row["create returned"] = w.get("started", float("nan"))
        row["probe passed"] = w.get("probed", float("nan"))
    # Bare runs: match each to the engine events that fall inside it (one at a time).
    bare_ev = sorted(
        (e["create"], e.get("start", float("nan")))
        for cid, e in events.items()
        if "create" in e and cid not in cold_containers
    )
    for row in alike + bare + plain:
        inside = [e for e in bare_ev if row["sent"] <= e[0] <= row["port answers"]]
        row["docker create"], row["docker start"] = inside[0] if inside else (float("nan"),) * 2
    return {"cold": cold, "alike": alike, "bare": bare, "plain": plain}


def _offsets(rows: list[dict[str, float]], steps: tuple[str, ...]) -> dict[str, float]:
    """Median ms after `sent` for each step."""
    out = {}
    for step in steps:
        vals = [(r[step] - r["sent"]) * 1000 for r in rows if r[step] == r[step]]
        out[step] = statistics.median(vals) if vals else float("nan")
    return out


def report(data: dict[str, Any]) -> str:
    cold = _offsets(data["cold"], STEPS)
    alike = _offsets(data["alike"], BARE_STEPS)
    bare = _offsets(data["bare"], BARE_STEPS)
    plain = _offsets(data["plain"], BARE_STEPS)
    lines = [
        f"Cold request timeline (median of {len(data['cold'])}; ms after the request was sent)",
        "",
        "| step | dry pool via router | Δ | `docker run` (like for like) "
        "| `docker run` (pool's limits only) | `docker run` (none) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    prev = 0.0
    for step in STEPS:
        at = cold[step]
        same = {"upstream answered": "port answers"}.get(step, step)
        cells = " | ".join(_ms(b.get(same, float("nan"))) for b in (alike, bare, plain))
        lines.append(f"| {step} | {at:.0f} | {at - prev:+.0f} | {cells} |")
        prev = at if at == at else prev
    lines.append("")
    lines.append(
        "Like for like: the pool's limits, hardening, read-only root with its tmpfs mounts "
        "and network, as `docker run` options."
    )
    lines.append("")
    for label, ref in (
        ("like for like", alike),
        ("with the pool's limits only", bare),
        ("without limits", plain),
    ):
        ratio = cold["upstream answered"] / ref["port answers"]
        met = "met" if ratio <= 1.1 else "not met"
        lines.append(f"dry pool / bare docker run {label} = {ratio:.2f} (≤ 1.1: {met})")
    return "\n".join(lines)


def _ms(value: float) -> str:
    return "" if value != value else f"{value:.0f}"


def run(n: int, out: Path, attach: str = "engine") -> dict[str, Any]:
    """`attach`: the worker's docker_network_attach."""
    # A dry pool stays dry: no demand-following warm sandboxes between cold requests.
    with docker_bench.deployment(
        "timeline",
        out,
        SESSIONPOOL_DEMAND_WINDOW_S="0.001",
        SESSIONPOOL_DOCKER_NETWORK_ATTACH=attach,
    ) as d:
        docker_bench.ensure_image(d.client)

        async def go() -> dict[str, Any]:
            r = open_redis(d.redis_url)
            try:
                store = Store(r, Keys(d.prefix))
                return await _measure(store, d.client, d.router_url, d.prefix, d.worker_log, n)
            finally:
                await r.aclose()

        data = asyncio.run(go())
    data["image"] = IMAGE
    data["load"] = Path("/proc/loadavg").read_text().split()[:3]
    text_report = report(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timeline.json").write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    (out / "timeline.md").write_text(text_report + f"\n\nload average: {data['load']}\n")
    print(text_report)
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=5, help="cold requests (one at a time)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    run(args.n, args.out)


if __name__ == "__main__":
    main()
