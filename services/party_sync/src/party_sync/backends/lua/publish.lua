-- publish: sequence one event of the party (Backend.publish).
-- ARGV[7] body (the encoded envelope without seq), ARGV[8] type, ARGV[9..] fold arguments.
-- KEYS[12]: the action record, for an action.result (completed in the same atomic step).
-- Returns {seq, epoch}, or {0, '', the earlier data} for a second result of one action.
local body, kind = ARGV[7], ARGV[8]
if kind == 'action.result' then
  local earlier = redis.call('HGET', K_ACTION, 'r')
  if earlier then  -- idempotent: a redelivered action's result is not sequenced nor sent again
    return {0, '', earlier}
  end
end
local f = {}
for i = 9, #ARGV do
  f[#f + 1] = ARGV[i]
end
local epoch = ensure_epoch()
local seq, data = append(epoch, body, kind, f)
if kind == 'action.result' then
  -- core/actions.py ActionLedger.complete: keep the result for repeats, free the character.
  local record = K_ACTION
  local character_id = redis.call('HGET', record, 'c')
  if not character_id then
    character_id = f[2]
    redis.call('HSET', record, 'c', character_id, 's', fmt_time(NOW))
  end
  redis.call('HSET', record, 'r', data)
  redis.call('PEXPIRE', record, RECORD_TTL_MS)
  release_lock(character_id, f[1])
end
return {seq, epoch}
