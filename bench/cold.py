"""The cold path and the workers at scale, each target beside bare Docker in the same run.

    python -m bench.cold [--quick] [--out bench/results]

1. A dry pool's first request vs `docker run` until the port answers (bench/timeline.py, with
   the step-by-step timeline).
2. Refill: an empty pool asked for N ready sandboxes, vs N bare containers (same image, limits
   and network) created and started in parallel by the same number of threads until their
   ports answer; with dockerd + containerd CPU over the refill, and the whole machine's.
3. Teardown lag: expiresAt → the engine's `destroy` event, N sessions with a 1 s cooldown,
   vs a bare `remove_container(force=True)`.
4. A burst of 20 new identifiers in one second on a pool with readySessionInstances 2, twice:
   the first meets the pool at its floor, the second the pool grown by the first.

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

from bench import pool as docker_bench
from bench import timeline
from bench.allocation import percentile
from bench.common import (
    RESULTS,
    cpu_seconds,
    poll,
    timed_get,
    until_expired,
)
from bench.seed import IMAGE, pool_def
from router.keys import Keys
from router.store import Store, open_redis

LABEL_SCOPE = docker_bench.LABEL_SCOPE
NETWORK = "sessionpool-egress-disabled"  # the worker's default sandbox network
CONCURRENCY = 8  # the worker's default create_concurrency


def _pids(*names: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() in names:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def _machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """dockerd + containerd CPU, and the machine's, between start() and stop()."""

    def start(self) -> None:
        self.pids = _pids("dockerd", "containerd")
        self.t0, self.engine0, self.busy0 = time.monotonic(), cpu_seconds(self.pids), 0.0
        self.busy0 = _machine_busy_s()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        return {
            "engine_cores": (cpu_seconds(self.pids) - self.engine0) / wall,
            "machine_cores": (_machine_busy_s() - self.busy0) / wall,
        }


def _bare_create(client: Any, scope: str) -> tuple[str, str]:
    host = client.api.create_host_config(
        network_mode=NETWORK,
        init=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        pids_limit=256,
        mem_limit=256 << 20,
        memswap_limit=256 << 20,
        nano_cpus=500_000_000,
        tmpfs={"/tmp": "rw,nosuid,nodev,size=128m"},
    )
    made = client.api.create_container(
        IMAGE, labels={LABEL_SCOPE: scope}, host_config=host, detach=True
    )
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
    """n bare sandboxes started by CONCURRENCY threads, until every port answers."""
    loop = asyncio.get_running_loop()
    cpu = CpuWatch()
    ids: list[str] = []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        async with aiohttp.ClientSession() as http:
            cpu.start()
            t0 = time.monotonic()

            async def one() -> None:
                cid, ip = await loop.run_in_executor(pool, _bare_create, client, scope)
                ids.append(cid)
                await _port_answers(http, ip)

            await asyncio.gather(*(one() for _ in range(n)))
            took = time.monotonic() - t0
            share = cpu.stop()
        t1 = time.monotonic()
        removes = [loop.run_in_executor(pool, _timed_remove, client, cid) for cid in ids]
        rm_ms = list(await asyncio.gather(*removes))
        rm_wall = time.monotonic() - t1
    return {"n": n, "s": took, "per_s": n / took, **share, "rm_ms": rm_ms, "rm_wall_s": rm_wall}


def _timed_remove(client: Any, cid: str) -> float:
    t0 = time.perf_counter()
    client.api.remove_container(cid, force=True)
    return (time.perf_counter() - t0) * 1000


async def refill(store: Store, n: int) -> dict[str, Any]:
    cpu = CpuWatch()
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
    return {"n": n, "s": took, "per_s": n / took, **share}


async def teardown(
    store: Store, client: Any, router_url: str, scope: str, n: int, worker_log: Path
) -> dict[str, list[float]]:
    """ms from each session's expiresAt to its container's `die` and `destroy` events."""
    await store.put_pool(pool_def("teardown", ready=n, max_sessions=n, cooldown_s=1))

    async def ready() -> bool:
        return (await store.counts("teardown"))["ready"] >= n

    await poll(ready, 300, "teardown pool ready", interval=0.01)
    # No refill while the sessions run out (what is measured is teardown, not creates racing
    # it): the floor goes to 0, and with every session allocated maxConcurrentSessions leaves
    # demand-following no room.
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
    return out


def run(quick: bool, out: Path) -> dict[str, Any]:
    n = 6 if quick else 12
    data: dict[str, Any] = {"load_before": Path("/proc/loadavg").read_text().split()[:3]}
    data["timeline"] = timeline.run(3 if quick else 5, out)
    data.update(_workers(quick, out, n))
    data["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
    text = report(data)
    (out / "cold.json").write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    (out / "cold.md").write_text(text + "\n")
    print(text)
    return data


def _workers(quick: bool, out: Path, n: int) -> dict[str, Any]:
    """Refill, teardown and burst against one worker and router of this run's own."""
    data: dict[str, Any] = {}
    with docker_bench.deployment("cold", out) as d:

        async def go() -> None:
            r = open_redis(d.redis_url)
            store = Store(r, Keys(d.prefix))
            try:
                data["bare"] = await bare_refill(d.client, d.prefix, n)
                data["refill"] = await refill(store, n)
                data["teardown_ms"] = await teardown(
                    store, d.client, d.router_url, d.prefix, n, d.worker_log
                )
                data["burst"] = await burst(store, d.router_url, 8 if quick else 20)
            finally:
                await r.aclose()

        asyncio.run(go())
    return data


def report(data: dict[str, Any]) -> str:
    cold = timeline._offsets(data["timeline"]["cold"], timeline.STEPS)["upstream answered"]
    bare_run = timeline._offsets(data["timeline"]["bare"], timeline.BARE_STEPS)["port answers"]
    bare, ref = data["bare"], data["refill"]
    td = data["teardown_ms"]["destroy"]
    td_p50, td_p99 = percentile(td, 50), percentile(td, 99)
    die = data["teardown_ms"]["die"]
    rm_p50, rm_p99 = percentile(bare["rm_ms"], 50), percentile(bare["rm_ms"], 99)
    b1, b2 = data["burst"]["first"], data["burst"]["second"]

    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    rows = [
        "| target | sessionpool | bare Docker (same run) | ratio | target | |",
        "|---|---:|---:|---:|---|---|",
        f"| dry pool: first request, p50 | {cold:.0f} ms | `docker run` → port answers "
        f"{bare_run:.0f} ms | {cold / bare_run:.2f}x | ≤ 1.1x | {met(cold <= 1.1 * bare_run)} |",
        f"| refill {ref['n']} from empty | {ref['per_s']:.1f} /s | {bare['per_s']:.1f} /s "
        f"({CONCURRENCY} threads, create, start, inspect, port) "
        f"| {ref['per_s'] / bare['per_s']:.2f}x "
        f"| ≥ 8 /s | {met(ref['per_s'] >= 8)} |",
        f"| teardown lag after expiry, p50 / p99 | {td_p50:.0f} / {td_p99:.0f} ms | `rm -f` "
        f"{rm_p50:.0f} / {rm_p99:.0f} ms | {td_p99 / rm_p99:.2f}x (p99) | p99 ≤ 500 ms "
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
        f"CPU during the refill: dockerd + containerd {ref['engine_cores']:.2f} cores, the "
        f"whole machine {ref['machine_cores']:.2f} of {os.cpu_count()} cores (bare run: "
        f"{bare['engine_cores']:.2f} / {bare['machine_cores']:.2f}). Load average before "
        f"{' '.join(data['load_before'])}, after {' '.join(data['load_after'])}: other work "
        "shares these cores, so every figure is a same-run ratio, not an absolute.",
        "",
        timeline.report(data["timeline"]),
    ]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer of each (a smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    run(args.quick, args.out)


if __name__ == "__main__":
    main()
