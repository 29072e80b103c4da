-- begin_action: the idempotency decision of core/actions.py ActionLedger.begin, across nodes.
-- KEYS[12] the action record. ARGV[7] character_id, ARGV[8] action_id, ARGV[9] action_timeout,
-- ARGV[10] when the node sent this call (its wall clock, Unix seconds; NOW may be virtual in
-- tests), ARGV[11] the most seconds after that this call may run and still accept, ARGV[12]
-- '0' for an action without a deadline (party_sync's own: a vote's), else '1', ARGV[13] the
-- action_type, ARGV[14] its action.accepted envelope (published to every member if accepted),
-- ARGV[15] the id of the node that claims an accepted action in the same step (as claim_action.lua
-- would: the in-process link starts every action it is given at once, in that node), else '0';
-- ARGV[16] (optional) the deadline in seconds from now when it is not action_timeout (the lock
-- still lapses after action_timeout).
-- Returns {'done', final answer} | {'in_flight', its claimer ('' if none), when it began} | {'busy', blocking
-- action_id} | {'accept'} | {'taken'} (another actor's action_id) | {'stale'}.
--
-- The record: c character, s began at, d deadline, g once an engine host claimed it (the node id
-- of a claim by a node's own link, in-process or HTTP, so that another node may take the action
-- over when that node is gone: take_over.lua; '1' for an engine host elsewhere, a stream worker), r the action.result, x a refusal (the final
-- answer when there is no result; see refuse_action.lua).
--
-- 'stale': Redis ran this call long after the node sent it (Redis was stalled, and the node's
-- command timed out and told the player backend_unavailable). Accepting it then would leave an
-- action in flight that no engine was ever given, refusing every resend for the record's TTL.
local record, character_id, action_id = K_ACTION, ARGV[7], ARGV[8]
local clock = redis.call('TIME')
if tonumber(clock[1]) + tonumber(clock[2]) / 1000000 > tonumber(ARGV[10]) + tonumber(ARGV[11]) then
  return {'stale'}
end
local found = redis.call('HMGET', record, 'c', 'r', 'x', 'g')
if found[1] and found[1] ~= character_id then
  return {'taken'}  -- another actor's id: nothing about it is told
end
if found[2] then
  return {'done', found[2]}
end
if found[3] then
  return {'done', found[3]}
end
if found[1] then
  -- (its start read only here: a resend's, not every action's, cost)
  return {'in_flight', found[4] or '', redis.call('HGET', record, 's') or ''}
end
local until_, holder = read_lock(character_id)
if until_ and until_ > NOW then
  return {'busy', holder}
end
local deadline = fmt_time(NOW + tonumber(ARGV[9]))
local fields = {'c', character_id, 's', NOW_TEXT}
if ARGV[12] ~= '0' then  -- '0': party_sync's own action (a vote's): no deadline
  fields[5], fields[6] = 'd', ARGV[16] and fmt_time(NOW + tonumber(ARGV[16])) or deadline
end
if ARGV[15] ~= '0' then  -- claimed with its acceptance, by that node
  fields[#fields + 1], fields[#fields + 2] = 'g', ARGV[15]
end
redis.call('HSET', record, unpack(fields))
redis.call('PEXPIRE', record, RECORD_TTL)
redis.call('HSET', K_LOCKS, character_id, deadline .. ' ' .. action_id .. ' ' .. ARGV[13])
if ARGV[12] == '0' then  -- no deadline: listed in flight until its final answer (outlive())
  outlive(action_id, deadline, character_id, ARGV[13], NOW)
end
redis.call('PEXPIRE', K_LOCKS, PARTY_TTL)
publish_transient(ARGV[14])
return {'accept'}
