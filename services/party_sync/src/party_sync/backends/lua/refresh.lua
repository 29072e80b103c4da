-- refresh: heartbeat of this node's live connections of the party (Backend.refresh); a forgotten
-- connection is re-added, as core/presence.py does, and an expiry is only ever pushed forward (GT:
-- a heartbeat sent before a stall and run after a newer one does not shorten it).
-- A live connection's character that is not online any more is announced again (party.join), in
-- this same atomic step (core/presence.announce_again): the sweep announced it expired during a
-- stall, or the party's state was lost (a Redis restarted empty: no META, so ensure_epoch starts
-- a new epoch at seq 1, which is how every node notices the loss). Not a character that left on
-- purpose: leave.lua keeps a tombstone in K_GONE for presence_ttl (a character offline with an
-- entry in K_GONE that has not passed has left; disconnect.lua only writes K_GONE for an online
-- character).
-- ARGV[7] presence_ttl (seconds), ARGV[8] a trace id prefix (24 hex), ARGV[9] the envelopes'
-- timestamp (RFC 3339), ARGV[10] the campaign run, ARGV[11..] pairs: presence entry, display name.
-- Returns {next presence expiry, data of each published join ...}.
local expires = fmt_time(NOW + tonumber(ARGV[7]))
local trace_prefix, timestamp, run = ARGV[8], ARGV[9], ARGV[10]
local out = {''}
local epoch = nil
for i = 11, #ARGV, 2 do
  local entry = ARGV[i]
  redis.call('ZADD', K_PRESENCE, 'GT', expires, entry)
  local character_id = character_of(entry)
  if redis.call('SISMEMBER', K_ONLINE, character_id) == 0
    and tonumber(redis.call('HGET', K_GONE, character_id) or '0') <= NOW then
    -- a tombstone past its time no longer holds, swept or not (core/presence.py has_left)
    redis.call('HDEL', K_GONE, character_id)
    if not epoch then
      epoch = ensure_epoch()
      redis.call('HSET', K_META, 'run', run)
    end
    -- the party.join envelope without seq (append splices it in); cjson escapes every value
    local body = cjson.encode({
      type = 'party.join',
      timestamp = timestamp,
      trace_id = trace_prefix .. string.format('%08x', #out),
      payload = {character_id = character_id, display_name = ARGV[i + 1]},
    })
    local _, data = append(epoch, body, 'party.join', {character_id, ARGV[i + 1]}, {K_PRESENCE})
    out[#out + 1] = data
  end
end
touch()
out[1] = next_expiry()
return out
