-- Push the expiry of a replica's leases forward; a plain ZADD, so a server that lost its
-- data (a restart without persistence) gets the leases of the requests still running back.
-- Preceded by calendar.lua and `K`.
-- ARGV[1]: the key prefix; ARGV[2]: JSON {lease = ms, now = ms or 0, leases = [[scope, id], …]}.
local P = ARGV[1]
local r = cjson.decode(ARGV[2])
local expiry = clock(r.now) + r.lease
for _, pair in ipairs(r.leases) do
  local ck = P .. 'c:' .. pair[1]
  redis.call('ZADD', ck, int(expiry), pair[2])
  redis.call('PEXPIRE', ck, int(r.lease + K.window))
end
return 1
