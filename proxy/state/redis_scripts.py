"""The Lua scripts the Redis limiter runs server-side: one admission or one settlement is one atomic call.

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

# KEYS: per scope, its base key (<p>); ARGV[1..6]: grant id, tokens, day, month, ms to day end,
# ms to month end, lease ms; then per scope: rpm, tpm, concurrency, daily, monthly.
# Returns {1, now_ms, rpm_limit, remaining, reset_ms} (rpm_limit 0: no rpm scope), or on refusal
# {0, scope index (1-based), kind, limit, remaining, reset_ms, retry_ms} having charged nothing.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gid, tokens, day, month = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local to_day, to_month, lease = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local cutoff = now - 60000
local n = #KEYS
local function lim(i, f) return tonumber(ARGV[7 + (i - 1) * 5 + f]) end
-- expire first, check every scope, then charge: a refusal charges nothing
for i = 1, n do
  local p = KEYS[i]
  if lim(i, 1) > 0 then redis.call('ZREMRANGEBYSCORE', p .. ':r', '-inf', cutoff) end
  if lim(i, 2) > 0 then
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
  if lim(i, 3) > 0 then redis.call('ZREMRANGEBYSCORE', p .. ':c', '-inf', now) end
end
for i = 1, n do
  local p = KEYS[i]
  local rpm, tpm, conc, daily, monthly = lim(i, 1), lim(i, 2), lim(i, 3), lim(i, 4), lim(i, 5)
  if conc > 0 and redis.call('ZCARD', p .. ':c') >= conc then
    return {0, i, 'concurrency', conc, 0, 1000, 1000}
  end
  if rpm > 0 then
    local count = redis.call('ZCARD', p .. ':r')
    if count >= rpm then
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
  local p = KEYS[i]
  local rpm, tpm, conc = lim(i, 1), lim(i, 2), lim(i, 3)
  if rpm > 0 then
    redis.call('ZADD', p .. ':r', now, gid)
    redis.call('PEXPIRE', p .. ':r', 61000)
    local count = redis.call('ZCARD', p .. ':r')
    local oldest = tonumber(redis.call('ZRANGE', p .. ':r', 0, 0, 'WITHSCORES')[2])
    if w_limit == 0 or rpm - count < w_left then
      w_limit, w_left, w_reset = rpm, rpm - count, oldest + 60000 - now
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
    redis.call('INCRBY', p .. ':d:' .. day, tokens)
    redis.call('PEXPIRE', p .. ':d:' .. day, to_day + 86400000)
    redis.call('INCRBY', p .. ':m:' .. month, tokens)
    redis.call('PEXPIRE', p .. ':m:' .. month, to_month + 86400000)
  end
end
return {1, now, w_limit, w_left, w_reset}
"""

# KEYS: the grant's scopes' base keys; ARGV: grant id, token delta, day, month.
# Frees the lease and corrects the charge; a charge that left the window, or a budget whose
# calendar window has passed (its key expired), is no longer corrected.
SETTLE = """
local gid, delta, day, month = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
for i = 1, #KEYS do
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
return 1
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
