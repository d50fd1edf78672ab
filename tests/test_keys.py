"""The key names are a contract with the Lua scripts and with running deployments: pinned."""

from __future__ import annotations

from router.keys import Keys, PoolKeys, invalidation_message

POOL_KEYS = {
    "pool": "my-pool",
    "definition": "sp:pool:{my-pool}",
    "sandboxes": "sp:sandboxes:{my-pool}",
    "ready": "sp:ready:{my-pool}",
    "warming": "sp:warming:{my-pool}",
    "sessions": "sp:sessions:{my-pool}",
    "expiry": "sp:expiry:{my-pool}",
    "events": "sp:events:{my-pool}",
    "empty_flag": "sp:emptyflag:{my-pool}",
    "log": "sp:log:{my-pool}",
    "demand": "sp:demand:{my-pool}",
    "mcp_key": "sp:mcpkey:{my-pool}",
    "mcp_env_prefix": "sp:mcpenv:{my-pool}",
    "mcp_unused": "sp:mcpnew:{my-pool}",
}


def test_pool_keys_are_prefix_kind_and_hash_tag() -> None:
    k = Keys("sp").pool("my-pool")
    assert {name: getattr(k, name) for name in PoolKeys.__slots__} == POOL_KEYS
    assert k.mcp_env("e{1}") == "sp:mcpenv:{my-pool}:e{1}"


def test_deployment_keys() -> None:
    keys = Keys("t1")
    channels = (keys.pools, keys.invalidation_channel, keys.ready_channel)
    assert channels == ("t1:pools", "t1:inval", "t1:readych")
    assert invalidation_message("p", "id") == "p\x00id"
