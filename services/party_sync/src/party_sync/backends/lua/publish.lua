-- publish: sequence one event of the party (Backend.publish).
-- ARGV[7] body (the encoded envelope without seq), ARGV[8] type, ARGV[9..] fold arguments.
-- KEYS[12]: the action record, for an action.result (completed in the same atomic step); for
-- another event, if given, the record of its Idempotency-Key (core/published.py: s, the seq of
-- the event first published under the key; f, that request's shape: its number of events), and then the last
-- ARGV is this request's shape (not a fold argument).
-- Returns {seq, epoch, 1 if it replaced a refusal else 0}, {0, '', the earlier data} for a
-- second result of one action, {0, 'key', the first seq} for a second publish under one key,
-- or {0, 'reused', the first seq} when the key's request had another number of events, or
-- {0, 'actor', the record's character} for a result naming another character than the
-- action's (nothing recorded).
local body, kind = ARGV[7], ARGV[8]
local last, request = #ARGV, nil
if K_ACTION and kind ~= 'action.result' then
  request, last = ARGV[#ARGV], #ARGV - 1
end
local record = nil  -- the action record's {character, result, refusal}, for an action.result
local refused = 0
if kind == 'action.result' then
  record = redis.call('HMGET', K_ACTION, 'c', 'r', 'x')
  if record[1] and record[1] ~= ARGV[10] then  -- another character's action: an engine's slip
    return {0, 'actor', record[1]}  -- (a late copy's too: the first named the action's)
  end
  if record[2] then  -- idempotent: a redelivered action's result is not sequenced nor sent again
    return {0, '', record[2]}
  end
elseif K_ACTION then  -- published under an Idempotency-Key: the first one stands
  local first = redis.call('HMGET', K_ACTION, 's', 'f')
  if first[1] then
    if first[2] and first[2] ~= request then
      return {0, 'reused', first[1]}
    end
    return {0, 'key', first[1]}
  end
end
local f = {}
for i = 9, last do
  f[#f + 1] = ARGV[i]
end
local epoch = ensure_epoch()
local seq, data = append(epoch, body, kind, f)
if kind == 'action.result' then
  -- core/actions.py ActionLedger.complete: keep the result for repeats, free the character.
  local character_id = record[1]
  if character_id then
    redis.call('HSET', K_ACTION, 'r', data)
    if record[3] then  -- it had been refused: the engine applied it anyway, and the result stands
      redis.call('HDEL', K_ACTION, 'x')
      refused = 1
    end
  else
    character_id = f[2]
    redis.call('HSET', K_ACTION, 'c', character_id, 's', NOW_TEXT, 'r', data)
  end
  redis.call('PEXPIRE', K_ACTION, RECORD_TTL)
  release_lock(character_id, f[1])
  answered(f[1])
elseif K_ACTION then
  redis.call('HSET', K_ACTION, 's', seq, 'f', request)
  redis.call('PEXPIRE', K_ACTION, RECORD_TTL)
end
return {seq, epoch, refused}
