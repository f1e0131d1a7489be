-- Settle one request that ended (however it ended): correct its tokens to the real count,
-- learn its client's excess, end its leases, add its tokens to the day's usage, and note a
-- user's credential that SAI accepted. Preceded by calendar.lua and `K`.
--
-- ARGV[1]: the key prefix. ARGV[2]: the settlement, JSON (shared.py builds it):
--   id, client (the id it was admitted as), reserve, input, output (the tokens SAI counted
--   or the estimates), period, date (the admission's), usage (count in the client's usage),
--   accepted (a user's id whose credential SAI accepted, or false), now (ms or 0),
--   scopes: [{name, cost, budget_cost, tpm, budget, concurrency (booleans: has that limit)}]
local P = ARGV[1]
local s = cjson.decode(ARGV[2])
local actual = s.input + s.output
local learns = false
for _, scope in ipairs(s.scopes) do
  local name = scope.name
  if scope.tpm then
    learns = true
    local tk, sk = P .. 't:' .. name, P .. 'ts:' .. name
    local held = s.id .. ':' .. int(scope.cost)
    local score = redis.call('ZSCORE', tk, held)
    if score then
      redis.call('ZREM', tk, held)
      redis.call('ZADD', tk, score, s.id .. ':' .. int(actual))
      redis.call('INCRBY', sk, int(actual - scope.cost))
      -- ZREM of the only member deleted the key: the ZADD made it anew, without a TTL.
      redis.call('PEXPIRE', tk, int(K.window + 1000))
      redis.call('PEXPIRE', sk, int(K.window + 1000))
    end
  end
  if scope.budget then
    local bk = P .. 'b:' .. name .. ':' .. s.period
    if redis.call('EXISTS', bk) == 1 then redis.call('INCRBY', bk, int(actual - scope.budget_cost)) end
  end
  if scope.concurrency then redis.call('ZREM', P .. 'c:' .. name, s.id) end
end
if learns then
  -- Up at once to a larger excess, down a quarter of the way to a smaller one
  -- (rules.learn_excess).
  local xk = P .. 'x:client:' .. s.client
  local sample = math.max(0, actual - s.reserve)
  local learned = tonumber(redis.call('GET', xk))
  if learned and sample < learned then sample = learned + math.floor((sample - learned) / 4) end
  redis.call('SET', xk, int(sample), 'PX', K.excess_ms)
end
if s.usage then
  local uk = P .. 'usage:' .. s.date
  redis.call('HINCRBY', uk, s.client .. ':input', int(s.input))
  redis.call('HINCRBY', uk, s.client .. ':output', int(s.output))
  redis.call('PEXPIRE', uk, K.usage_ms)
end
if s.accepted then redis.call('SET', P .. 'v:' .. s.accepted, '1', 'PX', K.verified_ms) end
return 1
