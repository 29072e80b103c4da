-- begin_action: the idempotency decision of core/actions.py ActionLedger.begin, across nodes.
-- KEYS[12] the action record. ARGV[7] character_id, ARGV[8] action_id, ARGV[9] action_timeout.
-- Returns {'done', result} | {'in_flight'} | {'busy', blocking action_id} | {'accept'}.
local record, character_id, action_id = K_ACTION, ARGV[7], ARGV[8]
local found = redis.call('HMGET', record, 'c', 'r')
if found[2] then
  return {'done', found[2]}
end
if found[1] then
  return {'in_flight'}
end
local until_, holder = read_lock(character_id)
if until_ and until_ > NOW then
  return {'busy', holder}
end
redis.call('HSET', record, 'c', character_id, 's', fmt_time(NOW))
redis.call('PEXPIRE', record, RECORD_TTL_MS)
redis.call('HSET', K_LOCKS, character_id, fmt_time(NOW + tonumber(ARGV[9])) .. ' ' .. action_id)
redis.call('PEXPIRE', K_LOCKS, PARTY_TTL_MS)
return {'accept'}
