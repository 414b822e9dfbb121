"""The Lua scripts the Redis limiter runs server-side: a batch of admissions and settlements is one atomic call.

Keys of one limited key id (`<p>` = the configured prefix + the key id):
  <p>:r        ZSET  rpm log: member = grant id, score = admission time (ms, Redis clock)
  <p>:t        ZSET  tpm log: member = grant id, score = admission time (ms)
  <p>:tc       HASH  grant id -> tokens charged (corrected at settle); field "_sum" = their total
  <p>:c        ZSET  concurrency leases: member = grant id, score = lease expiry (ms)
  <p>:d:<day>  STRING tokens charged on a UTC day;   expires a day after the day ends
  <p>:m:<mon>  STRING tokens charged in a UTC month; expires a day after the month ends
Time is Redis's own (TIME), so replicas with skewed clocks still share one window.
"""

from __future__ import annotations

# One call admits and settles a batch: every request waiting on this replica at that moment rides
# in one atomic script, so a burst of N costs one round trip, not N (admissions stay exactly as
# strict: the script takes them one after another, each seeing the charges of those before it).
#
# KEYS: the base keys (<p>) of every operation's scopes, operation after operation.
# ARGV[1..3]: number of settlements S, number of admissions A, lease ms; then S settlements of
#   5 fields: scope count, grant id, token delta, day, month
# (freeing the lease and correcting the charge; a charge that left the window, or a budget whose
# calendar window has passed (its key expired), is no longer corrected); then A admissions of
#   7 fields: scope count, grant id, tokens, day, month, ms to day end, ms to month end
#   and per scope 5 more: rpm, tpm, concurrency, daily, monthly.
# Settlements run first: a replica's finished request frees its slot before its next one asks.
# Returns one reply per admission, in order: {1, now_ms, rpm_limit, remaining, reset_ms}
# (rpm_limit 0: no rpm scope), or {0, scope index (1-based), kind, limit, remaining, reset_ms,
# retry_ms} having charged nothing.
BATCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - 60000
local lease = tonumber(ARGV[3])
local a, k = 4, 1   -- next ARGV field, next KEYS entry

local function settle(first, n, gid, delta, day, month)
  for i = first, first + n - 1 do
    local p = KEYS[i]
    redis.call('ZREM', p .. ':c', gid)
    if delta ~= 0 then
      if redis.call('HEXISTS', p .. ':tc', gid) == 1 then
        redis.call('HINCRBY', p .. ':tc', gid, delta)
        redis.call('HINCRBY', p .. ':tc', '_sum', delta)
      end
      if redis.call('EXISTS', p .. ':d:' .. day) == 1 then redis.call('INCRBY', p .. ':d:' .. day, delta) end
      if redis.call('EXISTS', p .. ':m:' .. month) == 1 then redis.call('INCRBY', p .. ':m:' .. month, delta) end
    end
  end
end

-- lims(i, f): scope i's limit f (1 rpm, 2 tpm, 3 concurrency, 4 daily, 5 monthly)
local function acquire(first, n, gid, tokens, day, month, to_day, to_month, lims)
  -- expire first, check every scope, then charge: a refusal charges nothing
  for i = 1, n do
    local p = KEYS[first + i - 1]
    if lims(i, 1) > 0 then redis.call('ZREMRANGEBYSCORE', p .. ':r', '-inf', cutoff) end
    if lims(i, 2) > 0 then
      local old = redis.call('ZRANGEBYSCORE', p .. ':t', '-inf', cutoff)
      if #old > 0 then
        local vals = redis.call('HMGET', p .. ':tc', unpack(old))
        local gone = 0
        for j = 1, #old do gone = gone + (tonumber(vals[j]) or 0) end
        redis.call('HINCRBY', p .. ':tc', '_sum', -gone)
        redis.call('HDEL', p .. ':tc', unpack(old))
        redis.call('ZREMRANGEBYSCORE', p .. ':t', '-inf', cutoff)
      end
    end
    if lims(i, 3) > 0 then redis.call('ZREMRANGEBYSCORE', p .. ':c', '-inf', now) end
  end
  local counts = {}
  for i = 1, n do
    local p = KEYS[first + i - 1]
    local rpm, tpm, conc, daily, monthly = lims(i, 1), lims(i, 2), lims(i, 3), lims(i, 4), lims(i, 5)
    if conc > 0 and redis.call('ZCARD', p .. ':c') >= conc then
      return {0, i, 'concurrency', conc, 0, 1000, 1000}
    end
    if rpm > 0 then
      counts[i] = redis.call('ZCARD', p .. ':r')
      if counts[i] >= rpm then
        local oldest = tonumber(redis.call('ZRANGE', p .. ':r', 0, 0, 'WITHSCORES')[2])
        local wait = oldest + 60000 - now
        return {0, i, 'rpm', rpm, 0, wait, wait}
      end
    end
    if tokens > 0 then
      if tpm > 0 then
        local used = tonumber(redis.call('HGET', p .. ':tc', '_sum') or '0')
        if used + tokens > tpm then
          local wait = 60000
          if tokens <= tpm then   -- else it can never fit: a full window
            local log = redis.call('ZRANGE', p .. ':t', 0, -1, 'WITHSCORES')
            local left = used
            for j = 1, #log, 2 do
              left = left - (tonumber(redis.call('HGET', p .. ':tc', log[j])) or 0)
              if left + tokens <= tpm then wait = tonumber(log[j + 1]) + 60000 - now; break end
            end
          end
          return {0, i, 'tpm', tpm, tpm - used, wait, wait}
        end
      end
      if daily > 0 then
        local used = tonumber(redis.call('GET', p .. ':d:' .. day) or '0')
        if used + tokens > daily then return {0, i, 'daily_tokens', daily, daily - used, to_day, to_day} end
      end
      if monthly > 0 then
        local used = tonumber(redis.call('GET', p .. ':m:' .. month) or '0')
        if used + tokens > monthly then
          return {0, i, 'monthly_tokens', monthly, monthly - used, to_month, to_month}
        end
      end
    end
  end
  local w_limit, w_left, w_reset = 0, 0, 0
  for i = 1, n do
    local p = KEYS[first + i - 1]
    local rpm, tpm, conc = lims(i, 1), lims(i, 2), lims(i, 3)
    if rpm > 0 then
      redis.call('ZADD', p .. ':r', now, gid)
      redis.call('PEXPIRE', p .. ':r', 61000)
      local count = counts[i] + 1
      local reset = 60000   -- the window's oldest entry is this one
      if count > 1 then reset = tonumber(redis.call('ZRANGE', p .. ':r', 0, 0, 'WITHSCORES')[2]) + 60000 - now end
      if w_limit == 0 or rpm - count < w_left then
        w_limit, w_left, w_reset = rpm, rpm - count, reset
      end
    end
    if tpm > 0 then
      redis.call('ZADD', p .. ':t', now, gid)
      redis.call('HSET', p .. ':tc', gid, tokens)
      redis.call('HINCRBY', p .. ':tc', '_sum', tokens)
      redis.call('PEXPIRE', p .. ':t', 61000 + lease)
      redis.call('PEXPIRE', p .. ':tc', 61000 + lease)
    end
    if conc > 0 then
      redis.call('ZADD', p .. ':c', now + lease, gid)
      redis.call('PEXPIRE', p .. ':c', lease + 1000)
    end
    if tokens > 0 then   -- budgets are counted whether or not a budget is set, as the local limiter does
      -- a budget key's expiry is its calendar window's end: set once, when the charge creates it
      if redis.call('INCRBY', p .. ':d:' .. day, tokens) == tokens then
        redis.call('PEXPIRE', p .. ':d:' .. day, to_day + 86400000)
      end
      if redis.call('INCRBY', p .. ':m:' .. month, tokens) == tokens then
        redis.call('PEXPIRE', p .. ':m:' .. month, to_month + 86400000)
      end
    end
  end
  return {1, now, w_limit, w_left, w_reset}
end

for _ = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a])
  settle(k, n, ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], ARGV[a + 4])
  a, k = a + 5, k + n
end
local replies = {}
for _ = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[a])
  local base = a + 7
  local function lims(i, f) return tonumber(ARGV[base + (i - 1) * 5 + f - 1]) end
  replies[#replies + 1] = acquire(k, n, ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], ARGV[a + 4],
                                  tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), lims)
  a, k = base + 5 * n, k + n
end
return replies
"""

# KEYS: base keys; ARGV: lease ms, then grant ids, one per key. Extends leases still held: a lease
# already past its expiry stays gone (swept or not), so a renewal never resurrects a freed slot.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  local held = redis.call('ZSCORE', KEYS[i] .. ':c', ARGV[i + 1])
  if held and tonumber(held) > now then
    redis.call('ZADD', KEYS[i] .. ':c', 'XX', now + lease, ARGV[i + 1])
    redis.call('PEXPIRE', KEYS[i] .. ':c', lease + 1000)
  end
end
return 1
"""
