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
-- Actions in flight (ActionLedger.in_flight): holding their character, or outliving that (the
-- "~<action_id>" entries _lib.lua outlive() writes; an expired one is dropped here).
local found, order = {}, {}
local locks = redis.call('HGETALL', K_LOCKS)
for i = 1, #locks, 2 do
  local field, value = locks[i], locks[i + 1]
  if string.sub(field, 1, 1) == '~' then
    local until_, character_id, action_type, expires = string.match(value, '^(%S+) (%S+) (%S+) (%S+)$')
    local action_id = string.sub(field, 2)
    if tonumber(expires) > NOW then
      if not found[action_id] then
        order[#order + 1] = action_id
      end
      found[action_id] = {action_id, character_id, action_type, until_}
    else
      redis.call('HDEL', K_LOCKS, field)
    end
  else
    local until_, action_id, action_type = parse_lock(value)
    if until_ and until_ > NOW then
      if not found[action_id] then
        order[#order + 1] = action_id
      end
      found[action_id] = {action_id, field, action_type, fmt_time(until_)}
    end
  end
end
local flights = {}
for _, action_id in ipairs(order) do
  for _, v in ipairs(found[action_id]) do
    flights[#flights + 1] = v
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
