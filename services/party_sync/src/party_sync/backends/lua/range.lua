-- range: the events after a seq, all or nothing (Backend.replay and the bus's gap repair); the
-- rule of core/history.py can_resume. Read-only. ARGV[7] the epoch the caller counts in,
-- ARGV[8] its last seq, ARGV[9] the most events it accepts. History entries are returned as
-- their events (_lib.lua event_of: without the stamp an entry may carry).
-- Returns {epoch or '', top} when it cannot be done, else {epoch, top, 'ok', events ...}.
local epoch = redis.call('HGET', K_META, 'epoch')
if not epoch then
  return {'', 0}
end
local top = tonumber(redis.call('HGET', K_META, 'seq'))
local after, most = tonumber(ARGV[8]), tonumber(ARGV[9])
if epoch ~= ARGV[7] or after < 0 or after > top then
  return {epoch, top}
end
local missed = top - after
local oldest = top - redis.call('LLEN', K_HISTORY) + 1
if missed > 0 and (missed > most or after + 1 < oldest) then
  return {epoch, top}
end
local out = {epoch, top, 'ok'}
if missed > 0 then
  for _, data in ipairs(redis.call('LRANGE', K_HISTORY, after + 1 - oldest, -1)) do
    out[#out + 1] = event_of(data)
  end
end
return out
