-- publish_many: sequence several events of the party in one atomic step (Backend.publish_many),
-- exactly as the same events published one after another by publish.lua, with nothing of
-- another call between them, and ONE PUBLISH carrying them all:
--   {"epoch":"<epoch>","lengths":[<bytes of each event>],"events":[<event>,<event>,...]}
-- (redis_stream.py slices the events by their lengths; the message is also plain JSON).
-- ARGV[7] the number of events; then per event: body, type, the count of its fold arguments,
-- the fold arguments. KEYS[12], KEYS[13], ...: the action record of each action.result, in order;
-- then, for a call made under an Idempotency-Key, that key's record (core/published.py: s, the
-- seq of the first event of the call first published under the key; f, that call's shape: its number of events),
-- and then the last ARGV, after the events, is this call's shape. A call under a key whose
-- call had another number of events returns {'!reused'} and publishes nothing; a result naming
-- another character than its action's returns {'!actor', its index (1-based), the record's
-- character} and publishes nothing.
-- Returns {epoch ('' if nothing was sequenced), then per event: seq, 1 if it replaced a refusal
-- else 0}, where a second result of one action (idempotent: not sequenced again) is
-- {0, the earlier data}.
--
-- A call under an Idempotency-Key whose call was published is answered by the key first (its
-- seqs, or {'!reused'}), whatever it holds; then a replayed answer publishes nothing: when the
-- call holds action results and every one of their
-- actions already had its result before it, each result is {0, the earlier data} and every other
-- event {0, ''} (not sequenced). The first answer was one atomic step too, so its other events
-- went out with it; what a late copy of it carries (a worker that was frozen while another took
-- its action over, then woke) is at best the same and at worst out of date.
local count = tonumber(ARGV[7])
-- The action records the results name, read once (a second result of one action in this call
-- reads its record again below, after the first wrote it).
local records, results, answered = {}, 0, 0
local other_actor = nil  -- the first result naming another character than its action's
do
  local at_, record_at_ = 8, 12
  for i = 1, count do
    if ARGV[at_ + 1] == 'action.result' then
      records[i] = redis.call('HMGET', KEYS[record_at_], 'c', 'r', 'x')
      results = results + 1
      if records[i][2] then
        answered = answered + 1
      end
      if not other_actor and records[i][1] and records[i][1] ~= ARGV[at_ + 4] then
        other_actor = {'!actor', i, records[i][1]}  -- refused after the key's answer, if any
      end
      record_at_ = record_at_ + 1
    end
    at_ = at_ + 3 + tonumber(ARGV[at_ + 2])
  end
end
-- A call under a key that has its call already: nothing again; per event {-1, the seq the same
-- event of that call got} (the first call was one atomic step: consecutive seqs).
local K_KEYED = nil
if #KEYS > 11 + results then
  K_KEYED = KEYS[#KEYS]
  local found = redis.call('HMGET', K_KEYED, 's', 'f')
  local first = found[1]
  if first and found[2] and found[2] ~= ARGV[#ARGV] then
    return {'!reused'}
  end
  if first then
    local out = {''}
    for i = 1, count do
      out[#out + 1] = -1
      out[#out + 1] = tonumber(first) + i - 1
    end
    return out
  end
end
if other_actor then  -- (a late copy's too: the first answer named the actions' characters)
  return other_actor
end
if results > 0 and answered == results then
  local out = {''}
  for i = 1, count do
    out[#out + 1] = 0
    out[#out + 1] = records[i] and records[i][2] or ''
  end
  return out
end
local epoch = nil  -- found (or started) by the first event sequenced, as publish.lua does
local first_seq = nil  -- the seq of the first event sequenced (the key's record)
local out = {''}
local datas, lengths = {}, {}
-- The keys the events wrote, each once, for one touch_written after the history is written
-- (which is what append does per event: hold, then touch; one PTTL instead of one per event).
local written, seen = {}, {}
local at, record_at = 8, 12
local reread = {}
for index = 1, count do
  local body, kind, nfold = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  local f = {}
  for i = 1, nfold do
    f[i] = ARGV[at + 2 + i]
  end
  at = at + 3 + nfold
  local record_key, record = nil, nil
  if kind == 'action.result' then
    record_key = KEYS[record_at]
    record_at = record_at + 1
    record = records[index]
    if reread[record_key] then  -- this call wrote it already (two results of one action)
      record = redis.call('HMGET', record_key, 'c', 'r', 'x')
    end
    reread[record_key] = true
  end
  if record and record[2] then  -- idempotent: this action's result stands, it is not sent again
    out[#out + 1] = 0
    out[#out + 1] = record[2]
  else
    epoch = epoch or ensure_epoch()
    local seq, data, kept = sequence(body, kind, f)
    datas[#datas + 1] = data
    for _, key in ipairs(kept and NOTHING or written_by(kind)) do
      if not seen[key] then
        seen[key] = true
        written[#written + 1] = key
      end
    end
    lengths[#lengths + 1] = string.format('%d', #data)
    local refused = 0
    if record then  -- core/actions.py ActionLedger.complete, as in publish.lua
      local character_id = record[1]
      if character_id then
        redis.call('HSET', record_key, 'r', data)
        if record[3] then
          redis.call('HDEL', record_key, 'x')
          refused = 1
        end
      else
        character_id = f[2]
        redis.call('HSET', record_key, 'c', character_id, 's', NOW_TEXT, 'r', data)
      end
      redis.call('PEXPIRE', record_key, RECORD_TTL)
      -- release_lock(character_id, f[1]) and answered(f[1]) in one HDEL
      local _, holder = read_lock(character_id)
      if holder == f[1] then
        redis.call('HDEL', K_LOCKS, character_id, '~' .. f[1])
      else
        redis.call('HDEL', K_LOCKS, '~' .. f[1])
      end
    end
    first_seq = first_seq or seq
    out[#out + 1] = seq
    out[#out + 1] = refused
  end
end
if epoch then
  out[1] = epoch
end
if #datas > 0 then
  hold_many(datas)
  touch_written(written, NOTHING)
  if K_KEYED then
    redis.call('HSET', K_KEYED, 's', first_seq, 'f', ARGV[#ARGV])
    redis.call('PEXPIRE', K_KEYED, RECORD_TTL)
  end
end
if #datas == 1 then
  redis.call('PUBLISH', CHANNEL, '{"epoch":"' .. epoch .. '","event":' .. datas[1] .. '}')
elseif #datas > 1 then
  -- one string made of all the parts (joining the events first, then the message, would make,
  -- and hash, the events' bytes twice)
  local parts = {'{"epoch":"', epoch, '","lengths":[', table.concat(lengths, ','), '],"events":['}
  for i, data in ipairs(datas) do
    parts[#parts + 1] = i > 1 and ',' or ''
    parts[#parts + 1] = data
  end
  parts[#parts + 1] = ']}'
  redis.call('PUBLISH', CHANNEL, table.concat(parts))
end
return out
