-- claim_action: ActionLedger.claim: an engine host is about to start the action. Atomic with
-- time_out_action on the same record: an action is started before its deadline or refused.
-- KEYS[12] the action record, ARGV[7] action_id, ARGV[8] refusal (action_timeout), ARGV[9] the
-- deadline the action carries ('' if none; used when the record is gone), ARGV[10] now as an
-- RFC 3339 timestamp (for action.failed, published to every member when it expires here),
-- ARGV[11] the claimer: the id of the serving node whose own link delivers the action (the HTTP
-- link: another node may take it over once that node is gone, take_over.lua), or '' for an
-- engine host elsewhere (a stream worker: its entry outlives it).
-- Returns {'final', answer} | {'start'} | {'expired', the record's character} (refused now) |
-- {'expired'} (no record: nothing recorded).
local record, action_id = K_ACTION, ARGV[7]
local found = redis.call('HMGET', record, 'c', 'r', 'x', 'd', 'g')
if found[2] then
  return {'final', found[2]}
end
if found[3] then
  return {'final', found[3]}
end
if not found[1] then  -- the record is gone (Redis lost it): start unless the action is late
  if ARGV[9] ~= '' and NOW > tonumber(ARGV[9]) then
    return {'expired'}
  end
  return {'start'}
end
if found[5] then
  return {'start'}  -- a redelivery of a started action: the engine deduplicates by action_id
end
if found[4] and NOW > tonumber(found[4]) then
  redis.call('HSET', record, 'x', ARGV[8])
  redis.call('PEXPIRE', record, RECORD_TTL)
  release_lock(found[1], action_id)
  publish_failed(action_id, found[1], ARGV[8], ARGV[10])
  return {'expired', found[1]}
end
redis.call('HSET', record, 'g', ARGV[11] ~= '' and ARGV[11] or '1')
return {'start'}
