"""The request path's own bench (issue #16): the router against its peers, side by side.

    python -m bench.path              # about 2 minutes; writes bench/results/path.{md,json}
    python -m bench.path --quick      # seconds-long runs, results to --out

One run, one upstream (nginx, one worker, a 40-byte body) reached directly and through the
sessionpool router, configurable-http-proxy (Node), the bare aiohttp proxy and nginx
`proxy_pass`, each with one core's worth of parallelism. Per core = requests / the proxy
process's own CPU seconds (utime + stime from /proc), so load generator and upstream sharing
the cores do not count against the proxy. Then: c=256 and c=1000 on one warm session
(router), 1 GiB streamed both ways (bench/streaming.py), 10,000 idle WebSockets held by one
router process (bench/scale.py), and a py-spy profile of the router at c=32 (when py-spy is
installed: `pip install py-spy`). Every process is stopped at the end; load goes to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import proxies, scale, streaming
from bench.common import Proc, RedisServer, which
from bench.load import LoadResult, wrk
from bench.proxying import seed_router_pool

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 1 << 30
ROUTER = "sessionpool router"
CHP = "configurable-http-proxy"
BARE = "bare aiohttp proxy"
NGINX = "nginx proxy_pass"


def profile(proc: Proc, url: str, seconds: int, top: int = 15) -> dict[str, Any]:
    """Where the router's CPU goes at c=32: py-spy's on-CPU samples, by leaf frame."""
    spy = which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"not_run": "py-spy is not installed (pip install py-spy)"}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        cmd = [spy, "record", "--format", "raw", "-r", "250", "-d", str(seconds + 1)]
        cmd += ["--nonblocking", "-o", str(raw), "-p", str(proc.pid)]
        rec = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wrk(url, 32, seconds, proc)
        rec.wait(60)
        if not raw.exists():
            return {"not_run": "py-spy could not attach (ptrace not permitted?)"}
        leaf: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frame = stack.rsplit(";", 1)[-1]
            name, _, where = frame.partition(" (")
            module = where.split(":")[0].split("/site-packages/")[-1].rsplit("/", 1)[-1]
            leaf[f"{name} ({module})"] += int(n)
            total += int(n)
    return {
        "samples": total,
        "top_self": [[f, round(100 * n / total, 1)] for f, n in leaf.most_common(top)],
    }


def run(quick: bool, out: Path) -> dict[str, Any]:
    secs, warm = (1, 0) if quick else (3, 1)
    res: dict[str, Any] = {
        "quick": quick,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with tempfile.TemporaryDirectory(prefix="sppath-") as tmp:
        work = Path(tmp)
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        redis = RedisServer(work).start()
        started: list[Proc] = []
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        try:
            up, upstream = proxies.nginx_upstream(work / "up")
            started.append(up)
            asyncio.run(seed_router_pool(redis.url, f"{prefix}-p", {"warm": upstream}))
            router, router_url = proxies.router(redis.url, f"{prefix}-p", log=logs / "router.log")
            started.append(router)
            paths: dict[str, tuple[str, Proc | None]] = {
                "direct": (f"http://{upstream}/small", None),
                ROUTER: (f"{router_url}/pools/bench/small?identifier=warm", router),
            }
            why = proxies.chp_available()
            if why is None:
                chp, chp_url = proxies.chp(upstream)
                started.append(chp)
                paths[CHP] = (f"{chp_url}/small", chp)
            bare, bare_url = proxies.bare_proxy(upstream)
            started.append(bare)
            paths[BARE] = (f"{bare_url}/small", bare)
            ngx, ngx_url = proxies.nginx_proxy(work / "ngx", upstream)
            started.append(ngx)
            paths[NGINX] = (f"{ngx_url}/small", ngx)
            res["not_run"] = {CHP: why} if why else {}
            subprocess.run(["curl", "-sf", paths[ROUTER][0]], check=True, capture_output=True)
            runs: dict[str, dict[int, LoadResult]] = {}
            for c in (1, 32):  # interleaved: every path at one concurrency before the next
                for name, (url, proc) in paths.items():
                    runs.setdefault(name, {})[c] = wrk(url, c, secs, proc, warm)
            # Profiled before the c=1000 run, whose end cuts a thousand requests mid-way (and
            # so their sandbox connections): the profile shows the steady state.
            res["profile"] = profile(router, paths[ROUTER][0], secs)
            for c in (256, 1000):
                runs[ROUTER][c] = wrk(paths[ROUTER][0], c, secs, router, warm)
            res["runs"] = {
                n: {str(c): {**vars(r), "per_core": r.rps_per_core} for c, r in by_c.items()}
                for n, by_c in runs.items()
            }
        finally:
            for p in started:
                p.stop()
        size = 64 << 20 if quick else GiB
        res["streaming"] = streaming.run(redis.url, f"{prefix}-s", size, logs).to_json()
        ws = scale.websockets(redis.url, f"{prefix}-w", 1000 if quick else 10_000, logs)
        res["websockets"] = ws.to_json()
        redis.stop()
    return res


def _f(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def report(res: dict[str, Any]) -> str:
    runs = res["runs"]
    r32 = runs[ROUTER]["32"]
    lines = [
        "# Request path bench (issue #16)",
        "",
        f"Run {res['when']}{' (quick)' if res['quick'] else ''} by `python -m bench.path`, on a "
        "shared 2-core machine with other work running: absolute req/s are low and noisy "
        "(±20 %); compare per core and the ratios. wrk -t1; upstream nginx (1 worker, 40 B).",
        "",
        "| path | c=1 p50 / p99 ms | c=32 req/s | c=32 p99 ms | req/s per proxy core (c=32) |",
        "|---|---|---|---|---|",
    ]
    for name, by_c in runs.items():
        one, c32 = by_c["1"], by_c["32"]
        lines.append(
            f"| {name} | {one['p50_ms']:.3f} / {one['p99_ms']:.2f} | {c32['rps']:,.0f} | "
            f"{c32['p99_ms']:.1f} | {_f(c32['per_core'])} |"
        )
    for name, why in res.get("not_run", {}).items():
        lines.append(f"| {name} | not run: {why} | | | |")
    lines += ["", "Ratios (per core, c=32):", ""]
    for peer in (CHP, BARE, NGINX):
        if peer in runs and runs[peer]["32"]["per_core"]:
            ratio = r32["per_core"] / runs[peer]["32"]["per_core"]
            lines.append(f"- router / {peer}: **{ratio:.2f}x**")
    d1, r1 = runs["direct"]["1"], runs[ROUTER]["1"]
    lines += [
        f"- added latency at c=1 (router - direct): p50 **{r1['p50_ms'] - d1['p50_ms']:.3f} ms**, "
        f"p99 {r1['p99_ms'] - d1['p99_ms']:.2f} ms",
        "",
        "One warm session under many connections (router):",
        "",
        "| c | req/s | vs c=32 | per core | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for c in ("32", "256", "1000"):
        r = runs[ROUTER][c]
        lines.append(
            f"| {c} | {r['rps']:,.0f} | {r['rps'] / r32['rps']:.0%} | {_f(r['per_core'])} | "
            f"{r['p99_ms']:.1f} | {r['errors']} |"
        )
    st = res["streaming"]
    lines += [
        "",
        "Streaming (one transfer each way):",
        "",
        "| proxy | direction | GB/s per core | RSS growth MiB |",
        "|---|---|---|---|",
    ]
    for who in ("router", "bare"):
        for t in st[who]:
            lines.append(
                f"| {who} | {t['direction']} {t['bytes'] >> 20} MiB | {t['gb_per_core_s']:.2f} | "
                f"{t['rss_growth_mib']:.1f} |"
            )
    ws = res["websockets"]
    lines += [
        "",
        f"Idle WebSockets held by one router process: {ws['held']:,} of {ws['wanted']:,}, "
        f"**{ws['kib_per_ws']:.1f} KiB each** (RSS growth / held)"
        + (f"; {ws['note']}." if ws.get("note") else "."),
        "",
        "Where the router's CPU goes at c=32 (py-spy, share of on-CPU samples by leaf frame):",
        "",
    ]
    prof = res["profile"]
    if "not_run" in prof:
        lines.append(f"not run: {prof['not_run']}")
    else:
        lines += ["| frame | % |", "|---|---|"]
        lines += [f"| `{f}` | {p} |" for f, p in prof["top_self"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    for tool in ("wrk", "nginx", "redis-server", "curl"):
        if shutil.which(tool) is None:
            print(f"bench.path: {tool} is not installed", file=sys.stderr)
            return 2
    res = run(args.quick, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "path.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "path.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
