-- disconnect: forget a connection (Backend.disconnect). ARGV[7] presence entry, ARGV[8]
-- character_id, ARGV[9] the deadline by which this node settles the character (now + grace +
-- presence_ttl): if it dies first, the presence sweep announces the leave instead (expire.lua);
-- a draining node, which will not settle it, gives the grace's own end (now + grace).
-- Returns 1 if the character has no live connection left, else 0.
local entry, character_id = ARGV[7], ARGV[8]
redis.call('ZREM', K_PRESENCE, entry)
local last = 0
if not live_characters()[character_id] then
  last = 1
  if redis.call('SISMEMBER', K_ONLINE, character_id) == 1 then
    redis.call('HSET', K_GONE, character_id, ARGV[9])
  end
end
touch()
return last
