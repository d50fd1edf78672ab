"""Every Redis key and channel name sessionpool uses, built in one place.

Keys of one pool carry the pool name as a hash tag (`{pool}`) so each Lua script touches a single
slot and runs unchanged on Redis Cluster. Pool names cannot contain braces, and identifiers come
after the tag, so a `{` inside an identifier never moves a key to another slot.

| key                          | type   | holds                                               |
|------------------------------|--------|-----------------------------------------------------|
| `P:pools`                    | set    | names of defined pools                              |
| `P:pool:{p}`                 | string | the pool definition (JSON, with secrets)            |
| `P:sandboxes:{p}`            | hash   | sandbox id -> sandbox record (JSON)                 |
| `P:ready:{p}`                | zset   | ready sandbox ids, scored by ready time (ms)        |
| `P:warming:{p}`              | zset   | sandbox ids being started, scored by start (ms)     |
| `P:sessions:{p}`             | hash   | identifier -> session record (JSON)                 |
| `P:expiry:{p}`               | zset   | identifier -> expiresAt (ms); its size = allocated  |
| `P:events:{p}`               | stream | work for the workers (allocated, pool-empty, ...)   |
| `P:emptyflag:{p}`            | string | rate-limits `pool-empty` events                     |
| `P:demand:{p}`               | zset   | identifiers waiting for a sandbox -> until (ms)     |
| `P:log:{p}`                  | stream | session lifecycle events for operators              |
| `P:mcpkey:{p}`               | string | the pool's MCP API key (plain: fetch returns it)    |
| `P:mcpenv:{p}:id`            | string | an MCP environment: "new" until first use, "live"   |
| `P:mcpnew:{p}`               | zset   | MCP environments not used yet -> until (ms)         |
| `P:inval` (channel)          | pubsub | "pool\\0identifier": drop cached routes             |
| `P:readych` (channel)        | pubsub | "pool": a sandbox became ready (wakes waiters)      |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolKeys:
    """The keys of one pool."""

    pool: str
    definition: str
    sandboxes: str
    ready: str
    warming: str
    sessions: str
    expiry: str
    events: str
    empty_flag: str
    log: str
    demand: str
    mcp_key: str
    mcp_env_prefix: str
    mcp_unused: str

    def mcp_env(self, environment: str) -> str:
        """An MCP environment's record (the identifier after the tag: any is safe)."""
        return f"{self.mcp_env_prefix}:{environment}"


# Each PoolKeys field's kind: its key is `prefix:kind:{pool}` (the table above).
POOL_KINDS = {
    "definition": "pool",
    "sandboxes": "sandboxes",
    "ready": "ready",
    "warming": "warming",
    "sessions": "sessions",
    "expiry": "expiry",
    "events": "events",
    "empty_flag": "emptyflag",
    "log": "log",
    "demand": "demand",
    "mcp_key": "mcpkey",
    "mcp_env_prefix": "mcpenv",
    "mcp_unused": "mcpnew",
}


@dataclass(frozen=True, slots=True)
class Keys:
    """Key factory for one deployment (`prefix` separates deployments and tests)."""

    prefix: str = "sp"

    @property
    def pools(self) -> str:
        return f"{self.prefix}:pools"

    @property
    def invalidation_channel(self) -> str:
        return f"{self.prefix}:inval"

    @property
    def ready_channel(self) -> str:
        return f"{self.prefix}:readych"

    def pool(self, name: str) -> PoolKeys:
        tag = f"{{{name}}}"
        return PoolKeys(
            name, **{f: f"{self.prefix}:{kind}:{tag}" for f, kind in POOL_KINDS.items()}
        )


# Separates the pool from the identifier in an invalidation message (neither can contain it).
SEP = "\x00"


def invalidation_message(pool: str, identifier: str) -> str:
    return f"{pool}{SEP}{identifier}"
