-- connect: register a connection; publish party.join if its character is not online
-- (Backend.connect). ARGV[7] presence entry "<connection_id>:<character_id>", ARGV[8] character_id,
-- ARGV[9] the join body, ARGV[10] display_name, ARGV[11] presence_ttl (seconds), ARGV[12] the
-- campaign run (recorded: the party's run, for votes and run-wide events), ARGV[13] when the
-- node sent this call (on Redis's clock; '0': no check), ARGV[14] the most seconds after that
-- this call may run and still register the connection.
-- Returns {seq or 0, epoch, next presence expiry}, or {-1} when it ran too late ('stale', as in
-- begin_action.lua: Redis was stalled and the node has refused the handshake by now; a
-- connection registered then would show a player online who is not, until presence expires).
if ARGV[13] ~= '0' then
  local clock = redis.call('TIME')
  if tonumber(clock[1]) + tonumber(clock[2]) / 1000000 > tonumber(ARGV[13]) + tonumber(ARGV[14]) then
    return {-1}
  end
end
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
