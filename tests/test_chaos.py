"""A short chaos run (the long one is `python -m tests.chaos --duration 600`)."""

from __future__ import annotations

import pytest

from tests.chaos import Chaos

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(420)]


async def test_short_chaos_run_has_no_violations() -> None:
    chaos = Chaos(duration_s=25, seed=11, clients=4, identifiers=12)
    violations = await chaos.run()
    assert sum(chaos.faults.values()) >= 3  # faults were really injected
    assert len([r for r in chaos.records if r.status == 200]) > 50  # and load really ran
    assert violations == 0
