"""Lua scripts: every state change of a session or sandbox is one atomic script.

All keys of a script belong to one pool (one hash-tag slot). Time comes from Redis `TIME`, so
routers and workers on different hosts agree on `expiresAt`. Records are JSON (cjson); the
sandbox states are `warming` → `ready` → `allocated` → `stopping` (or `warming`/`ready` →
`stopping` when retired), and the record is deleted once its container is gone.

Events written to the pool's stream (field `data`, JSON with `kind`):
`allocated`, `pool-empty`, `teardown` (a sandbox must be destroyed; has `sandbox`, `container`,
`reason`, maybe `identifier`). Lifecycle events for operators go to the pool's log stream.
"""

from __future__ import annotations

_NOW = """
local _t = redis.call('TIME')
local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)
"""

# Ends one session: removes its records, marks its sandbox `stopping`, queues a teardown,
# logs and tells routers to drop the cached route. Shared by STOP and EXPIRE.
_END_SESSION = """
local function end_session(ident, raw, reason, maxlen, channel, pool)
  local sess = cjson.decode(raw)
  redis.call('HDEL', KEYS[1], ident)
  redis.call('ZREM', KEYS[2], ident)
  local container = sess.container or ''
  local sbraw = redis.call('HGET', KEYS[3], sess.sandbox)
  if sbraw then
    local sb = cjson.decode(sbraw)
    sb.state = 'stopping'
    sb.reason = reason
    sb.stoppingAt = now
    redis.call('HSET', KEYS[3], sess.sandbox, cjson.encode(sb))
    container = sb.container or container
  end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', 'data', cjson.encode({
    kind = 'teardown', sandbox = sess.sandbox, container = container,
    identifier = ident, reason = reason}))
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', maxlen, '*', 'data', cjson.encode({
    event = reason, identifier = ident, sandbox = sess.sandbox, at = now}))
  redis.call('PUBLISH', channel, pool .. '\\0' .. ident)
end
"""

CLAIM = (
    _NOW
    + """
-- Look up the session of an identifier (touching it), or allocate a ready sandbox to it.
-- KEYS[1] sessions hash   KEYS[2] expiry zset   KEYS[3] ready zset   KEYS[4] sandboxes hash
-- KEYS[5] events stream   KEYS[6] empty flag    KEYS[7] log stream   KEYS[8] demand zset
-- ARGV[1] identifier  ARGV[2] maxConcurrentSessions  ARGV[3] cooldown ms  ARGV[4] owner
-- ARGV[5] lifecycle (Timed|OnContainerExit)  ARGV[6] max alive ms  ARGV[7] stream maxlen
-- ARGV[8] current template version  ARGV[9] how long the caller waits for a sandbox (ms)
-- Returns {1, session} existing, {2, session} allocated now, {-1, ''} at the session limit,
-- {-2, ''} no ready sandbox (the caller is counted as demand and a pool-empty event queued).
local ident = ARGV[1]
local raw = redis.call('HGET', KEYS[1], ident)
if raw then
  -- A request is starting: that is activity (Timed sessions only; never moved backwards).
  local sess = cjson.decode(raw)
  if sess.lifecycle ~= 'OnContainerExit' then
    redis.call('ZADD', KEYS[2], 'XX', 'GT', now + tonumber(sess.cooldownMs), ident)
  end
  return {1, raw}
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return {-1, ''} end
while true do
  local popped = redis.call('ZPOPMIN', KEYS[3])
  if #popped == 0 then
    -- The replenisher starts a sandbox for every waiter, beyond readySessionInstances. A new
    -- waiter always wakes it (a burst must not wait out the flag); a waiter asking again
    -- (the same identifier retrying) does so at most every 250 ms.
    local new_waiter = redis.call('ZADD', KEYS[8], now + tonumber(ARGV[9]), ident)
    if new_waiter == 1 or redis.call('SET', KEYS[6], '1', 'NX', 'PX', 250) then
      redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'data',
        cjson.encode({kind = 'pool-empty'}))
    end
    return {-2, ''}
  end
  local sid = popped[1]
  local sbraw = redis.call('HGET', KEYS[4], sid)
  if sbraw then
    local sb = cjson.decode(sbraw)
    if sb.state == 'ready' and sb.version == ARGV[8] then
      sb.state = 'allocated'
      sb.identifier = ident
      sb.allocatedAt = now
      redis.call('HSET', KEYS[4], sid, cjson.encode(sb))
      local cooldown = tonumber(ARGV[3])
      local expires = now + cooldown
      if ARGV[5] == 'OnContainerExit' then expires = now + tonumber(ARGV[6]) end
      local sess = cjson.encode({sandbox = sid, container = sb.container, addr = sb.addr,
        createdAt = now, cooldownMs = cooldown, owner = ARGV[4], lifecycle = ARGV[5]})
      redis.call('HSET', KEYS[1], ident, sess)
      redis.call('ZADD', KEYS[2], expires, ident)
      redis.call('ZREM', KEYS[8], ident)
      redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'data', cjson.encode({
        kind = 'allocated', sandbox = sid, identifier = ident}))
      redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[7], '*', 'data', cjson.encode({
        event = 'allocated', identifier = ident, sandbox = sid, at = now}))
      return {2, sess}
    elseif sb.state == 'ready' then
      -- Made from an older template: retire it instead of handing it out.
      sb.state = 'stopping'
      sb.reason = 'replaced'
      redis.call('HSET', KEYS[4], sid, cjson.encode(sb))
      redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'data', cjson.encode({
        kind = 'teardown', sandbox = sid, container = sb.container, reason = 'replaced'}))
    end
  end
end
"""
)

TOUCH = (
    _NOW
    + """
-- Record activity: expiresAt = now + cooldown, never moved backwards, only for live sessions.
-- KEYS[1] expiry zset
-- ARGV pairs: identifier, cooldown ms
-- Returns the number of sessions that were still live.
local n = 0
for i = 1, #ARGV, 2 do
  n = n + redis.call('ZADD', KEYS[1], 'XX', 'GT', 'CH', now + tonumber(ARGV[i + 1]), ARGV[i])
end
return n
"""
)

STOP = (
    _NOW
    + _END_SESSION
    + """
-- End one session (stopSession, DELETE /session, container exit, liveness failure).
-- KEYS[1] sessions hash  KEYS[2] expiry zset  KEYS[3] sandboxes hash  KEYS[4] events stream
-- KEYS[5] log stream
-- ARGV[1] identifier  ARGV[2] reason  ARGV[3] sandbox id that must still hold it, or ''
-- ARGV[4] stream maxlen  ARGV[5] invalidation channel  ARGV[6] pool name
-- ARGV[7] the principal that must own it (tenant binding), or ''
-- Returns 1 when the session was ended, 0 when there was none (or it moved on, or it is
-- someone else's: the caller cannot tell that from absence, by design).
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local sess = cjson.decode(raw)
if ARGV[3] ~= '' and sess.sandbox ~= ARGV[3] then return 0 end
if ARGV[7] and ARGV[7] ~= '' and sess.owner ~= ARGV[7] then return 0 end
end_session(ARGV[1], raw, ARGV[2], ARGV[4], ARGV[5], ARGV[6])
return 1
"""
)

EXPIRE = (
    _NOW
    + _END_SESSION
    + """
-- End sessions whose expiresAt has passed; cost is proportional to what expires.
-- KEYS as STOP.
-- ARGV[1] batch limit  ARGV[2] stream maxlen  ARGV[3] invalidation channel  ARGV[4] pool name
-- Returns the identifiers ended.
local due = redis.call('ZRANGE', KEYS[2], '-inf', now, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[1]))
local ended = {}
for _, ident in ipairs(due) do
  local raw = redis.call('HGET', KEYS[1], ident)
  if raw then
    local reason = 'idle'
    if cjson.decode(raw).lifecycle == 'OnContainerExit' then reason = 'maxAlive' end
    end_session(ident, raw, reason, ARGV[2], ARGV[3], ARGV[4])
    ended[#ended + 1] = ident
  else
    redis.call('ZREM', KEYS[2], ident)
  end
end
return ended
"""
)

LAUNCH_ENVIRONMENT = (
    _NOW
    + """
-- Record a new MCP environment, unless the pool already has `cap` launched and not used yet.
-- KEYS[1] unused environments zset (id -> until, ms)   KEYS[2] the environment's record
-- ARGV[1] environment id   ARGV[2] how long an unused one lives (ms)   ARGV[3] cap
-- Returns 1 recorded, 0 at the cap.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[2], 'new', 'PX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)  -- every entry is due by then: nothing is left behind
return 1
"""
)

NEXT_EXPIRY = (
    _NOW
    + """
-- Milliseconds from now (this Redis' clock, the one expiresAt is written by) to the pool's
-- earliest expiresAt; nil when it has no session. One script, so one node on Redis Cluster.
-- KEYS[1] expiry zset
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then return false end
return math.max(tonumber(first[2]) - now, 0)
"""
)

RESERVE = (
    _NOW
    + """
-- Reserve warming slots so that ready + warming reaches the target and never passes it,
-- however many replenishers run. The target is readySessionInstances, plus the requests
-- waiting for a sandbox right now, plus what the recent allocation rate asks for above
-- readySessionInstances; waiters and that extra only as far as maxConcurrentSessions allows.
-- KEYS[1] ready zset  KEYS[2] warming zset  KEYS[3] sandboxes hash  KEYS[4] demand zset
-- KEYS[5] expiry zset
-- ARGV[1] readySessionInstances  ARGV[2] template version  ARGV[3] worker id
-- ARGV[4] maxConcurrentSessions  ARGV[5] demand-following target (>= ARGV[1])
-- ARGV[6..] candidate sandbox ids
-- Returns the sandbox ids reserved (records written in state `warming`).
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local demand = redis.call('ZCARD', KEYS[4])
local room = tonumber(ARGV[4]) - redis.call('ZCARD', KEYS[5])
if demand > room then demand = room end
if demand < 0 then demand = 0 end
local extra = tonumber(ARGV[5]) - tonumber(ARGV[1])
if extra > room - demand - tonumber(ARGV[1]) then extra = room - demand - tonumber(ARGV[1]) end
if extra < 0 then extra = 0 end
local have = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
local need = tonumber(ARGV[1]) + demand + extra - have
local out = {}
for i = 6, #ARGV do
  if #out >= need then break end
  local sid = ARGV[i]
  redis.call('HSET', KEYS[3], sid, cjson.encode({id = sid, state = 'warming',
    version = ARGV[2], createdAt = now, worker = ARGV[3]}))
  redis.call('ZADD', KEYS[2], now, sid)
  out[#out + 1] = sid
end
return out
"""
)

RETIRE_SURPLUS = (
    _NOW
    + """
-- Retire ready sandboxes no request claimed that are above the warm target: oldest first,
-- only those ready for at least the grace period, never below target + waiting requests.
-- KEYS[1] ready zset  KEYS[2] warming zset  KEYS[3] sandboxes hash  KEYS[4] demand zset
-- KEYS[5] events stream
-- ARGV[1] target (ready sandboxes to keep)  ARGV[2] grace ms  ARGV[3] stream maxlen
-- ARGV[4] most to retire in one call
-- Returns the sandbox ids retired (records now `stopping`, teardown entries queued).
local waiting = redis.call('ZCOUNT', KEYS[4], '(' .. now, '+inf')
local excess = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
  - tonumber(ARGV[1]) - waiting
if excess <= 0 then return {} end
if excess > tonumber(ARGV[4]) then excess = tonumber(ARGV[4]) end
local old = redis.call('ZRANGE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'BYSCORE',
  'LIMIT', 0, excess)
local out = {}
for _, sid in ipairs(old) do
  redis.call('ZREM', KEYS[1], sid)
  local raw = redis.call('HGET', KEYS[3], sid)
  if raw then
    local sb = cjson.decode(raw)
    sb.state = 'stopping'
    sb.reason = 'surplus'
    sb.stoppingAt = now
    redis.call('HSET', KEYS[3], sid, cjson.encode(sb))
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[3], '*', 'data', cjson.encode({
      kind = 'teardown', sandbox = sid, container = sb.container or '', reason = 'surplus'}))
    out[#out + 1] = sid
  end
end
return out
"""
)

SET_CONTAINER = """
-- Remember the container of a warming sandbox as soon as it exists, and its engine.
-- KEYS[1] sandboxes hash   ARGV[1] sandbox id  ARGV[2] container id  ARGV[3] engine id
-- Returns 1, or 0 when the record is gone (the sandbox was cancelled meanwhile).
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local sb = cjson.decode(raw)
sb.container = ARGV[2]
if ARGV[3] and ARGV[3] ~= '' then sb.engine = ARGV[3] end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(sb))
return 1
"""

MARK_READY = (
    _NOW
    + """
-- A warming sandbox passed its startup probe: put it in the ready set.
-- KEYS[1] sandboxes hash  KEYS[2] warming zset  KEYS[3] ready zset  KEYS[4] pool definition
-- ARGV[1] sandbox id  ARGV[2] container id  ARGV[3] address host:port
-- ARGV[4] ready channel  ARGV[5] pool name
-- Returns 1 when ready, 0 when the record is gone or not warming, -1 when the pool was
-- deleted or its template changed (the caller destroys the container and forgets it).
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local sb = cjson.decode(raw)
if sb.state ~= 'warming' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
sb.container = ARGV[2]
sb.addr = ARGV[3]
local def = redis.call('GET', KEYS[4])
if not def or cjson.decode(def).version ~= sb.version then
  sb.state = 'stopping'
  sb.reason = 'replaced'
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(sb))
  return -1
end
sb.state = 'ready'
sb.readyAt = now
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(sb))
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
)

RETIRE = """
-- Take a ready or warming sandbox out of service (template changed, probe failed, pool shrunk).
-- KEYS[1] sandboxes hash  KEYS[2] warming zset  KEYS[3] ready zset
-- ARGV[1] sandbox id  ARGV[2] reason
-- Returns 1 when retired, 0 when it was not ready/warming (allocated ones end via STOP).
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local sb = cjson.decode(raw)
if sb.state ~= 'ready' and sb.state ~= 'warming' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
sb.state = 'stopping'
sb.reason = ARGV[2]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(sb))
return 1
"""

FORGET = """
-- The sandbox's container is gone: drop its record from every index.
-- KEYS[1] sandboxes hash  KEYS[2] warming zset  KEYS[3] ready zset
-- ARGV[1] sandbox id
-- Returns 1 when a record was removed.
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""
