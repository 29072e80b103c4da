-- time_out_action: ActionLedger.time_out: 1 (once) if the action is still in flight after
-- action_timeout; frees the character's lock, keeps the record (the action must not run twice).
-- KEYS[12] the action record, ARGV[7] action_id, ARGV[8] action_timeout.
local record, action_id = K_ACTION, ARGV[7]
local found = redis.call('HMGET', record, 'c', 'r', 's')
if not found[1] or found[2] then
  return 0
end
if NOW < tonumber(found[3]) + tonumber(ARGV[8]) then
  return 0
end
local _, holder = read_lock(found[1])
if holder ~= action_id then
  return 0
end
redis.call('HDEL', K_LOCKS, found[1])
return 1
