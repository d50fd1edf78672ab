"""Run every benchmark side by side and write results.md, results.json and results.png.

    python -m bench.run [--quick] [--no-docker] [--out DIR]

Everything runs against its own redis-server (a unix socket in a temporary directory) under a
fresh key prefix; Docker containers carry `io.sessionpool.scope=<prefix>` and are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench.common import (
    BENCH,
    RESULTS,
    GiB,
    MiB,
    MissingRequirement,
    RedisServer,
    require_python,
    which,
)

T = TypeVar("T")
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def check_requirements() -> None:
    """Fail early, with the fix, when something bench/README.md lists is missing."""
    require_python("matplotlib", "pip install matplotlib (see bench/README.md)")
    for tool, hint in (
        ("wrk", "apt-get install wrk"),
        ("redis-server", "apt-get install redis-server"),
    ):
        if which(tool) is None:
            raise MissingRequirement(f"{tool} is not installed ({hint})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--no-docker", action="store_true", help="skip the Docker sections")
    p.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_requirements()
    except MissingRequirement as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    from bench import allocation, pool, proxying, report, scale, streaming

    quick = args.quick
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    results = report.Results(quick=quick, skipped={})
    assert results.skipped is not None
    failed: list[str] = []
    t_start = time.monotonic()

    def section(name: str, fn: Callable[[], T]) -> T | None:
        t0 = time.monotonic()
        print(f"bench: {name} ...", flush=True)
        try:
            value = fn()
        except Exception as exc:
            traceback.print_exc()
            failed.append(name)
            assert results.skipped is not None
            results.skipped[name] = f"error: {type(exc).__name__}: {exc}".replace("\n", " ")
            return None
        print(f"bench: {name} done in {time.monotonic() - t0:.1f} s", flush=True)
        return value

    with tempfile.TemporaryDirectory(prefix="spbench-") as tmp:
        work = Path(tmp)
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        redis = RedisServer(work).start()
        try:
            results.proxy = section(
                "proxy",
                lambda: proxying.run(
                    work,
                    redis.url,
                    f"{prefix}-proxy",
                    [1, 32, 256],
                    1 if quick else 5,
                    0 if quick else 1,
                    logs,
                    rep_connections=0 if quick else 2,
                ),
            )
            size = 64 * MiB if quick else GiB
            results.streaming = section(
                "streaming", lambda: streaming.run(redis.url, f"{prefix}-stream", size, logs)
            )
            results.allocation = section(
                "allocation",
                lambda: allocation.run(redis.url, f"{prefix}-alloc", 20 if quick else 200, 8, logs),
            )
            if args.no_docker:
                results.skipped["docker"] = "not run: --no-docker"
            else:
                results.pool = section(
                    "docker",
                    lambda: pool.run(
                        redis.url, f"{prefix}-docker", 1 if quick else 5, 3 if quick else 20, logs
                    ),
                )
            n = 5_000 if quick else 100_000
            results.redis = section(
                "redis",
                lambda: asyncio.run(
                    scale.redis_scale(redis.url, f"{prefix}-scale", n, [n // 100, n // 10])
                ),
            )
            results.websockets = section(
                "websockets",
                lambda: scale.websockets(redis.url, f"{prefix}-ws", 500 if quick else 10_000, logs),
            )
        finally:
            redis.stop()

    elapsed = time.monotonic() - t_start
    header = (
        f"## Results{' (--quick)' if quick else ''}\n\n"
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}: "
        f"{_cpus()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; code {_revision()}; "
        f"whole run {elapsed:.0f} s. "
        "Ratios are measured / anchor; anchors were measured in this same run "
        "unless marked ref. (the 2-core reference figures)."
    )
    md = report.markdown(results, header)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(_json(results), indent=1, default=str))
    section("chart", lambda: report.chart(results, out / "results.png"))
    if not quick and out.resolve() == RESULTS.resolve():
        _update_readme(md)
    print(md)
    print(f"bench: wrote {out / 'results.md'} and {out / 'results.png'} in {elapsed:.0f} s")
    if failed:
        print(f"bench: sections failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _revision() -> str:
    """What was measured: BENCH_REV when set, else the commit (and whether the tree is dirty)."""
    import os
    import subprocess

    if os.environ.get("BENCH_REV"):
        return os.environ["BENCH_REV"]
    root = str(BENCH.parent)
    try:
        rev = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "router", "workers"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev or 'unknown'}{' + uncommitted router/workers changes' if dirty else ''}"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _json(r: Any) -> dict[str, Any]:
    def conv(x: Any) -> Any:
        if x is None:
            return None
        if hasattr(x, "to_json"):
            return x.to_json()
        if isinstance(x, list):
            return [conv(i) for i in x]
        return x

    return {k: conv(v) for k, v in vars(r).items()}


def _update_readme(md: str) -> None:
    readme = BENCH / "README.md"
    text = readme.read_text()
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        readme.write_text(f"{head}{README_START}\n{md}\n{README_END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
