-- narrate: take narration pieces in order (core/transient.py NarrationBook.take, rule for rule)
-- and publish the taken ones to every member in one message (Backend.narrate).
-- KEYS[12] the party's narration hash. ARGV[7] narration_idle (s), ARGV[8] the most open streams,
-- ARGV[9] the most characters per stream, ARGV[10] the most streams kept, ARGV[11] the hash's
-- keep time in ms (kept_for), ARGV[12] when the node sent this call (Unix seconds, on Redis's
-- clock), ARGV[13] the most seconds after that this call may still run; then 7 values per piece:
-- stream_id, index, text, done ('1' or '0'), action_id ('' for none), the text's length in
-- characters, its narration.delta envelope. KEYS[13], KEYS[14], ...: the action record of each
-- action the pieces name, in the order they are first named: a new piece of an action whose
-- result was published is refused ('answered'; a piece the stream has is still a 'repeat').
-- Returns each piece's outcome (core/transient.py Outcome values), or {'stale'}: Redis ran the
-- call too late (a stall; the node gave up on it), and nothing was taken. Its NOW is old: taken,
-- its pieces would be published long after, and 'w' set back in time would make the next call
-- forget the whole hash (narration_fresh), the live streams with it.
--
-- The hash: o the number of open streams, n the number of streams kept, w when it was last
-- written (NOW); per stream m:<id> "<last index> <done 1|0> <updated> <characters> <created>",
-- t:<id> the text so far (deleted when the stream ends: an ended stream is not restated), a:<id>
-- the action it narrates. Bounded: at most MAX_OPEN open and MAX_KEPT kept (a new stream past it
-- forgets the streams that ended narration_idle ago, else the one that ended first), and the
-- whole hash is forgotten after its keep time without a write.
local K_NARRATION = KEYS[12]
local IDLE, MAX_OPEN, MAX_CHARS = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local MAX_KEPT, KEPT_MS = tonumber(ARGV[10]), tonumber(ARGV[11])
if too_late(ARGV[12], ARGV[13]) then
  return {'stale'}
end
narration_fresh(K_NARRATION, KEPT_MS)

local function forget(id)
  redis.call('HDEL', K_NARRATION, 'm:' .. id, 't:' .. id, 'a:' .. id)
  redis.call('HINCRBY', K_NARRATION, 'n', -1)
end

-- NarrationBook._make_room: bounded by MAX_KEPT entries, run only when the book is full.
local function make_room()
  local ended = {}
  for _, field in ipairs(redis.call('HKEYS', K_NARRATION)) do
    if string.sub(field, 1, 2) == 'm:' then
      local _, done, updated = string.match(redis.call('HGET', K_NARRATION, field), '^(%S+) (%S+) (%S+)')
      if done == '1' then
        ended[#ended + 1] = {tonumber(updated), string.sub(field, 3)}
      end
    end
  end
  table.sort(ended, function(a, b)
    if a[1] ~= b[1] then
      return a[1] < b[1]
    end
    return a[2] < b[2]
  end)
  local forgot = false
  for _, entry in ipairs(ended) do
    if entry[1] + IDLE <= NOW then
      forget(entry[2])
      forgot = true
    end
  end
  if not forgot and ended[1] then
    forget(ended[1][2])
  end
end

-- Whether an action's result was published (its record has r), each action read once.
local answered_, next_record = {}, 13
local function answered(action)
  local known = answered_[action]
  if known == nil then
    local record = KEYS[next_record]
    next_record = next_record + 1
    known = record ~= nil and redis.call('HEXISTS', record, 'r') == 1
    answered_[action] = known
  end
  return known
end

local taken, outcomes = {}, {}
for i = 14, #ARGV, 7 do
  local id, index, text, done = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  local action, chars, frame = ARGV[i + 4], tonumber(ARGV[i + 5]), ARGV[i + 6]
  local meta = redis.call('HGET', K_NARRATION, 'm:' .. id)
  local outcome = 'taken'
  if action ~= '' and answered(action)
    and not (meta and index <= tonumber(string.match(meta, '^(%S+)'))) then
    outcome = 'answered'
  elseif not meta then
    if index ~= 0 then
      outcome = 'gap'
    elseif done ~= '1' and tonumber(redis.call('HGET', K_NARRATION, 'o') or '0') >= MAX_OPEN then
      outcome = 'too_many'
    elseif chars > MAX_CHARS then
      outcome = 'too_long'
    else
      if tonumber(redis.call('HGET', K_NARRATION, 'n') or '0') >= MAX_KEPT then
        make_room()
      end
      local kept = text
      if done == '1' then
        kept = ''
      else
        redis.call('HINCRBY', K_NARRATION, 'o', 1)
      end
      redis.call('HINCRBY', K_NARRATION, 'n', 1)
      redis.call('HSET', K_NARRATION, 'm:' .. id,
        '0 ' .. done .. ' ' .. NOW_TEXT .. ' ' .. chars .. ' ' .. NOW_TEXT, 't:' .. id, kept)
      if action ~= '' then
        redis.call('HSET', K_NARRATION, 'a:' .. id, action)
      end
    end
  else
    local last, ended, _, held, created = string.match(meta, '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
    last, held = tonumber(last), tonumber(held)
    if index <= last then
      outcome = 'repeat'
    elseif ended == '1' then
      outcome = 'ended'
    elseif index ~= last + 1 then
      outcome = 'gap'
    elseif held + chars > MAX_CHARS then
      outcome = 'too_long'
    else
      redis.call('HSET', K_NARRATION, 'm:' .. id, string.format('%d', index) .. ' ' .. done .. ' '
        .. NOW_TEXT .. ' ' .. string.format('%d', held + chars) .. ' ' .. created)
      if done == '1' then
        redis.call('HDEL', K_NARRATION, 't:' .. id)
        redis.call('HINCRBY', K_NARRATION, 'o', -1)
      else
        redis.call('HSET', K_NARRATION, 't:' .. id, (redis.call('HGET', K_NARRATION, 't:' .. id) or '') .. text)
      end
    end
  end
  if outcome == 'taken' then
    taken[#taken + 1] = frame
  end
  outcomes[#outcomes + 1] = outcome
end
if #taken > 0 then
  narration_written(K_NARRATION, KEPT_MS)
  publish_transient(table.concat(taken, ','))
end
return outcomes
