-- snapshot: the projection behind system.hello, consistent with its seq (Backend.snapshot).
-- KEYS[12] the party's narration hash (narrate.lua describes it), ARGV[7] its keep time in ms.
-- Returns {epoch, seq, member ids in roster order, names (flat), online ids, state (flat),
-- ballots of the open vote (flat), actions in flight (flat: action_id, character_id,
-- action_type, until), open narration streams (flat: stream_id, last index, text, action_id or
-- '', created)}.
local epoch = ensure_epoch_expiring()
local ballots = {}
if redis.call('HGET', K_VOTE, 'finished') == '0' then
  ballots = redis.call('HGETALL', K_BALLOTS)
end
local flights = {}
local locks = redis.call('HGETALL', K_LOCKS)
for i = 1, #locks, 2 do
  local until_, action_id, action_type = parse_lock(locks[i + 1])
  if until_ and until_ > NOW then
    for _, v in ipairs({action_id, locks[i], action_type, fmt_time(until_)}) do
      flights[#flights + 1] = v
    end
  end
end
local streams = {}
narration_fresh(KEYS[12], tonumber(ARGV[7]))
for _, field in ipairs(redis.call('HKEYS', KEYS[12])) do
  if string.sub(field, 1, 2) == 'm:' then
    local id = string.sub(field, 3)
    local meta = redis.call('HGET', KEYS[12], field)
    local last, ended, _, _, created = string.match(meta, '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
    if ended == '0' then
      local found = redis.call('HMGET', KEYS[12], 't:' .. id, 'a:' .. id)
      for _, v in ipairs({id, last, found[1] or '', found[2] or '', created}) do
        streams[#streams + 1] = v
      end
    end
  end
end
return {
  epoch,
  tonumber(redis.call('HGET', K_META, 'seq')),
  redis.call('ZRANGE', K_MEMBERS, 0, -1),
  redis.call('HGETALL', K_NAMES),
  redis.call('SMEMBERS', K_ONLINE),
  redis.call('HGETALL', K_STATE),
  ballots,
  flights,
  streams,
}
