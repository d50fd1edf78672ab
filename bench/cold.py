"""The cold path and the workers at scale, each target beside bare Docker in the same run.

    python -m bench.cold [--quick] [--out bench/results]

1. A dry pool's first request vs `docker run` until the port answers (bench/timeline.py, with
   the step-by-step timeline).
2. Refill: an empty pool asked for N ready sandboxes, vs N bare containers created like for
   like (same image, limits, hardening, read-only root and tmpfs mounts, network) and started
   in parallel by the same number of threads until their ports answer; with the CPU of every
   process by role over each (bench/cpu.py): the sandboxes' own, dockerd's, its network hook's,
   runc's, the worker's, and everyone else's on the machine.
3. Teardown lag: expiresAt → the engine's `destroy` event, N sessions with a 1 s cooldown,
   vs N bare like-for-like containers force-removed all at once (`remove_container(force=True)`
   from N threads).
4. A burst of 20 new identifiers in one second on a pool with readySessionInstances 2, twice:
   the first meets the pool at its floor, the second the pool grown by the first.
5. The engine's own ceiling: like-for-like containers that run only `sleep`, started and then
   all removed at once, on the pool's network and with none.
6. Warm claim: first requests of new identifiers, 8 at a time, on a pool with enough ready
   sandboxes (bench/allocation.py: seeded ready sandboxes on a local upstream, so what is timed
   is the router's claim path and a new upstream connection, not a container).

Writes `cold.md` and `cold.json` to `--out`. The machine's load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import allocation, timeline
from bench import pool as docker_bench
from bench.allocation import percentile
from bench.common import (
    RESULTS,
    poll,
    timed_get,
    until_expired,
)
from bench.cpu import ProcessCpu
from bench.seed import IMAGE, pool_def
from router.keys import Keys
from router.limits import LimitPolicy
from router.store import Store, open_redis
from workers.docker_storage import Storage

LABEL_SCOPE = docker_bench.LABEL_SCOPE
NETWORK = "sessionpool-egress-disabled"  # the worker's default sandbox network
CONCURRENCY = 8  # the worker's default create_concurrency


def bare_kwargs(client: Any, scope: str) -> dict[str, Any]:
    """`create_container` arguments of a bare container like the pool's sandboxes: the same
    image, limits, hardening, read-only root with its tmpfs mounts (or quota), and network."""
    limits = LimitPolicy().resolve(pool_def("bare", ready=0, max_sessions=1))
    plan = Storage().plan(client, IMAGE, limits.storage_bytes, None, (scope, "bare"))
    host = client.api.create_host_config(
        network_mode=NETWORK,
        init=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        restart_policy={"Name": "no"},
        pids_limit=limits.pids,
        mem_limit=limits.memory_bytes,
        memswap_limit=limits.memory_bytes,
        nano_cpus=int(limits.cpu * 1e9),
        read_only=plan.get("read_only", False),
        tmpfs=plan.get("tmpfs"),
        storage_opt=plan.get("storage_opt"),
    )
    return {"image": IMAGE, "labels": {LABEL_SCOPE: scope}, "host_config": host, "detach": True}


def _bare_create(client: Any, kwargs: dict[str, Any]) -> tuple[str, str]:
    made = client.api.create_container(**kwargs)
    client.api.start(made["Id"])
    info = client.api.inspect_container(made["Id"])
    return made["Id"], info["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]


async def _port_answers(http: aiohttp.ClientSession, ip: str) -> None:
    async def answers() -> bool:
        try:
            async with http.get(f"http://{ip}:8080/health") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await poll(answers, 120, f"{ip}: port answering", interval=0.005)


async def bare_refill(client: Any, scope: str, n: int) -> dict[str, Any]:
    """n bare sandboxes started by CONCURRENCY threads until every port answers; they are left
    running for `bare_remove` (their container ids are under "ids")."""
    loop = asyncio.get_running_loop()
    kwargs = await asyncio.to_thread(bare_kwargs, client, scope)
    ids: list[str] = []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        async with aiohttp.ClientSession() as http:
            cpu = ProcessCpu()
            cpu.start()
            t0 = time.monotonic()

            async def one() -> None:
                cid, ip = await loop.run_in_executor(pool, _bare_create, client, kwargs)
                ids.append(cid)
                await _port_answers(http, ip)

            await asyncio.gather(*(one() for _ in range(n)))
            took = time.monotonic() - t0
            share = cpu.stop()
    return {"n": n, "s": took, "per_s": n / took, "cpu": share, "ids": ids}


async def bare_remove(client: Any, ids: list[str]) -> list[float]:
    """All the bare sandboxes force-removed at once (one thread each, as the reaper destroys a
    batch in parallel): ms until each call returned. Run right after the pool's teardown, so
    both meet the machine in the same state (other work shares it)."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(len(ids)) as pool:
        t0 = time.perf_counter()
        removes = [loop.run_in_executor(pool, _timed_remove, client, cid, t0) for cid in ids]
        return list(await asyncio.gather(*removes))


async def engine_ceiling(client: Any, scope: str, n: int) -> dict[str, Any]:
    """What the engine alone can do here: n like-for-like containers that run nothing but
    `sleep` (no server to boot, no port to wait for) created and started by CONCURRENCY
    threads, then all force-removed at once; on the pool's network and with no network
    (`network_mode: none`), which shows what the engine's per-container networking costs."""
    kwargs = await asyncio.to_thread(bare_kwargs, client, scope)
    kwargs = {**kwargs, "command": ["sleep", "600"]}
    runs: dict[str, Any] = {}
    for label, mode, disabled in (
        ("network", NETWORK, False),
        ("no network", "none", False),
        ("network disabled (direct attach's containers)", "none", True),
    ):
        host = {**kwargs["host_config"], "NetworkMode": mode}
        made = await asyncio.to_thread(
            _started, client, {**kwargs, "host_config": host, "network_disabled": disabled}, n
        )
        rm_ms = await bare_remove(client, made["ids"])
        runs[label] = {"per_s": made["per_s"], "rm_ms": rm_ms}
    return runs


def _started(client: Any, kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    def one(_: int) -> str:
        cid = str(client.api.create_container(**kwargs)["Id"])
        client.api.start(cid)
        client.api.inspect_container(cid)
        return cid

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        t0 = time.monotonic()
        ids = list(pool.map(one, range(n)))
        return {"ids": ids, "per_s": n / (time.monotonic() - t0)}


def _timed_remove(client: Any, cid: str, t0: float) -> float:
    """ms from t0 (when every remove was asked for) until this one returned."""
    client.api.remove_container(cid, force=True)
    return (time.perf_counter() - t0) * 1000


async def refill(store: Store, n: int) -> dict[str, Any]:
    cpu = ProcessCpu()
    cpu.start()
    t0 = time.monotonic()
    await store.put_pool(pool_def("refill", ready=n, max_sessions=2 * n + 10, cooldown_s=1))

    async def full() -> bool:
        return (await store.counts("refill"))["ready"] >= n

    took = await poll(full, 300, "refill", interval=0.01) - t0
    share = cpu.stop()
    await store.delete_pool("refill")

    async def removed() -> bool:
        return not await store.sandboxes("refill")

    await poll(
        removed, 120, "refill pool removed", interval=0.01
    )  # its removals must not overlap what follows
    return {"n": n, "s": took, "per_s": n / took, "cpu": share}


async def teardown(
    store: Store, client: Any, router_url: str, scope: str, n: int, worker_log: Path
) -> dict[str, list[float]]:
    """ms from each session's expiresAt to its container's `die` and `destroy` events."""
    await store.put_pool(pool_def("teardown", ready=n, max_sessions=n, cooldown_s=1))

    async def ready() -> bool:
        return (await store.counts("teardown"))["ready"] >= n

    await poll(ready, 300, "teardown pool ready", interval=0.01)
    # No refill while the sessions run out (what is measured is teardown, not creates racing
    # it): the floor goes to 0 before the n sessions are allocated, and maxConcurrentSessions
    # to 1 after, so the demand-following pool (n allocations just now) has room for one
    # sandbox once they have ended.
    await store.put_pool(pool_def("teardown", ready=0, max_sessions=n, cooldown_s=1))
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    k = store.pk("teardown")
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(
            *(
                timed_get(http, f"{router_url}/pools/teardown/health?identifier=td-{i}")
                for i in range(n)
            )
        )
    await store.put_pool(pool_def("teardown", ready=0, max_sessions=1, cooldown_s=1))
    records, expires = await until_expired(store, "teardown", (f"td-{i}" for i in range(n)), 0.01)
    containers = {ident: rec["container"] for ident, rec in records.items()}
    sandbox_of = {ident: rec["sandbox"] for ident, rec in records.items()}
    wanted = set(containers.values())

    async def gone() -> bool:
        rows = client.api.containers(all=True, filters={"label": f"{LABEL_SCOPE}={scope}"})
        return not ({c["Id"] for c in rows} & wanted)

    await poll(gone, 60, "teardown", interval=0.01)
    seen: dict[str, dict[str, float]] = {"die": {}, "destroy": {}}
    for ev in client.events(
        since=since,
        until=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1),
        decode=True,
        filters={"type": "container", "label": f"{LABEL_SCOPE}={scope}"},
    ):
        action = ev.get("Action") or ev.get("status")
        if action in seen:
            seen[action][ev["id"]] = ev["timeNano"] / 1e6
    ended: dict[str, float] = {}  # identifier -> when EXPIRE ended it (its log entry)
    for _, fields in await store.redis.xrange(k.log, min="-", max="+"):
        entry = orjson.loads(fields[b"data"])
        if entry.get("event") == "idle":
            ended[entry["identifier"]] = float(entry["at"])
    await store.delete_pool("teardown")
    lags = {
        action: [at[c] - expires[i] for i, c in containers.items() if c in at]
        for action, at in seen.items()
    }
    lags["ended"] = [ended[i] - expires[i] for i in containers if i in ended]
    # The worker's log: when its handler took each teardown, and when the engine call returned.
    sandboxes = {i: s for i, s in sandbox_of.items() if i in containers}
    times = _teardown_times(worker_log)
    for key, at in (("handled", 0), ("returned", 1)):
        lags[key] = [times[s][at] * 1000 - expires[i] for i, s in sandboxes.items() if s in times]
    return lags


def _teardown_times(log: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in log.read_bytes().splitlines() if log.exists() else []:
        if b'"teardown":[' in line:
            doc = orjson.loads(line)
            out[doc["sandbox"]] = doc["teardown"]
    return out


async def burst(store: Store, router_url: str, n: int) -> dict[str, Any]:
    """Two bursts of n new identifiers, each spread over one second, 3 s apart."""
    await store.put_pool(pool_def("burst", ready=2, max_sessions=2 * n + 5))

    async def floor() -> bool:
        c = await store.counts("burst")
        return c["ready"] == 2 and c["warming"] == 0

    await poll(floor, 120, "burst pool at its floor", interval=0.01)
    out: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for label in ("first", "second"):
            before = await store.counts("burst")

            async def one(i: int, label: str = label) -> float:
                await asyncio.sleep(i / n)
                url = f"{router_url}/pools/burst/health?identifier={label}-{i}"
                return await timed_get(http, url)

            ms = list(await asyncio.gather(*(one(i) for i in range(n))))
            out[label] = {
                "ready_before": before["ready"] + before["warming"],
                "p50_ms": percentile(ms, 50),
                "p99_ms": percentile(ms, 99),
                "ms": ms,
            }
            await asyncio.sleep(3)
    await store.delete_pool("burst")

    async def removed() -> bool:
        return not await store.sandboxes("burst")

    await poll(removed, 120, "burst pool removed", interval=0.05)  # before the claims are timed
    return out


def run(quick: bool, out: Path, attach: str = "engine") -> dict[str, Any]:
    n = 6 if quick else 12
    data: dict[str, Any] = {"load_before": Path("/proc/loadavg").read_text().split()[:3]}
    data["attach"] = attach
    data["timeline"] = timeline.run(3 if quick else 5, out, attach)
    data.update(_workers(quick, out, n, attach))
    data["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
    text = report(data)
    (out / "cold.json").write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    (out / "cold.md").write_text(text + "\n")
    print(text)
    return data


def _workers(quick: bool, out: Path, n: int, attach: str) -> dict[str, Any]:
    """Refill, teardown and burst against one worker and router of this run's own."""
    data: dict[str, Any] = {}
    with docker_bench.deployment("cold", out, SESSIONPOOL_DOCKER_NETWORK_ATTACH=attach) as d:
        bare_scope = f"{d.prefix}-bare"

        async def go() -> None:
            r = open_redis(d.redis_url)
            store = Store(r, Keys(d.prefix))
            try:
                # Their own scope: the worker's reconciliation would remove them as orphans.
                data["bare"] = await bare_refill(d.client, bare_scope, n)
                data["refill"] = await refill(store, n)
                data["teardown_ms"] = await teardown(
                    store, d.client, d.router_url, d.prefix, n, d.worker_log
                )
                data["bare"]["rm_ms"] = await bare_remove(d.client, data["bare"].pop("ids"))
                data["engine"] = await engine_ceiling(d.client, bare_scope, n)
                data["burst"] = await burst(store, d.router_url, 8 if quick else 20)
            finally:
                await r.aclose()

        try:
            asyncio.run(go())
        finally:
            docker_bench.remove_scope(d.client, bare_scope)
        # Its own key prefix and router: the worker above must not see the seeded sandboxes.
        claims = allocation.run(
            d.redis_url, f"{d.prefix}-claim", 40 if quick else 200, CONCURRENCY, out / "logs"
        )
        data["warm_claim"] = claims[-1].to_json()
    return data


# The roles bench/cpu.py tells apart, in the order the refill's CPU line lists them.
CPU_ROLES = (
    "sandboxes",
    "dockerd",
    "shim + runc + hook",
    "containerd",
    "worker",
    "router",
    "bench",
    "redis",
    "other",
)
ENGINE_ROLES = ("dockerd", "shim + runc + hook", "containerd")


def cpu_line(label: str, run: dict[str, Any]) -> str:
    """One refill's CPU by role (cores), with sandboxes/s per engine core."""
    cpu = run["cpu"]
    engine = sum(cpu.get(r, 0.0) for r in ENGINE_ROLES)
    parts = ", ".join(f"{r} {cpu.get(r, 0.0):.2f}" for r in CPU_ROLES)
    per_sandbox = {r: cpu.get(r, 0.0) * cpu["wall_s"] / run["n"] * 1000 for r in CPU_ROLES}
    top = ", ".join(f"{r} {ms:.0f}" for r, ms in per_sandbox.items() if ms >= 1)
    return (
        f"| {label} | {run['per_s']:.1f} /s | {engine:.2f} ({cpu.get('dockerd', 0.0):.2f}) | "
        f"{run['per_s'] / engine if engine else float('nan'):.1f} | "
        f"{cpu['machine']:.2f} of {os.cpu_count()} | {parts} | {top} |"
    )


def report(data: dict[str, Any]) -> str:
    cold = timeline._offsets(data["timeline"]["cold"], timeline.STEPS)["upstream answered"]
    bare_run = timeline._offsets(data["timeline"]["alike"], timeline.BARE_STEPS)["port answers"]
    bare, ref = data["bare"], data["refill"]
    td = data["teardown_ms"]["destroy"]
    td_p50, td_p99 = percentile(td, 50), percentile(td, 99)
    die = data["teardown_ms"]["die"]
    rm_p50, rm_p99 = percentile(bare["rm_ms"], 50), percentile(bare["rm_ms"], 99)
    b1, b2 = data["burst"]["first"], data["burst"]["second"]
    claim = data["warm_claim"]

    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    rows = [
        f"sessionpool's docker_network_attach: **{data.get('attach', 'engine')}**; the bare "
        "Docker baselines use Docker's own network attach.",
        "",
        "| target | sessionpool | bare Docker (same run) | ratio | target | |",
        "|---|---:|---:|---:|---|---|",
        f"| dry pool: first request, p50 | {cold:.0f} ms "
        "| `docker run` like for like → port answers "
        f"{bare_run:.0f} ms | {cold / bare_run:.2f}x | ≤ 1.1x | {met(cold <= 1.1 * bare_run)} |",
        f"| refill {ref['n']} from empty | {ref['per_s']:.1f} /s | {bare['per_s']:.1f} /s "
        f"(like for like, {CONCURRENCY} threads: create, start, inspect, port) "
        f"| {ref['per_s'] / bare['per_s']:.2f}x "
        f"| ≥ 8 /s | {met(ref['per_s'] >= 8)} |",
        f"| warm claim, {CONCURRENCY} concurrent, p50 / p99 ({claim['n']} claims) "
        f"| {claim['p50_ms']:.1f} / {claim['p99_ms']:.1f} ms | — | — | p99 ≤ 10 ms "
        f"| {met(claim['p99_ms'] <= 10)} |",
        f"| teardown lag after expiry, p50 / p99 | {td_p50:.0f} / {td_p99:.0f} ms | like for "
        f"like, all {len(bare['rm_ms'])} `rm -f` at once {rm_p50:.0f} / {rm_p99:.0f} ms "
        f"| {td_p99 / rm_p99:.2f}x (p99) | p99 ≤ 500 ms "
        f"| {met(td_p99 <= 500)} |",
        f"| (expiry to the session ended in Redis, p50 / p99) | "
        f"{percentile(data['teardown_ms']['ended'], 50):.0f} / "
        f"{percentile(data['teardown_ms']['ended'], 99):.0f} ms | | | | |",
        f"| (expiry to the reaper's handler, p50 / p99) | "
        f"{percentile(data['teardown_ms']['handled'], 50):.0f} / "
        f"{percentile(data['teardown_ms']['handled'], 99):.0f} ms | | | | |",
        f"| (expiry to the container killed, p50 / p99) | {percentile(die, 50):.0f} / "
        f"{percentile(die, 99):.0f} ms | | | | |",
        f"| (expiry to the engine's remove call returned, p50 / p99) | "
        f"{percentile(data['teardown_ms']['returned'], 50):.0f} / "
        f"{percentile(data['teardown_ms']['returned'], 99):.0f} ms | | | | |",
        f"| burst of {len(b1['ms'])} in 1 s, ready 2: first-request p50 / p99 | first burst "
        f"{b1['p50_ms']:.0f} / {b1['p99_ms']:.0f} ms; second {b2['p50_ms']:.0f} / "
        f"{b2['p99_ms']:.0f} ms (pool grown to {b2['ready_before']}) | — | — | — | |",
        "",
        engine_report(data["engine"], len(bare["rm_ms"])),
        "",
        "CPU during the refills, in cores (bench/cpu.py; `other` is everything else on the "
        "machine, e.g. other benches and tests). The engine is dockerd, containerd, and each "
        "container's shim with what it ran: runc, and the prestart hook runc ran (dockerd "
        "re-executed as `libnetwork-setkey` for the container's network).",
        "",
        "| refill | rate | engine (dockerd) cores | sandboxes/s per engine core | machine busy "
        "| cores by role | CPU ms per sandbox by role |",
        "|---|---:|---:|---:|---:|---|---|",
        cpu_line("sessionpool", ref),
        cpu_line("bare Docker", bare),
        "",
        f"Load average before {' '.join(data['load_before'])}, after "
        f"{' '.join(data['load_after'])}: other work shares these cores, so every figure is a "
        "same-run ratio, not an absolute.",
        "",
        timeline.report(data["timeline"]),
    ]
    return "\n".join(rows)


def engine_report(engine: dict[str, Any], n: int) -> str:
    """The engine's own ceiling on this host, the same run's figures."""
    rows = [
        f"The engine alone on this host: {n} like-for-like containers that run only `sleep` "
        f"(nothing to boot, no port to wait for), started by {CONCURRENCY} threads, then all "
        "force-removed at once. What no client of this engine can beat here:",
        "",
        "| containers running `sleep` | started /s | all `rm -f` at once, p50 / p99 |",
        "|---|---:|---:|",
    ]
    for label, run in engine.items():
        rows.append(
            f"| {label} | {run['per_s']:.1f} /s | {percentile(run['rm_ms'], 50):.0f} / "
            f"{percentile(run['rm_ms'], 99):.0f} ms |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer of each (a smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--attach",
        choices=("engine", "direct"),
        default="engine",
        help="the worker's docker_network_attach",
    )
    args = p.parse_args()
    run(args.quick, args.out, args.attach)


if __name__ == "__main__":
    main()
