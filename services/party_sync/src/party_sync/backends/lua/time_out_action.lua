-- time_out_action: ActionLedger.time_out, the sweep at an action's deadline: refuse it with the
-- given action_timeout error unless an engine host has started it (claim_action.lua).
-- KEYS[12] the action record, ARGV[7] action_id, ARGV[8] refusal, ARGV[9] now as an RFC 3339
-- timestamp (for action.failed, published to every member when it times out here).
-- Returns {'final', answer} | {'told', refusal} (made while its character had a live connection:
-- refuse_action.lua) | {'timed_out'} | {'started'} | {'not_due'} | {'gone'}.
local record, action_id = K_ACTION, ARGV[7]
local found = redis.call('HMGET', record, 'c', 'r', 'x', 'd', 'g', 's', 't')
if found[2] then
  return {'final', found[2]}
end
if found[3] then
  return {found[7] and 'told' or 'final', found[3]}
end
if not found[1] then
  return {'gone'}
end
if not found[4] or NOW < tonumber(found[4]) then  -- no deadline: party_sync's own action
  return {'not_due'}
end
if found[5] then  -- started: its answer comes from the engine; still in flight, unlocked
  local lock = redis.call('HGET', K_LOCKS, found[1])
  if lock then
    local until_, holder, action_type = parse_lock(lock)
    if holder == action_id then
      outlive(action_id, fmt_time(until_), found[1], action_type, tonumber(found[6]) or NOW)
    end
  end
  release_lock(found[1], action_id)
  return {'started'}
end
release_lock(found[1], action_id)
redis.call('HSET', record, 'x', ARGV[8])
redis.call('PEXPIRE', record, RECORD_TTL)
publish_failed(action_id, found[1], ARGV[8], ARGV[9])
return {'timed_out'}
