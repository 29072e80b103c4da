-- connect: register a connection; publish party.join if its character is not online
-- (Backend.connect). ARGV[7] presence entry "<connection_id>:<character_id>", ARGV[8] character_id,
-- ARGV[9] the join body, ARGV[10] display_name, ARGV[11] presence_ttl (seconds), ARGV[12] the
-- campaign run (recorded: the party's run, for votes and run-wide events).
-- Returns {seq or 0, epoch, next presence expiry}.
local entry, character_id, body, name = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local epoch = ensure_epoch()
redis.call('HSET', K_META, 'run', ARGV[12])
redis.call('ZADD', K_PRESENCE, fmt_time(NOW + tonumber(ARGV[11])), entry)
redis.call('HDEL', K_GONE, character_id)
local seq = 0
if redis.call('SISMEMBER', K_ONLINE, character_id) == 0 then
  seq = append(epoch, body, 'party.join', {character_id, name}, {K_PRESENCE})
else
  touch()
end
return {seq, epoch, next_expiry()}
