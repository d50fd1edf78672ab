"""`python -m bench.run --quick` runs to the end and reports every SPEC §10 row (no timings
are asserted: benchmarks are not timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import ROWS

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(300)]


def test_quick_run_reports_every_row(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    for row in ROWS:
        stem = row.split("(")[0].split("1 GiB")[0].strip()
        assert stem in table, f"row missing: {row}"
    assert "error:" not in table
    assert "not run: --no-docker" not in table
    assert (tmp_path / "results.png").stat().st_size > 0
    raw = json.loads((tmp_path / "results.json").read_text())
    assert all(
        raw[k] is not None
        for k in ("proxy", "streaming", "allocation", "pool", "redis", "websockets")
    )
