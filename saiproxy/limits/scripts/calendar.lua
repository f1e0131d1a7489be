-- Shared by the scripts: integers as Valkey reads them, and the civil calendar (UTC).

-- Every number handed to redis.call goes through int(): Lua writes a number
-- of 1e14 or more as 1e+14, which INCRBY and member names cannot take.
local function int(n) return string.format('%d', n) end
local function fl(x) return math.floor(x) end
local function civil(z)
  z = z + 719468
  local era = fl(z / 146097)
  local doe = z - era * 146097
  local yoe = fl((doe - fl(doe / 1460) + fl(doe / 36524) - fl(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + fl(yoe / 4) - fl(yoe / 100))
  local mp = fl((5 * doy + 2) / 153)
  local d = doy - fl((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = fl(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = fl((153 * mp + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + fl(yoe / 4) - fl(yoe / 100) + doy - 719468
end
-- The time in ms: the caller's clock when it names one (tests step it), else the server's,
-- so that the replicas' clocks do not matter.
local function clock(now)
  if now and now > 0 then return now end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + fl(tonumber(t[2]) / 1000)
end
-- The usage day and the budget's period at `now`, and when the period ends (ms).
local function calendar(now, kind)
  local day = fl(now / 86400000)
  local y, m, d = civil(day)
  local date = string.format('%04d-%02d-%02d', y, m, d)
  if kind ~= 'month' then return date, date, (day + 1) * 86400000 end
  local period = string.format('%04d-%02d', y, m)
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  return date, period, days_from_civil(y, m, 1) * 86400000
end
-- A token window's member is '<request id>:<tokens>'.
local function tokens_of(member) return tonumber(string.match(member, ':(%d+)$')) end
