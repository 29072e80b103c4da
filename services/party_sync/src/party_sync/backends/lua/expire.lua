-- expire: the presence sweep of one party (Backend.expire). Drops expired connections, then
-- announces party.leave (expired) for every online character left without a live connection whose
-- owning node missed its settle deadline (the node died, mid-grace or not). Atomic, so when
-- several nodes sweep, each leave is published exactly once. A character whose connection is in
-- fact live (its node stalled with Redis) is announced again by that node's refresh (refresh.lua).
-- ARGV[7] a trace id prefix (24 hex), ARGV[8] the envelopes' timestamp (RFC 3339).
-- Returns {next presence expiry or '', data of each published leave ...}.
local trace_prefix, timestamp = ARGV[7], ARGV[8]
redis.call('ZREMRANGEBYSCORE', K_PRESENCE, '-inf', NOW_TEXT)
local live = live_characters()
local online = redis.call('SMEMBERS', K_ONLINE)
table.sort(online)
local out = {''}
local epoch = nil
for _, character_id in ipairs(online) do
  local deadline = tonumber(redis.call('HGET', K_GONE, character_id) or '0')
  if not live[character_id] and deadline <= NOW then
    redis.call('HDEL', K_GONE, character_id)
    epoch = epoch or ensure_epoch()
    -- the party.leave envelope without seq (append splices it in); cjson escapes every value
    local body = cjson.encode({
      type = 'party.leave',
      timestamp = timestamp,
      trace_id = trace_prefix .. string.format('%08x', #out),
      payload = {character_id = character_id, reason = 'expired'},
    })
    local _, data = append(epoch, body, 'party.leave', {character_id, 'expired'})
    out[#out + 1] = data
  end
end
-- forget deadlines of characters who are no longer online, once past (the entry of a character
-- who left on purpose is a tombstone that refresh.lua honours until then: see leave.lua)
local gone = redis.call('HGETALL', K_GONE)
for i = 1, #gone, 2 do
  if tonumber(gone[i + 1]) <= NOW and redis.call('SISMEMBER', K_ONLINE, gone[i]) == 0 then
    redis.call('HDEL', K_GONE, gone[i])
  end
end
out[1] = next_expiry()
return out
