"""Load generation with wrk: one run's req/s, latency percentiles and the proxy's CPU seconds."""

from __future__ import annotations

import re
import resource
import subprocess
from dataclasses import dataclass

from bench.common import MissingRequirement, Proc, which

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True)
class LoadResult:
    """One wrk run. Latencies in ms; `cpu_s` is the proxy's CPU time during the run."""

    connections: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_s: float
    load_cpu_s: float = 0.0  # wrk's own CPU time during the run (it shares the machine)

    @property
    def rps_per_core(self) -> float | None:
        """Requests per CPU second of the proxy (None without a proxy process)."""
        return self.requests / self.cpu_s if self.cpu_s > 0 else None


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if m is None:
        raise ValueError(f"wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> tuple[int, float, float, float, int]:
    """(requests, req/s, p50 ms, p99 ms, errors) from `wrk --latency` output."""
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+[a-z]+)", out, re.MULTILINE))
    if "50" not in pct or "99" not in pct:
        raise ValueError(f"wrk printed no latency distribution:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(m.group(1)) if m else 0
    return requests, rps, _ms(pct["50"]), _ms(pct["99"]), errors


def wrk(
    url: str, connections: int, duration_s: int, proxy: Proc | None = None, warmup_s: int = 0
) -> LoadResult:
    """Run wrk with one thread (as the reference figures did); measure the proxy's CPU.

    wrk takes whole seconds only.
    """
    exe = which("wrk")
    if exe is None:
        raise MissingRequirement("wrk is not installed (apt-get install wrk)")
    threads = "1"
    if warmup_s > 0:
        subprocess.run(
            [exe, "-t", threads, "-c", str(connections), "-d", f"{int(warmup_s)}s", url],
            capture_output=True,
            check=True,
            timeout=warmup_s + 30,
        )
    cpu0 = proxy.cpu() if proxy else 0.0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [
            exe,
            "-t",
            threads,
            "-c",
            str(connections),
            "-d",
            f"{int(duration_s)}s",
            "--latency",
            "--timeout",
            "5s",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration_s + 30,
    )
    cpu = (proxy.cpu() - cpu0) if proxy else 0.0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    requests, rps, p50, p99, errors = parse_wrk(done.stdout)
    return LoadResult(connections, duration_s, requests, rps, p50, p99, errors, cpu, load_cpu)
