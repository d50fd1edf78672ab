"""Typed records across the Redis boundary: events, sandbox records, script results, errors."""

from __future__ import annotations

import orjson
import pytest

from router import events
from router.errors import StoreUnavailableError
from router.events import Allocated, PoolDeleted, Teardown
from router.keys import Keys
from router.sandboxes import MarkReady, Sandbox, SandboxState
from router.store import Store, open_redis
from tests.helpers import FakeSandbox, add_ready, make_pool


def test_events_round_trip_and_read_what_lua_writes() -> None:
    for event in (Teardown("s1", "idle", "c1", "user"), Allocated("s1", "user"), PoolDeleted()):
        assert events.decode(events.encode(event)) == event
    lua = orjson.dumps({"kind": "teardown", "sandbox": "s2", "container": "c", "reason": "x"})
    assert events.decode(lua) == Teardown(sandbox="s2", container="c", reason="x")
    assert events.decode(b'{"kind": "from-the-future"}') is None
    assert events.decode(b"not json") is None
    assert events.decode(b'{"kind": "teardown"}') is None  # no sandbox: malformed


async def test_records_and_results_come_back_typed(store: Store) -> None:
    pool = make_pool()
    await store.put_pool(pool)
    sb = await FakeSandbox().start()
    try:
        sid = await add_ready(store, pool, sb)
        rec = await store.sandbox("demo", sid)
        assert rec is not None and rec.state is SandboxState.READY and rec.live
        assert rec.addr == sb.addr and rec.version == pool.version and rec.ready_ms
        assert await store.ready_ids("demo") == [sid]
        claimed = await store.claim(pool, "typed-user")
        assert claimed.created
        (after,) = (await store.sandboxes("demo")).values()
        assert after.state is SandboxState.ALLOCATED and after.identifier == "typed-user"
        # MARK_READY of a record that is no longer warming is a named no-op, not a 0
        assert await store.mark_ready("demo", sid, "c", sb.addr) is MarkReady.GONE
    finally:
        await sb.close()
    with pytest.raises(ValueError, match="unknown"):
        Sandbox.loads("x", b'{"state": "unknown"}')


async def test_an_unreachable_store_raises_the_tree_error() -> None:
    redis = open_redis("unix:///nonexistent/redis.sock", timeout_s=0.5)
    store = Store(redis, Keys("t"))
    try:
        with pytest.raises(StoreUnavailableError) as err:
            await store.pool_names()
        assert err.value.status == 503 and err.value.headers == {"Retry-After": "1"}
    finally:
        await redis.aclose()
