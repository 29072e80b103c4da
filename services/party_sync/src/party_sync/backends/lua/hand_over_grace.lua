-- hand_over_grace: a draining node's grace still running (Backend.hand_over_grace): the
-- character's deadline in gone becomes the grace's end (ARGV[8]) if it is still the one that
-- node's disconnect wrote (ARGV[9], now + grace + presence_ttl then); a later disconnect's (another
-- grace, on any node) is left as it is. The presence sweep (expire.lua) then announces the leave
-- after the grace's end, not presence_ttl later. ARGV[7] character_id. Returns 1 if handed over.
local character_id = ARGV[7]
if redis.call('HGET', K_GONE, character_id) ~= ARGV[9] then
  return 0
end
redis.call('HSET', K_GONE, character_id, ARGV[8])
return 1
