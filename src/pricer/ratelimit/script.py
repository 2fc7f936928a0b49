"""The Lua script that decides Redis token buckets, and the leases it hands out.

A bucket's state is a plain string `"<tokens>:<microseconds>"` under its key (`GET ratelimit:client123`
shows it), counted with Redis's own clock (`TIME`) so replicas with skewed clocks agree.

Leases: a decision may also take up to `lease` more whole tokens out of the bucket for the calling process
to grant on its own, without a round trip (see `pricer.ratelimit.leases`). Leased tokens are taken from
the shared bucket like granted ones, so every grant of every replica is still paid for by a token of the
one bucket: leasing never admits more than the bucket allows. Tokens leased and not used go back to the
bucket (`refund`, capped at its capacity) when the process lets its lease go.
"""

from __future__ import annotations

# Set by the script when missing, never expiring: when Redis's data began (a restart or a flush empties
# it). A bucket missing for longer than it takes to refill has just refilled; a bucket missing since then
# may have been lost with the data, so the caller's estimate of it is used instead of a full bucket.
EPOCH_KEY = "ratelimit:~epoch"

# Values per bucket in ARGV, then per bucket with extras.
BUCKET_ARGS = 4
EXTRA_ARGS = 4

# KEYS: the epoch key, then bucket keys; ARGV: per bucket (limit per minute, capacity, cost, lease), then
# any number of (bucket index, debt, seed, refund): `debt`, tokens granted locally meanwhile, charged first
# (not below zero), also to a bucket that expired meanwhile (it refilled in Redis while this replica
# granted); `seed`, the caller's estimate of the tokens of a bucket Redis lost (negative: none), which
# already counts what the caller granted locally, so a seeded bucket is not charged the debt again;
# `refund`, leased tokens the caller did not use, given back. `lease`: once the cost is paid, up to this
# many more whole tokens are taken for the caller (a cost of 0 only takes a lease). Returns the age of
# Redis's data in microseconds, then per bucket (allowed, tokens, tokens leased).
BUCKET_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local epoch = tonumber(redis.call('GET', KEYS[1]))
if not epoch then
  epoch = now
  redis.call('SET', KEYS[1], string.format('%d', now))
end
local count = #KEYS - 1
local debts = {}
local seeds = {}
local refunds = {}
for j = count * 4 + 1, #ARGV, 4 do
  local index = tonumber(ARGV[j])
  debts[index] = tonumber(ARGV[j + 1])
  seeds[index] = tonumber(ARGV[j + 2])
  refunds[index] = tonumber(ARGV[j + 3])
end
local out = {now - epoch}
for i = 1, count do
  local key = KEYS[i + 1]
  local rate = tonumber(ARGV[i * 4 - 3]) / 60
  local capacity = tonumber(ARGV[i * 4 - 2])
  local cost = tonumber(ARGV[i * 4 - 1])
  local lease = tonumber(ARGV[i * 4])
  local tokens = capacity
  local state = redis.call('GET', key)
  local seeded = false
  if state then
    local sep = string.find(state, ':', 1, true)
    if sep then
      local stored = tonumber(string.sub(state, 1, sep - 1))
      local stamp = tonumber(string.sub(state, sep + 1))
      if stored and stamp then
        local elapsed = now - stamp
        if elapsed < 0 then elapsed = 0 end
        tokens = math.min(capacity, stored + elapsed * rate / 1000000)
      end
    end
  elseif seeds[i] and seeds[i] >= 0 and now - epoch < (capacity / rate + 1) * 1000000 then
    tokens = math.min(capacity, seeds[i])
    seeded = true
  end
  if debts[i] and not seeded then tokens = math.max(0, tokens - debts[i]) end
  if refunds[i] and refunds[i] > 0 then tokens = math.min(capacity, tokens + refunds[i]) end
  local allowed = 0
  local leased = 0
  if tokens >= cost then
    tokens = tokens - cost
    allowed = 1
    if lease > 0 then
      leased = math.max(0, math.min(lease, math.floor(tokens)))
      tokens = tokens - leased
    end
  end
  local ttl = math.ceil((capacity - tokens) / rate * 1000) + 1000
  redis.call('SET', key, string.format('%.6f:%d', tokens, now), 'PX', ttl)
  out[#out + 1] = allowed
  out[#out + 1] = string.format('%.6f', tokens)
  out[#out + 1] = leased
end
return out
"""
