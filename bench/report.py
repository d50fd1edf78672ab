"""The results table (one row per SPEC §10 target) and the chart."""

# ruff: noqa: RUF001 - the table uses the multiplication sign and en dash, as SPEC §10 does

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.allocation import Latencies
from bench.load import LoadResult
from bench.pool import PoolResults
from bench.proxying import ProxyResults
from bench.scale import RedisScale, WebSocketScale
from bench.streaming import StreamingResults

ROUTER, BARE, CHP, NGINX, DIRECT = (
    "sessionpool router",
    "bare aiohttp proxy",
    "configurable-http-proxy",
    "nginx proxy_pass",
    "direct",
)
THROUGHPUT_C = 32  # the concurrency the per-core comparison is read at (as the reference)

# The SPEC §10 rows, in order; `run.py` and the smoke test check every one is present.
ROWS = (
    "router throughput per core vs configurable-http-proxy",
    "router throughput per core vs bare aiohttp proxy",
    "added latency over direct, p50 / p99, c=1",
    "streaming 1 GiB through the router (GB/s per core)",
    "router memory growth while streaming",
    "allocation from a warm pool, p50 / p99",
    "allocation when the pool has run dry",
    "pool refill",
    "teardown lag after expiry, p99",
    "Redis per session (100 000 sessions)",
    "reaper cost proportional to what expires",
    "idle WebSockets held by one router process",
)


@dataclass
class Row:
    what: str
    measured: str
    anchor: str
    ratio: str
    target: str
    met: str


@dataclass
class Results:
    quick: bool
    proxy: ProxyResults | None = None
    streaming: StreamingResults | None = None
    allocation: list[Latencies] | None = None
    pool: PoolResults | None = None
    redis: RedisScale | None = None
    websockets: WebSocketScale | None = None
    skipped: dict[str, str] | None = None  # section -> why

    def why(self, section: str) -> str:
        return (self.skipped or {}).get(section, "not run")


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _k(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def _per_core(res: ProxyResults, path: str) -> float | None:
    run = res.runs.get(path, {}).get(THROUGHPUT_C)
    return run.rps_per_core if run else None


def _proxy_rows(r: Results) -> list[Row]:
    p = r.proxy
    if p is None:
        why = r.why("proxy")
        return [Row(w, why, "", "", "", "—") for w in ROWS[:3]]
    router, bare, chp = _per_core(p, ROUTER), _per_core(p, BARE), _per_core(p, CHP)
    rows = []
    target = "≥ 1.5× CHP"
    if router and chp:
        ratio = router / chp
        rows.append(
            Row(
                ROWS[0],
                f"{_k(router)} req/s per core (c={THROUGHPUT_C})",
                f"CHP {_k(chp)} req/s per core, this run (ref. ~5.7k)",
                f"{ratio:.2f}×",
                target,
                _yes(ratio >= 1.5),
            )
        )
    else:
        rows.append(
            Row(
                ROWS[0],
                f"{_k(router or 0)} req/s per core",
                f"CHP {p.not_run.get(CHP, 'not run')}",
                "—",
                target,
                "—",
            )
        )
    ratio = (router or 0) / bare if bare else 0.0
    rows.append(
        Row(
            ROWS[1],
            f"{_k(router or 0)} req/s per core (c={THROUGHPUT_C})",
            f"bare aiohttp {_k(bare or 0)} req/s per core, this run (ref. ~6.3k)",
            f"{ratio:.2f}×",
            "≥ 0.95× bare",
            _yes(ratio >= 0.95),
        )
    )
    direct = p.runs[DIRECT][1]
    r1, b1 = p.runs[ROUTER][1], p.runs[BARE][1]
    add50, add99 = r1.p50_ms - direct.p50_ms, r1.p99_ms - direct.p99_ms
    bare50, bare99 = b1.p50_ms - direct.p50_ms, b1.p99_ms - direct.p99_ms
    rows.append(
        Row(
            ROWS[2],
            f"{add50:+.3f} / {add99:+.3f} ms",
            f"bare aiohttp +{bare50:.3f} / +{bare99:.3f} ms this run (ref. aiohttp +0.265 ms p50)",
            f"{add50 / bare50:.2f}× (p50)" if bare50 > 0 else "—",
            "≤ 0.3 / ≤ 1 ms",
            _yes(add50 <= 0.3 and add99 <= 1.0),
        )
    )
    return rows


def _stream_rows(r: Results) -> list[Row]:
    s = r.streaming
    if s is None:
        return [Row(w, r.why("streaming"), "", "", "", "—") for w in ROWS[3:5]]
    size = s.router[0].bytes
    label = f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"
    worst = min(t.gb_per_core_s for t in s.router)
    bare = min(t.gb_per_core_s for t in s.bare)
    parts = ", ".join(f"{t.direction} {t.gb_per_core_s:.2f}" for t in s.router)
    growth = max(t.rss_growth_mib for t in s.router)
    bare_growth = max(t.rss_growth_mib for t in s.bare)
    return [
        Row(
            ROWS[3].replace("1 GiB", label),
            f"{worst:.2f} GB/s per core ({parts})",
            f"bare aiohttp {bare:.2f} this run (ref. 0.5–0.65)",
            f"{worst / bare:.2f}×",
            "≥ 0.6 GB/s per core",
            _yes(worst >= 0.6),
        ),
        Row(
            ROWS[4],
            f"{growth:.1f} MiB peak RSS growth",
            f"bare aiohttp {bare_growth:.1f} MiB this run",
            "—",
            "≤ 16 MiB",
            _yes(growth <= 16),
        ),
    ]


def _pool_rows(r: Results) -> list[Row]:
    rows = []
    a = r.allocation
    if a:
        seq, par = a[0], a[1]
        warm = r.pool.warm_docker if r.pool else None
        anchor = f"{par.label}: {par.p50:.2f} / {par.p99:.2f} ms" + (
            f"; real containers ({len(warm.ms)}): {warm.p50:.2f} / {warm.p99:.2f} ms"
            if warm and warm.ms
            else ""
        )
        rows.append(
            Row(
                ROWS[5],
                f"{seq.p50:.2f} / {seq.p99:.2f} ms ({len(seq.ms)} claims, one at a time)",
                anchor,
                "—",
                "≤ 5 / ≤ 20 ms",
                _yes(seq.p50 <= 5 and seq.p99 <= 20 and par.p50 <= 5 and par.p99 <= 20),
            )
        )
    else:
        rows.append(Row(ROWS[5], r.why("allocation"), "", "", "≤ 5 / ≤ 20 ms", "—"))
    pr = r.pool
    if pr is None:
        why = r.why("docker")
        rows += [
            Row(ROWS[6], why, "", "", "≤ 1.3× bare docker run", "—"),
            Row(ROWS[7], why, "", "", "≥ 5 sandboxes/s", "—"),
            Row(ROWS[8], why, "", "", "p99 ≤ 1 s", "—"),
        ]
        return rows
    ratio = pr.cold.p50 / pr.docker_run.p50
    rows.append(
        Row(
            ROWS[6],
            f"p50 {pr.cold.p50:.0f} ms, p99 {pr.cold.p99:.0f} ms ({len(pr.cold.ms)} requests)",
            f"bare docker run → port answers: p50 {pr.docker_run.p50:.0f} ms (ref. ~250 ms)",
            f"{ratio:.2f}× (p50)",
            "≤ 1.3× bare docker run",
            _yes(ratio <= 1.3),
        )
    )
    rows.append(
        Row(
            ROWS[7],
            f"{pr.refill_rate:.1f} sandboxes/s ({pr.refill_n} in {pr.refill_s:.1f} s)",
            f"bare docker run p50 {pr.docker_run.p50:.0f} ms each, one at a time",
            f"{pr.refill_rate / 5:.2f}× target",
            "≥ 5 sandboxes/s",
            _yes(pr.refill_rate >= 5),
        )
    )
    lags = pr.teardown_lag_ms
    if lags:
        lat = Latencies("lag", lags)
        rows.append(
            Row(
                ROWS[8],
                f"p50 {lat.p50:.0f} ms, p99 {lat.p99:.0f} ms ({len(lags)} sessions, cooldown 1 s)",
                "ref. `docker rm -f` ~100 ms",
                "—",
                "p99 ≤ 1 s",
                _yes(lat.p99 <= 1000),
            )
        )
    else:
        rows.append(Row(ROWS[8], "no destroy event seen", "", "", "p99 ≤ 1 s", "**no**"))
    return rows


def _scale_rows(r: Results) -> list[Row]:
    rows = []
    rs = r.redis
    if rs is None:
        rows += [Row(w, r.why("redis"), "", "", "", "—") for w in ROWS[9:11]]
    else:
        label = ROWS[9].replace("100 000", f"{rs.sessions:,}".replace(",", " "))
        rows.append(
            Row(
                label,
                f"{rs.bytes_per_session:.0f} bytes per session",
                "session + expiry + its sandbox record + capped streams",
                "—",
                "≤ 1 KiB",
                _yes(rs.bytes_per_session <= 1024),
            )
        )
        idle, *due = rs.sweeps
        per = [s.us_per_session for s in due]
        spread = max(per) / min(per) if per and min(per) > 0 else math.inf
        text = ", ".join(f"{s.expired:,} due: {s.seconds * 1000:.0f} ms" for s in due)
        rows.append(
            Row(
                ROWS[10],
                f"{text}; nothing due: {idle.seconds * 1000:.2f} ms",
                f"{' / '.join(f'{p:.0f}' for p in per)} µs per expired session",
                f"{spread:.2f}× (per-session cost spread)",
                "cost ∝ expired",
                _yes(spread <= 2.0 and idle.seconds < 0.01),
            )
        )
    ws = r.websockets
    if ws is None:
        rows.append(Row(ROWS[11], r.why("websockets"), "", "", "10 000, ≤ 20 KiB each", "—"))
    else:
        note = f" ({ws.note})" if ws.note else ""
        rows.append(
            Row(
                ROWS[11],
                f"{ws.held:,} held, {ws.kib_per_ws:.1f} KiB each{note}",
                "—",
                f"{ws.kib_per_ws / 20:.2f}× budget",
                "10 000, ≤ 20 KiB each",
                _yes(ws.held >= 10_000 and ws.kib_per_ws <= 20),
            )
        )
    return rows


def rows(r: Results) -> list[Row]:
    return [*_proxy_rows(r), *_stream_rows(r), *_pool_rows(r), *_scale_rows(r)]


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _load_table(runs: dict[str, dict[int, LoadResult]], direct: str = DIRECT) -> str:
    body = []
    for name, by_c in runs.items():
        for c, x in by_c.items():
            d = runs[direct].get(c)
            added = f"{x.p50_ms - d.p50_ms:+.3f}" if d and name != direct else "—"
            body.append(
                [
                    name,
                    str(c),
                    f"{x.rps:,.0f}",
                    f"{x.p50_ms:.3f} / {x.p99_ms:.3f}",
                    added,
                    f"{x.cpu_s:.2f}",
                    f"{x.rps_per_core:,.0f}" if x.rps_per_core else "—",
                    str(x.errors),
                ]
            )
    return _table(
        [
            "path",
            "conns",
            "req/s",
            "p50 / p99 ms",
            "added p50 ms",
            "proxy CPU s",
            "req/s per proxy core",
            "errors",
        ],
        body,
    )


def markdown(r: Results, header: str) -> str:
    main = _table(
        ["what (SPEC §10)", "measured", "anchor", "ratio", "target", "met"],
        [[x.what, x.measured, x.anchor, x.ratio, x.target, x.met] for x in rows(r)],
    )
    out = [header, "", main, ""]
    if r.proxy is not None:
        out += [
            "### Proxy runs",
            "",
            f"Upstream: {r.proxy.upstream}.",
            "",
            _load_table(r.proxy.runs),
            "",
        ]
        if r.proxy.representative:
            out += [
                "Representative sandbox: the echo image's aiohttp app "
                "(sessionpool/demo/echo.py, `/health`) on the host.",
                "",
                _load_table(r.proxy.representative),
                "",
            ]
        for name, why in r.proxy.not_run.items():
            out.append(f"- {name}: not run: {why}")
    if r.streaming is not None:
        body = [
            [
                who,
                t.direction,
                f"{t.bytes >> 20} MiB",
                f"{t.wall_s:.2f}",
                f"{t.cpu_s:.2f}",
                f"{t.gb_per_core_s:.2f}",
                f"{t.rss_growth_mib:.1f}",
            ]
            for who, ts in (("router", r.streaming.router), ("bare aiohttp", r.streaming.bare))
            for t in ts
        ]
        out += [
            "",
            "### Streaming",
            "",
            _table(
                [
                    "proxy",
                    "direction",
                    "size",
                    "wall s",
                    "proxy CPU s",
                    "GB/s per core",
                    "peak RSS growth MiB",
                ],
                body,
            ),
        ]
    lats = list(r.allocation or [])
    if r.pool is not None:
        lats += [r.pool.warm_docker, r.pool.cold, r.pool.docker_run]
    if lats:
        out += [
            "",
            "### Allocation latencies",
            "",
            _table(
                ["what", "n", "p50 ms", "p99 ms", "max ms"],
                [
                    [
                        x.label,
                        str(len(x.ms)),
                        f"{x.p50:.2f}",
                        f"{x.p99:.2f}",
                        f"{max(x.ms):.2f}" if x.ms else "—",
                    ]
                    for x in lats
                ],
            ),
        ]
    if r.redis is not None:
        out += [
            "",
            "### Redis",
            "",
            _table(
                ["key", "bytes (MEMORY USAGE)", "per session"],
                [
                    [k, f"{v:,}", f"{v / r.redis.sessions:.0f}"]
                    for k, v in r.redis.breakdown.items()
                ],
            ),
            "",
            f"Seeding {r.redis.sessions:,} sandboxes and claims took {r.redis.seed_s:.1f} s.",
        ]
    if r.skipped:
        out += ["", *[f"- {k}: {v}" for k, v in r.skipped.items()]]
    return "\n".join(out) + "\n"


def chart(r: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0][0]
    if r.proxy is not None:
        names = [n for n in r.proxy.runs if n != DIRECT]
        conns = sorted({c for by_c in r.proxy.runs.values() for c in by_c})
        width = 0.8 / max(1, len(conns))
        for i, c in enumerate(conns):
            vals = [
                (r.proxy.runs[n].get(c) and r.proxy.runs[n][c].rps_per_core) or 0 for n in names
            ]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=f"c={c}")
        ax.set_xticks([j + width * (len(conns) - 1) / 2 for j in range(len(names))])
        ax.set_xticklabels([n.replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("req/s per proxy core (log)")
        ax.set_title("Small requests: throughput per proxy core")
        ax.legend()
        ax = axes[0][1]
        names = list(r.proxy.runs)
        p50 = [r.proxy.runs[n][1].p50_ms * 1000 for n in names]
        p99 = [r.proxy.runs[n][1].p99_ms * 1000 for n in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([n.replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_ylabel("µs")
        ax.set_title("Latency at one connection")
        ax.legend()
    ax = axes[1][0]
    lats = list(r.allocation or [])
    if r.pool is not None:
        lats += [r.pool.warm_docker, r.pool.cold, r.pool.docker_run]
    lats = [x for x in lats if x.ms]
    if lats:
        ax.boxplot([x.ms for x in lats], whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(lats) + 1))
        ax.set_xticklabels([x.label.replace(", ", "\n") for x in lats], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title("First request of a new identifier (box: p25–p75, whiskers p1–p99)")
    ax = axes[1][1]
    attain = _attainment(r)
    if attain:
        labels, vals = zip(*attain, strict=True)
        ax.barh(range(len(vals)), vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
        ax.axvline(1.0, color="black", lw=1)
        ax.set_yticks(range(len(vals)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("headroom vs target (≥ 1 = met; log)")
        ax.set_title("Targets")
    fig.suptitle("sessionpool benchmarks" + (" (--quick)" if r.quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _attainment(r: Results) -> list[tuple[str, float]]:
    """(label, headroom) where headroom ≥ 1 means the target is met."""
    out: list[tuple[str, float]] = []

    def add(label: str, f: Callable[[], float]) -> None:
        try:
            v = f()
        except (TypeError, ZeroDivisionError, KeyError, IndexError, AttributeError):
            return
        if v > 0 and math.isfinite(v):
            out.append((label, v))

    p: Any = r.proxy
    add("per core vs CHP", lambda: _per_core(p, ROUTER) / _per_core(p, CHP) / 1.5)  # type: ignore[operator]
    add("per core vs bare", lambda: _per_core(p, ROUTER) / _per_core(p, BARE) / 0.95)  # type: ignore[operator]
    add(
        "added p50 c=1",
        lambda: 0.3 / max(1e-3, p.runs[ROUTER][1].p50_ms - p.runs[DIRECT][1].p50_ms),
    )
    add(
        "added p99 c=1",
        lambda: 1.0 / max(1e-3, p.runs[ROUTER][1].p99_ms - p.runs[DIRECT][1].p99_ms),
    )
    s: Any = r.streaming
    add("GB/s per core", lambda: min(t.gb_per_core_s for t in s.router) / 0.6)
    add("stream memory", lambda: 16 / max(0.1, max(t.rss_growth_mib for t in s.router)))
    a: Any = r.allocation
    add("warm alloc p50", lambda: 5 / a[0].p50)
    add("warm alloc p99", lambda: 20 / max(a[0].p99, a[1].p99))
    pr: Any = r.pool
    add("dry pool", lambda: 1.3 / (pr.cold.p50 / pr.docker_run.p50))
    add("refill", lambda: pr.refill_rate / 5)
    add("teardown p99", lambda: 1000 / Latencies("", pr.teardown_lag_ms).p99)
    rs: Any = r.redis
    add("Redis per session", lambda: 1024 / rs.bytes_per_session)
    ws: Any = r.websockets
    add("WebSocket KiB", lambda: 20 / ws.kib_per_ws)
    return out
