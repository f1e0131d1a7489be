-- Admit one request: check every limit of every scope at once, and take the request's
-- share only if all pass. Preceded by calendar.lua and `K` (the constants of rules.py).
--
-- ARGV[1]: the key prefix. ARGV[2]: the ask, JSON (base.Ask.fields):
--   id        unique among every replica's admissions
--   client    the client's id (key-…, user-…, anonymous)
--   verify    true: a user's credential, its own client only once SAI has accepted it
--             (v:<client> exists); until then the request is anonymous's
--   usage     true: count the request in the client's usage of the day
--   reserve   the tokens reserved: the prompt's estimate and the answer's bound
--   period    'day' or 'month': the budget's
--   lease     ms a concurrency lease lives unless renewed
--   now       ms, or 0 for the server's clock
--   scopes    [{kind = 'client'|'global', rpm, tpm, concurrency, budget}]
-- Returns JSON (shared.py reads it): granted, reason, wait, date, period, client,
-- budget_left, and per scope: rpm, requests_used, requests_reset, tpm, tokens_used,
-- tokens_reset (before this admission), cost (tokens taken from the window), budget_cost.
local P = ARGV[1]
local a = cjson.decode(ARGV[2])
local W = K.window
local now = clock(a.now)
local date, period, period_end = calendar(now, a.period)
local client = a.client
if a.verify and redis.call('EXISTS', P .. 'v:' .. client) == 0 then client = K.anonymous end
local excess = 0
for _, s in ipairs(a.scopes) do
  if s.tpm > 0 then
    excess = tonumber(redis.call('GET', P .. 'x:client:' .. client) or '0')
    break
  end
end
local out, deny, wait, budget_left = {}, '', 0, -1
for i, s in ipairs(a.scopes) do
  local name = s.kind == 'client' and ('client:' .. client) or 'global'
  local rk, tk = P .. 'r:' .. name, P .. 't:' .. name
  local sk, ck = P .. 'ts:' .. name, P .. 'c:' .. name
  local f = {rpm = s.rpm, requests_used = 0, requests_reset = 0, tpm = s.tpm,
             tokens_used = 0, tokens_reset = 0, cost = 0, budget_cost = 0}
  if s.rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', rk, '-inf', int(now - W))
    f.requests_used = redis.call('ZCARD', rk)
    if f.requests_used > 0 then
      f.requests_reset = tonumber(redis.call('ZRANGE', rk, 0, 0, 'WITHSCORES')[2]) + W - now
    end
    if deny == '' and f.requests_used >= s.rpm then
      local nth = f.requests_used - s.rpm
      deny = 'requests'
      wait = tonumber(redis.call('ZRANGE', rk, nth, nth, 'WITHSCORES')[2]) + W - now
    end
  end
  if s.tpm > 0 then
    f.cost = math.min(a.reserve + excess, s.tpm)
    local old = redis.call('ZRANGEBYSCORE', tk, '-inf', int(now - W))
    if #old > 0 then
      local gone = 0
      for _, member in ipairs(old) do gone = gone + tokens_of(member) end
      redis.call('DECRBY', sk, int(gone))
      redis.call('ZREMRANGEBYSCORE', tk, '-inf', int(now - W))
    end
    f.tokens_used = tonumber(redis.call('GET', sk) or '0')
    local first = redis.call('ZRANGE', tk, 0, 0, 'WITHSCORES')
    if first[2] then f.tokens_reset = tonumber(first[2]) + W - now end
    if deny == '' and f.tokens_used + f.cost > s.tpm then
      local entries = redis.call('ZRANGE', tk, 0, -1, 'WITHSCORES')
      local left = f.tokens_used
      deny, wait = 'tokens', W
      for j = 1, #entries, 2 do
        left = left - tokens_of(entries[j])
        if left + f.cost <= s.tpm then
          wait = tonumber(entries[j + 1]) + W - now
          break
        end
      end
    end
  end
  if s.concurrency > 0 and deny == '' then
    redis.call('ZREMRANGEBYSCORE', ck, '-inf', int(now))
    if redis.call('ZCARD', ck) >= s.concurrency then deny, wait = 'concurrency', K.concurrency_wait end
  end
  if s.budget > 0 then
    -- A reservation larger than the whole budget takes the whole budget: it runs when the
    -- budget is untouched, as a large request runs alone under a tokens-per-minute limit.
    f.budget_cost = math.min(a.reserve, s.budget)
    if deny == '' then
      local used = tonumber(redis.call('GET', P .. 'b:' .. name .. ':' .. period) or '0')
      if used + f.budget_cost > s.budget then
        deny, wait, budget_left = 'budget', period_end - now, math.max(0, s.budget - used)
      end
    end
  end
  f.name = name
  out[i] = f
end
local uk = P .. 'usage:' .. date
local granted = deny == ''
if granted then
  for i, s in ipairs(a.scopes) do
    local f = out[i]
    local name = f.name
    if s.rpm > 0 then
      local rk = P .. 'r:' .. name
      redis.call('ZADD', rk, int(now), a.id)
      redis.call('PEXPIRE', rk, int(W + 1000))
    end
    if s.tpm > 0 then
      local tk, sk = P .. 't:' .. name, P .. 'ts:' .. name
      redis.call('ZADD', tk, int(now), a.id .. ':' .. int(f.cost))
      redis.call('INCRBY', sk, int(f.cost))
      redis.call('PEXPIRE', tk, int(W + 1000))
      redis.call('PEXPIRE', sk, int(W + 1000))
    end
    if s.concurrency > 0 then
      local ck = P .. 'c:' .. name
      redis.call('ZADD', ck, int(now + a.lease), a.id)
      redis.call('PEXPIRE', ck, int(a.lease + W))
    end
    if s.budget > 0 then
      local bk = P .. 'b:' .. name .. ':' .. period
      redis.call('INCRBY', bk, int(f.budget_cost))
      redis.call('PEXPIREAT', bk, int(period_end + 86400000))
    end
  end
end
if a.usage then
  redis.call('HINCRBY', uk, client .. (granted and ':requests' or ':limited'), 1)
  redis.call('PEXPIRE', uk, K.usage_ms)
end
for _, f in ipairs(out) do f.name = nil end
return cjson.encode({granted = granted, reason = deny, wait = wait, date = date,
                     period = period, client = client, budget_left = budget_left,
                     scopes = out})
