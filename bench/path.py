"""The request path's own bench (issue #16): the router against its peers, side by side.

    python -m bench.path              # about 3 minutes; writes bench/results/path.{md,json}
    python -m bench.path --quick      # seconds-long runs, results to --out
    python -m bench.path --only load --no-peers --profile 1000 --out /tmp/x   # a subset

One run, one upstream (nginx, one worker, a 40-byte body) reached directly and through the
sessionpool router, configurable-http-proxy (Node), the bare aiohttp proxy and nginx
`proxy_pass`, each with one core's worth of parallelism. Per core = requests / the proxy
process's own CPU seconds (utime + stime from /proc), so load generator and upstream sharing
the cores do not count against the proxy. Then: c=256 and c=1000 on one warm session
(router, 6 s runs, three rounds each against its own c=32 run), 1 GiB streamed both ways
three times each (bench/streaming.py), 10,000 idle WebSockets held by one router process
(bench/scale.py), and py-spy profiles of the router (`--profile C`, c=32 by default; when
py-spy is installed: `pip install py-spy`). Every process is stopped at the end; load goes
to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import proxies, scale, streaming
from bench.common import Proc, RedisServer, one_core, which
from bench.load import LoadResult, wrk
from bench.proxying import seed_router_pool

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 1 << 30
ROUTER = "sessionpool router"
CHP = "configurable-http-proxy"
BARE = "bare aiohttp proxy"
NGINX = "nginx proxy_pass"


SECTIONS = ("load", "stream", "ws")
C1_RUNS = 5
MANY_ROUNDS = 3


def profile(proc: Proc, url: str, seconds: int, c: int = 32, top: int = 15) -> dict[str, Any]:
    """Where the router's CPU goes at `c` connections: py-spy's samples, by leaf frame."""
    spy = which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"not_run": "py-spy is not installed (pip install py-spy)"}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        cmd = [spy, "record", "--format", "raw", "-r", "250", "-d", str(seconds + 1)]
        cmd += ["--nonblocking", "-o", str(raw), "-p", str(proc.pid)]
        rec = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wrk(url, c, seconds, proc)
        rec.wait(60)
        if not raw.exists():
            return {"not_run": "py-spy could not attach (ptrace not permitted?)"}
        leaf: collections.Counter[str] = collections.Counter()
        inclusive: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = [_frame(f) for f in stack.split(";")]
            leaf[frames[-1]] += int(n)
            for frame in set(frames):
                inclusive[frame] += int(n)
            total += int(n)
    if not total:
        return {"not_run": "py-spy recorded no samples"}
    return {
        "samples": total,
        "top_self": [[f, round(100 * n / total, 1)] for f, n in leaf.most_common(top)],
        "top_total": [[f, round(100 * n / total, 1)] for f, n in inclusive.most_common(3 * top)],
    }


def _frame(frame: str) -> str:
    """`name (file.py)` of one py-spy frame `name (path/file.py:line)`."""
    name, _, where = frame.partition(" (")
    module = where.split(":")[0].split("/site-packages/")[-1].rsplit("/", 1)[-1]
    return f"{name} ({module})"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(
    quick: bool,
    out: Path,
    sections: tuple[str, ...] = SECTIONS,
    peers: bool = True,
    profile_at: tuple[int, ...] = (32,),
) -> dict[str, Any]:
    secs, warm = (1, 0) if quick else (3, 1)
    res: dict[str, Any] = {
        "quick": quick,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": loadavg(),
        "sections": list(sections),
    }
    with tempfile.TemporaryDirectory(prefix="sppath-") as tmp:
        work = Path(tmp)
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        redis = RedisServer(work).start()
        started: list[Proc] = []
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        try:
            if "load" in sections:
                res.update(
                    _load(work, logs, redis.url, prefix, started, secs, warm, peers, profile_at)
                )
        finally:
            for p in started:
                p.stop()
        if "stream" in sections:
            size = 64 << 20 if quick else GiB
            res["streaming"] = streaming.run(
                redis.url, f"{prefix}-s", size, logs, repeats=1 if quick else 3
            ).to_json()
        if "ws" in sections:
            ws = scale.websockets(redis.url, f"{prefix}-w", 1000 if quick else 10_000, logs)
            res["websockets"] = ws.to_json()
        redis.stop()
    res["load_after"] = loadavg()
    return res


def _load(
    work: Path,
    logs: Path,
    redis_url: str,
    prefix: str,
    started: list[Proc],
    secs: int,
    warm: int,
    peers: bool,
    profile_at: tuple[int, ...],
) -> dict[str, Any]:
    """Sections 1 and 2: every path at c=1 and c=32, then the router at c=256 and c=1000."""
    res: dict[str, Any] = {}
    up, upstream = proxies.nginx_upstream(work / "up")
    started.append(up)
    asyncio.run(seed_router_pool(redis_url, f"{prefix}-p", {"warm": upstream}))
    router, router_url = proxies.router(redis_url, f"{prefix}-p", log=logs / "router.log")
    started.append(router)
    paths: dict[str, tuple[str, Proc | None]] = {
        "direct": (f"http://{upstream}/small", None),
        ROUTER: (f"{router_url}/pools/bench/small?identifier=warm", router),
    }
    why = proxies.chp_available() if peers else "--no-peers"
    if why is None:
        chp, chp_url = proxies.chp(upstream)
        started.append(chp)
        paths[CHP] = (f"{chp_url}/small", chp)
    if peers:
        bare, bare_url = proxies.bare_proxy(upstream)
        started.append(bare)
        paths[BARE] = (f"{bare_url}/small", bare)
        ngx, ngx_url = proxies.nginx_proxy(work / "ngx", upstream)
        started.append(ngx)
        paths[NGINX] = (f"{ngx_url}/small", ngx)
    res["not_run"] = {CHP: why} if why else {}
    subprocess.run(["curl", "-sf", paths[ROUTER][0]], check=True, capture_output=True)
    runs: dict[str, dict[int, LoadResult]] = {}
    # c=1 is noisy on a shared machine: direct and the router run C1_RUNS times, alternating,
    # and the run with the median p50 stands for each (every p50 is kept in the results).
    c1: dict[str, list[LoadResult]] = {}
    for rep in range(1 if secs < 3 else C1_RUNS):
        for name, (url, proc) in paths.items():
            if rep == 0 or name in ("direct", ROUTER):
                c1.setdefault(name, []).append(wrk(url, 1, secs, proc, warm))
    for name, results in c1.items():
        runs.setdefault(name, {})[1] = sorted(results, key=lambda r: r.p50_ms)[len(results) // 2]
    res["c1_p50_ms"] = {name: [r.p50_ms for r in results] for name, results in c1.items()}
    # The same, with the load generator, the upstream and the proxy on one CPU (`one_core`).
    c1 = {}
    for rep in range(1 if secs < 3 else C1_RUNS):
        for name, (url, proc) in paths.items():
            if rep == 0 or name in ("direct", ROUTER):
                with one_core(up.pids() + (proc.pids() if proc else [])):
                    c1.setdefault(name, []).append(wrk(url, 1, secs, proc, warm))
    res["c1_one_core_p50_ms"] = {name: [r.p50_ms for r in rs] for name, rs in c1.items()}
    for name, (url, proc) in paths.items():
        runs[name][32] = wrk(url, 32, secs, proc, warm)
    res["profile"] = {str(c): profile(router, paths[ROUTER][0], secs, c) for c in profile_at}
    # c=256 and c=1000, each against a c=32 run just before, MANY_ROUNDS times (one run swings
    # by 10 % or more on a shared machine); the round with the median ratio stands for each.
    rounds: list[dict[int, LoadResult]] = []
    for _ in range(1 if secs < 3 else MANY_ROUNDS):
        rnd = {32: wrk(paths[ROUTER][0], 32, secs, router, warm)}
        for c in (256, 1000):  # twice as long: each run opens its own c connections
            rnd[c] = wrk(paths[ROUTER][0], c, 2 * secs, router, warm)
        rounds.append(rnd)
    res["many_rounds"] = [
        {str(c): {**vars(r), "per_core": r.rps_per_core} for c, r in rnd.items()} for rnd in rounds
    ]
    res["runs"] = {
        n: {str(c): {**vars(r), "per_core": r.rps_per_core} for c, r in by_c.items()}
        for n, by_c in runs.items()
    }
    return res


def _f(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def report(res: dict[str, Any]) -> str:
    lines = [
        "# Request path bench (issue #16)",
        "",
        f"Run {res['when']}{' (quick)' if res['quick'] else ''} by `python -m bench.path`, on a "
        "shared 2-core machine with other work running: absolute req/s are low and noisy "
        "(±20 %); compare per core and the ratios. wrk -t1; upstream nginx (1 worker, 40 B). "
        f"Load average (1/5/15 min) before: {res.get('load_before', '?')}, "
        f"after: {res.get('load_after', '?')}.",
    ]
    if "runs" in res:
        lines += _report_load(res)
    if "streaming" in res:
        lines += _report_streaming(res["streaming"])
    if "websockets" in res:
        ws = res["websockets"]
        lines += [
            "",
            f"Idle WebSockets held by one router process: {ws['held']:,} of {ws['wanted']:,}, "
            f"**{ws['kib_per_ws']:.1f} KiB each** (RSS growth / held)"
            + (f"; {ws['note']}." if ws.get("note") else "."),
        ]
    for c, prof in res.get("profile", {}).items():
        lines += [
            "",
            f"Where the router's CPU goes at c={c} (py-spy, share of samples by leaf frame):",
            "",
        ]
        if "not_run" in prof:
            lines.append(f"not run: {prof['not_run']}")
        else:
            lines += ["| frame | % |", "|---|---|"]
            lines += [f"| `{f}` | {p} |" for f, p in prof["top_self"]]
    return "\n".join(lines) + "\n"


def _report_load(res: dict[str, Any]) -> list[str]:
    runs = res["runs"]
    r32 = runs[ROUTER]["32"]
    lines = [
        "",
        "| path | c=1 p50 / p99 ms | c=1 p50 ms, one core | c=32 req/s | c=32 p99 ms "
        "| req/s per proxy core (c=32) |",
        "|---|---|---|---|---|---|",
    ]
    pinned = res.get("c1_one_core_p50_ms", {})
    for name, by_c in runs.items():
        one, c32 = by_c["1"], by_c["32"]
        p1 = f"{statistics.median(pinned[name]):.3f}" if pinned.get(name) else "-"
        lines.append(
            f"| {name} | {one['p50_ms']:.3f} / {one['p99_ms']:.2f} | {p1} | {c32['rps']:,.0f} | "
            f"{c32['p99_ms']:.1f} | {_f(c32['per_core'])} |"
        )
    for name, why in res.get("not_run", {}).items():
        lines.append(f"| {name} | not run: {why} | | | | |")
    lines += ["", "Ratios (per core, c=32):", ""]
    for peer in (CHP, BARE, NGINX):
        if peer in runs and runs[peer]["32"]["per_core"]:
            ratio = r32["per_core"] / runs[peer]["32"]["per_core"]
            lines.append(f"- router / {peer}: **{ratio:.2f}x**")
    d1, r1 = runs["direct"]["1"], runs[ROUTER]["1"]
    p50s = res.get("c1_p50_ms", {})
    spread = ""
    if len(p50s.get(ROUTER, [])) > 1:
        added = sorted(r - d for r, d in zip(p50s[ROUTER], p50s["direct"], strict=False))
        spread = (
            f" (median of {len(added)} alternating runs; each run's router - direct: "
            + ", ".join(f"{a:.3f}" for a in added)
            + ")"
        )
    lines += [
        f"- added latency at c=1 (router - direct): p50 **{r1['p50_ms'] - d1['p50_ms']:.3f} ms**, "
        f"p99 {r1['p99_ms'] - d1['p99_ms']:.2f} ms{spread}",
    ]
    if pinned.get(ROUTER) and pinned.get("direct"):
        added = sorted(r - d for r, d in zip(pinned[ROUTER], pinned["direct"], strict=False))
        lines.append(
            "- the same with wrk, the upstream and the router on one CPU (`bench.common."
            f"one_core`): p50 **{statistics.median(added):.3f} ms** (each run: "
            + ", ".join(f"{a:.3f}" for a in added)
            + "); unpinned, every hop between the three processes may wake the other "
            "virtual CPU"
        )
    lines += [
        "",
        "One warm session under many connections (router), in rounds: each round runs c=32, "
        "then c=256 and c=1000; a ratio is to its own round's c=32, and the round with the "
        "median ratio is shown:",
        "",
        "| c | per core vs c=32, each round | median | req/s | per core | p99 ms | errors "
        "(all rounds) | router CPU | wrk CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rounds = res["many_rounds"]
    for c in ("32", "256", "1000"):
        ratios = [rnd[c]["per_core"] / rnd["32"]["per_core"] for rnd in rounds]
        order = sorted(range(len(rounds)), key=lambda i: ratios[i])
        mid = order[len(order) // 2]
        r = rounds[mid][c]
        secs = r["duration_s"]
        lines.append(
            f"| {c} | {', '.join(f'{x:.0%}' for x in ratios)} | **{ratios[mid]:.0%}** | "
            f"{r['rps']:,.0f} | {_f(r['per_core'])} | {r['p99_ms']:.1f} | "
            f"{sum(rnd[c]['errors'] for rnd in rounds)} | {r['cpu_s'] / secs:.0%} | "
            f"{r.get('load_cpu_s', 0) / secs:.0%} |"
        )
    lines += [
        "",
        "(router / wrk CPU: share of one core during the run; the machine has two, shared with "
        "nginx and anything else running. When router + wrk + nginx fill both cores, req/s "
        "measures the machine, not the router: compare per core.)",
    ]
    return lines


def _report_streaming(st: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Streaming (median of the transfers each way, router and bare alternating; range in "
        "brackets):",
        "",
        "| proxy | direction | transfers | GB/s per core | RSS growth MiB (max) |",
        "|---|---|---|---|---|",
    ]
    for who in ("router", "bare"):
        for direction in streaming.DIRECTIONS:
            ts = [t for t in st[who] if t["direction"] == direction]
            if not ts:
                continue
            rates = sorted(t["gb_per_core_s"] for t in ts)
            spread = f" ({rates[0]:.2f}-{rates[-1]:.2f})" if len(rates) > 1 else ""
            lines.append(
                f"| {who} | {direction} {ts[0]['bytes'] >> 20} MiB | {len(ts)} | "
                f"**{statistics.median(rates):.2f}**{spread} | "
                f"{max(t['rss_growth_mib'] for t in ts):.1f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)"
    )
    p.add_argument("--no-peers", action="store_true", help="direct and router only (no CHP etc.)")
    p.add_argument(
        "--profile", action="append", type=int, metavar="C", help="profile at C connections"
    )
    args = p.parse_args(argv)
    for tool in ("wrk", "nginx", "redis-server", "curl"):
        if shutil.which(tool) is None:
            print(f"bench.path: {tool} is not installed", file=sys.stderr)
            return 2
    sections = tuple(args.only or SECTIONS)
    res = run(args.quick, args.out, sections, not args.no_peers, tuple(args.profile or (32,)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "path.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "path.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
