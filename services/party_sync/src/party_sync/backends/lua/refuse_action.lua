-- refuse_action: ActionLedger.refuse: the action will never be applied; the refusal is its final
-- answer (a resend of the action_id gets it for the record's TTL). Nothing changes if it already
-- has one. KEYS[12] the action record, ARGV[7] action_id, ARGV[8] character_id, ARGV[9] refusal,
-- ARGV[10] now as an RFC 3339 timestamp (for action.failed, published to every member).
-- A connection of its character live now (which the refusal reaches) is noted, 't': the
-- deadline's look (time_out_action.lua) then owes it to no connection opened since.
-- Returns the character whose action it is (the record's; ARGV[8] only without a record) if the
-- refusal was recorded, 0 if the action already had its final answer.
local record, action_id = K_ACTION, ARGV[7]
local found = redis.call('HMGET', record, 'c', 'r', 'x')
if found[2] or found[3] then
  return 0
end
local character_id = found[1] or ARGV[8]
redis.call('HSET', record, 'c', character_id, 'x', ARGV[9])
if live_characters()[character_id] then
  redis.call('HSET', record, 't', '1')
end
redis.call('PEXPIRE', record, RECORD_TTL)
release_lock(character_id, action_id)
answered(action_id)
publish_failed(action_id, character_id, ARGV[9], ARGV[10])
return character_id
