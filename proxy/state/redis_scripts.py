"""The Lua scripts the Redis limiter runs server-side: a batch of admissions and settlements is one atomic call.

Keys of one limited key id (`<p>` = the configured prefix + the key id):
  <p>:r        ZSET  rpm log: member = grant id, score = admission time (ms, Redis clock)
  <p>:t        ZSET  tpm log: member = grant id, score = admission time (ms)
  <p>:tc       HASH  grant id -> tokens charged (corrected at settle); field "_sum" = their total
  <p>:c        ZSET  concurrency leases: member = grant id, score = lease expiry (ms)
  <p>:d:<day>  STRING tokens charged on a UTC day;   expires a day after the day ends
  <p>:m:<mon>  STRING tokens charged in a UTC month; expires a day after the month ends
and of settlements sent again after a lost answer (`<prefix>` alone: not a key id's):
  <prefix>batch:<id>      STRING a batch that carried settlements ran;      lives the marks' life (ARGV)
  <prefix>settled:<gid>   STRING a retry applied grant <gid>'s settlement;  likewise
A repayment (the tokens a replica admitted on its own while Redis was down, redis_limiter._repay)
is a settlement of a grant id of its own, so it is applied exactly once the same way.
Time is Redis's own (TIME), so replicas with skewed clocks still share one window; the day and month
ids are chosen by the limiter on Redis's clock too (redis_limiter._sync_clock).

Every key a script touches is passed in KEYS, never built inside it (`scope_keys`, the marks):
Redis Cluster routes a script call by its KEYS and refuses one whose keys are not all in one slot.
On a cluster the prefix carries a hash tag (`cluster_prefix`), so every key of every call, a
request's scopes (its key, its ancestors, an owner's rule scopes) and the marks alike, is in one
slot: admissions of different keys are judged together, atomically, in one script.
"""

from __future__ import annotations

from functools import lru_cache

KEYS_PER_SCOPE = 6


@lru_cache(maxsize=4096)
def scope_keys(base: str, day: str, month: str) -> tuple[str, ...]:
    """The keys of one scope (`base` = prefix + key id) as BATCH takes them, in its order."""
    return (f"{base}:r", f"{base}:t", f"{base}:tc", f"{base}:c", f"{base}:d:{day}", f"{base}:m:{month}")


def settled_key(prefix: str, gid: str) -> str:
    """The mark a retry of grant `gid`'s settlement leaves when it applies it."""
    return f"{prefix}settled:{gid}"


def lease_key(base: str) -> str:
    """A scope's concurrency leases (RENEW's KEYS)."""
    return f"{base}:c"


def cluster_prefix(prefix: str) -> str:
    """The key prefix on Redis Cluster: with a hash tag, so every key the limiter writes is in one slot.

    A prefix that already holds a tag (`{...}`) is kept as it is; else the prefix becomes the tag:
    `seekgate:limits:` -> `{seekgate:limits}:`.
    """
    # Redis's rule: the tag is between the first '{' and the first '}' after it, if not empty.
    start = prefix.find("{")
    if start >= 0 and prefix.find("}", start + 1) > start + 1:
        return prefix
    return "{" + prefix.rstrip(":") + "}:"

# One call admits and settles a batch: every request waiting on this replica at that moment rides
# in one atomic script, so a burst of N costs one round trip, not N (admissions stay exactly as
# strict: the script takes them one after another, each seeing the charges of those before it).
#
# KEYS: this batch's mark when it carries settlements; then operation after operation, the 6 keys of
#   each of its scopes (scope_keys), and for a settlement its own mark (settled_key) and, when it was
#   sent before, the mark of the first batch it was sent in.
# ARGV[1..6]: number of settlements S, number of admissions A, lease ms, slot life ms, '1' when
#   KEYS[1] is this batch's mark ('' for none), the marks' life in ms; then
# S settlements of 10 fields: scope count, grant id, token delta, day, month, cancel (0/1), deadline
#   (Redis ms), '1' when it was sent before ('' for none), the day's and the month's end (Redis ms) of
#   a repayment ('' for a settlement)
#   (frees the lease and corrects the charge; a charge that left the window, or a budget whose
#   calendar window has passed (its key expired), is no longer corrected; cancel = a slot never
#   used: its entries leave the rpm and tpm logs too; a repayment adds its tokens to the budgets,
#   creating a missing one with the expiry a charge gives it: a day after its window ends);
# then A admissions of 9 fields: scope count, grant id, tokens, day, month, ms to day end,
#   ms to month end, slots wanted, request (1: a request to admit; 0: only a reservation of slots,
#   for a replica whose slots run low); and per scope 5 more: rpm, tpm, concurrency, daily, monthly.
#
# Exactly once: a batch whose answer was lost may have run, so its settlements are sent again, and
# each send looks for the marks an earlier run of the same settlement left: its first batch's (that
# batch ran) and its own (a retry applied it). Either found, it is skipped. A mark is only proof while
# it lives, so a settlement is applied only before its deadline: the limiter's estimate of Redis's
# clock at its first send plus its retry horizon, well inside the marks' life (each set no earlier
# than that first send). A send that runs later, however it was held up, applies nothing and says so
# (`late`): the limiter records it as dropped, never applied twice.
#
# Settlements run first: a replica's finished request frees its slot before its next one asks.
#
# Slots: an admission may also ask for up to N more admissions of the same shape, which the
# replica then hands out itself without a round trip (redis_limiter.py). Each is charged like a
# request (ids <grant id>#1..N) but logged at now + slot life: a slot used at any moment of its
# life therefore stays in every window at least as long as a request admitted then would, so
# the limits hold exactly. Slots are only granted while they leave at least half of every limit
# free, so reserving them never refuses another replica's request that a per-request check
# would have admitted; the replica cancels the ones it did not use when their life ends.
#
# Returns {replies, failed settlements' errors, late settlements' grant ids}: one reply per
# admission, in order:
# {1, now_ms, rpm_limit, remaining, reset_ms, slots} (rpm_limit 0: no rpm scope), or {0, scope
# index (1-based), kind, limit, remaining, reset_ms, retry_ms} having charged nothing, or
# {-1, error} when Redis failed it.
BATCH = """
-- Every key it touches is in KEYS (Redis Cluster routes and checks a script by them): per scope,
-- 6 in a row (scope_keys below). scope(first, i): scope i's keys, the scopes starting at KEYS[first].
local function scope(first, i)
  local b = first + (i - 1) * 6
  return KEYS[b], KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], KEYS[b + 4], KEYS[b + 5]
end
local CHUNK, EXPIRE_CHUNKS = 500, 20
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - 60000
local lease, slot_life, mark_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local a, k = 7, 1   -- next ARGV field, next KEYS entry
if ARGV[5] ~= '' then redis.call('SET', KEYS[1], '1', 'PX', mark_ms); k = 2 end

-- Settlements correct each grant's own charge; the running sums they move (a key's tpm total,
-- its day and month budgets) are added up here and written once per batch (settle_sums).
local sums, budgets, ends = {}, {}, {}   -- ends: a repaid budget's window end (Redis ms)
local function settle(first, n, gid, delta, cancel, day_end, month_end)
  for i = 1, n do
    local r, t, tc, c, d, m = scope(first, i)
    redis.call('ZREM', c, gid)
    if cancel then
      redis.call('ZREM', r, gid)
      redis.call('ZREM', t, gid)
    end
    if delta ~= 0 or cancel then
      local charged = redis.call('HGET', tc, gid)
      if charged then
        if cancel then
          sums[tc] = (sums[tc] or 0) - tonumber(charged)
          redis.call('HDEL', tc, gid)
        else
          redis.call('HINCRBY', tc, gid, delta)
          sums[tc] = (sums[tc] or 0) + delta
        end
      end
      budgets[d] = (budgets[d] or 0) + delta
      budgets[m] = (budgets[m] or 0) + delta
      if day_end then ends[d], ends[m] = day_end, month_end end
    end
  end
end

local function settle_sums()
  for tc, delta in pairs(sums) do
    if delta ~= 0 then redis.call('HINCRBY', tc, '_sum', delta) end
  end
  for key, delta in pairs(budgets) do
    if delta ~= 0 then
      if redis.call('EXISTS', key) == 1 then
        redis.call('INCRBY', key, delta)
      elseif ends[key] then   -- repaid: created as a charge creates it, expiring a day after its window
        redis.call('INCRBY', key, delta)
        redis.call('PEXPIRE', key, math.max(0, ends[key] - now) + 86400000)
      end                     -- else a budget whose window has passed (its key expired) stays gone
    end
  end
end

-- lims(i, f): scope i's limit f (1 rpm, 2 tpm, 3 concurrency, 4 daily, 5 monthly)
local function expire(first, n, lims)
  for i = 1, n do
    local r, t, tc, c = scope(first, i)
    if lims(i, 1) > 0 then redis.call('ZREMRANGEBYSCORE', r, '-inf', cutoff) end
    if lims(i, 2) > 0 then
      -- In chunks (Lua's unpack takes a few thousand values at most), and at most EXPIRE_CHUNKS of
      -- them per call: a key idle after a busy minute may hold 100 000s. What is left stays in
      -- the sum until a later call: stricter meanwhile, never looser.
      for _ = 1, EXPIRE_CHUNKS do
        local old = redis.call('ZRANGEBYSCORE', t, '-inf', cutoff, 'LIMIT', 0, CHUNK)
        if #old == 0 then break end
        local vals = redis.call('HMGET', tc, unpack(old))
        local gone = 0
        for j = 1, #old do gone = gone + (tonumber(vals[j]) or 0) end
        redis.call('HINCRBY', tc, '_sum', -gone)
        redis.call('HDEL', tc, unpack(old))
        redis.call('ZREM', t, unpack(old))
        if #old < CHUNK then break end
      end
    end
    if lims(i, 3) > 0 then redis.call('ZREMRANGEBYSCORE', c, '-inf', now) end
  end
end

-- nil when one more request fits every scope; else the refusal.
local function refusal(first, n, tokens, to_day, to_month, lims)
  for i = 1, n do
    local r, t, tc, c, d, m = scope(first, i)
    local rpm, tpm, conc, daily, monthly = lims(i, 1), lims(i, 2), lims(i, 3), lims(i, 4), lims(i, 5)
    if conc > 0 and redis.call('ZCARD', c) >= conc then
      return {0, i, 'concurrency', conc, 0, 1000, 1000}
    end
    if rpm > 0 and redis.call('ZCARD', r) >= rpm then
      local oldest = tonumber(redis.call('ZRANGE', r, 0, 0, 'WITHSCORES')[2])
      local wait = oldest + 60000 - now
      return {0, i, 'rpm', rpm, 0, wait, wait}
    end
    if tokens > 0 then
      if tpm > 0 then
        local used = tonumber(redis.call('HGET', tc, '_sum') or '0')
        if used + tokens > tpm then
          local wait = 60000
          if tokens <= tpm then   -- else it can never fit: a full window
            -- When enough will have left; past the oldest CHUNK entries, when those have (a hint
            -- that errs early: the retry is judged again).
            local log = redis.call('ZRANGE', t, 0, CHUNK - 1, 'WITHSCORES')
            local left = used
            for j = 1, #log, 2 do
              left = left - (tonumber(redis.call('HGET', tc, log[j])) or 0)
              wait = tonumber(log[j + 1]) + 60000 - now
              if left + tokens <= tpm then break end
            end
          end
          return {0, i, 'tpm', tpm, tpm - used, wait, wait}
        end
      end
      if daily > 0 then
        local used = tonumber(redis.call('GET', d) or '0')
        if used + tokens > daily then return {0, i, 'daily_tokens', daily, daily - used, to_day, to_day} end
      end
      if monthly > 0 then
        local used = tonumber(redis.call('GET', m) or '0')
        if used + tokens > monthly then
          return {0, i, 'monthly_tokens', monthly, monthly - used, to_month, to_month}
        end
      end
    end
  end
  return nil
end

-- Charges every grant id in `gids` (a request, or a reservation's slots) alike, each command once
-- for all of them: a reservation of 64 slots costs about what one request does.
local function charge(first, n, gids, tokens, to_day, to_month, lims, stamp)
  local count = #gids
  local stamped, charged = {}, {}
  for j = 1, count do
    stamped[2 * j - 1], stamped[2 * j] = stamp, gids[j]
    charged[2 * j - 1], charged[2 * j] = gids[j], tokens
  end
  for i = 1, n do
    local r, t, tc, c, d, m = scope(first, i)
    local rpm, tpm, conc = lims(i, 1), lims(i, 2), lims(i, 3)
    if rpm > 0 then
      redis.call('ZADD', r, unpack(stamped))
      redis.call('PEXPIRE', r, 61000 + slot_life)
    end
    if tpm > 0 then
      redis.call('ZADD', t, unpack(stamped))
      redis.call('HSET', tc, unpack(charged))
      redis.call('HINCRBY', tc, '_sum', tokens * count)
      redis.call('PEXPIRE', t, 61000 + lease + slot_life)
      redis.call('PEXPIRE', tc, 61000 + lease + slot_life)
    end
    if conc > 0 then
      local leases = {}
      for j = 1, count do leases[2 * j - 1], leases[2 * j] = now + lease, gids[j] end
      redis.call('ZADD', c, unpack(leases))
      redis.call('PEXPIRE', c, lease + 1000)
    end
    if tokens > 0 then   -- budgets are counted whether or not a budget is set, as the local limiter does
      -- a budget key's expiry is its calendar window's end: set once, when the charge creates it
      local total = tokens * count
      if redis.call('INCRBY', d, total) == total then redis.call('PEXPIRE', d, to_day + 86400000) end
      if redis.call('INCRBY', m, total) == total then redis.call('PEXPIRE', m, to_month + 86400000) end
    end
  end
end

-- How many slots of `tokens` fit, at most `wanted`: one after another, each while half of every
-- limit stays free (refusal(..., 0.5) before each), counted at once from the scopes' use now.
local function fitting(first, n, tokens, wanted, lims)
  local fit = wanted
  local function room(used, limit, each)   -- how many more of `each` keep used + them <= limit / 2 ...
    return math.floor((limit * 0.5 - used) / each)
  end
  for i = 1, n do
    local r, t, tc, c, d, m = scope(first, i)
    local rpm, tpm, conc, daily, monthly = lims(i, 1), lims(i, 2), lims(i, 3), lims(i, 4), lims(i, 5)
    -- ... and a count: the next one fits while count < limit / 2
    if conc > 0 then fit = math.min(fit, math.ceil(conc * 0.5 - redis.call('ZCARD', c))) end
    if rpm > 0 then fit = math.min(fit, math.ceil(rpm * 0.5 - redis.call('ZCARD', r))) end
    if tokens > 0 then
      if tpm > 0 then fit = math.min(fit, room(tonumber(redis.call('HGET', tc, '_sum') or '0'), tpm, tokens)) end
      if daily > 0 then fit = math.min(fit, room(tonumber(redis.call('GET', d) or '0'), daily, tokens)) end
      if monthly > 0 then
        fit = math.min(fit, room(tonumber(redis.call('GET', m) or '0'), monthly, tokens))
      end
    end
    if fit <= 0 then return 0 end
  end
  return fit
end

-- The tightest rpm window now, for X-RateLimit-*: limit, remaining, ms to reset (0s: no rpm scope).
local function window(first, n, lims)
  local w_limit, w_left, w_reset = 0, 0, 0
  for i = 1, n do
    local rpm = lims(i, 1)
    if rpm > 0 then
      local r = scope(first, i)
      local left = rpm - redis.call('ZCARD', r)
      if w_limit == 0 or left < w_left then
        -- empty only before a reservation alone (request 0): nothing in the window yet
        local oldest = tonumber(redis.call('ZRANGE', r, 0, 0, 'WITHSCORES')[2] or now)
        w_limit, w_left, w_reset = rpm, left, math.max(0, oldest + 60000 - now)
      end
    end
  end
  return w_limit, w_left, w_reset
end

local function acquire(first, n, gid, tokens, to_day, to_month, wanted, request, lims)
  expire(first, n, lims)
  if request then
    local no = refusal(first, n, tokens, to_day, to_month, lims)
    if no then return no end   -- a refusal charges nothing
    charge(first, n, {gid}, tokens, to_day, to_month, lims, now)
  end
  local w_limit, w_left, w_reset = window(first, n, lims)
  local slots = wanted > 0 and fitting(first, n, tokens, wanted, lims) or 0
  if slots > 0 then
    local gids = {}
    for j = 1, slots do gids[j] = gid .. '#' .. j end
    charge(first, n, gids, tokens, to_day, to_month, lims, now + slot_life)
  end
  return {1, now, w_limit, w_left, w_reset, slots}
end

-- Each operation runs under pcall: one that Redis fails (a key of the wrong type, say) answers
-- for itself, and the requests that shared its batch are judged as if it were not there.
local function failure(e) return type(e) == 'table' and (e.err or 'error') or tostring(e) end
local failed, late = {}, {}
for _ = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a])
  local own = KEYS[k + 6 * n]                  -- after its scopes' keys: its own mark, then its first batch's
  local resent = ARGV[a + 7] ~= ''
  if redis.call('EXISTS', own) == 1 or (resent and redis.call('EXISTS', KEYS[k + 6 * n + 1]) == 1) then
    -- applied already (by its first batch, or by a retry): nothing more
  elseif now >= tonumber(ARGV[a + 6]) then
    late[#late + 1] = ARGV[a + 1]              -- a mark that proved it applied may have expired
  else
    local ok, e = pcall(settle, k, n, ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 5] == '1',
                        tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9]))   -- nil for a settlement ('')
    if not ok then failed[#failed + 1] = failure(e) end
    -- A retry leaves its own mark: a later send (this one's answer lost too) finds it. A first
    -- send needs none: the batch's mark says so for all of its settlements.
    if resent then redis.call('SET', own, '1', 'PX', mark_ms) end
  end
  a, k = a + 10, k + 6 * n + (resent and 2 or 1)
end
local ok, e = pcall(settle_sums)   -- before the admissions: they see the corrected sums
if not ok then failed[#failed + 1] = failure(e) end
local replies = {}
for _ = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[a])
  local base = a + 9
  local function lims(i, f) return tonumber(ARGV[base + (i - 1) * 5 + f - 1]) end
  local ok, reply = pcall(acquire, k, n, ARGV[a + 1], tonumber(ARGV[a + 2]),
                          tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7]), ARGV[a + 8] == '1', lims)
  replies[#replies + 1] = ok and reply or {-1, failure(reply)}
  a, k = base + 5 * n, k + 6 * n
end
return {replies, failed, late}
"""

# KEYS: lease keys (<p>:c); ARGV: lease ms, then grant ids, one per key. Extends leases still held: a lease
# already past its expiry stays gone (swept or not), so a renewal never resurrects a freed slot.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  local held = redis.call('ZSCORE', KEYS[i], ARGV[i + 1])
  if held and tonumber(held) > now then
    redis.call('ZADD', KEYS[i], 'XX', now + lease, ARGV[i + 1])
    redis.call('PEXPIRE', KEYS[i], lease + 1000)
  end
end
return 1
"""
