"""Workers on the kubernetes runtime: what only it has. The scenarios every runtime shares run
on it from tests/test_workers.py (against the fake API server, and a real cluster under the
`k8s_cluster` marker: tests/worker_rigs.py says how)."""

from __future__ import annotations

import orjson
import pytest

from router.pools import parse_pool
from router.store import Store
from sessionpool.testing import wait_until
from tests.worker_rigs import KubeRig, on
from workers.runtime import LABEL_SCOPE

pytestmark = [pytest.mark.timeout(180)]


@on("kubernetes")
async def test_unschedulable_pool_fails_creates_with_the_reason_and_leaves_nothing(
    rig: KubeRig, store: Store
) -> None:
    await rig.start_worker()
    pool = rig.pool("nowhere", ready=2)
    body = orjson.loads(pool.dumps())["properties"]
    body["sandboxConfiguration"] = {"nodeSelector": {"sessionpool.io/no-such-node": "true"}}
    await store.put_pool(parse_pool("nowhere", {"properties": body}))

    def logged() -> bool:
        text = "".join(log.read_text() for log in rig.workers.logs)
        return "not scheduled" in text and "node affinity/selector" in text

    await wait_until(logged, timeout=30)
    counts = await store.counts("nowhere")
    assert counts["ready"] == 0

    async def at_most_two() -> bool:
        # Every failed create removed its pod: only the ones being tried right now may exist.
        return len(await rig.cluster.pods(f"{LABEL_SCOPE}={store.keys.prefix}")) <= 2

    await wait_until(at_most_two, timeout=10)
