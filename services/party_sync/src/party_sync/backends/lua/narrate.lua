-- narrate: take narration pieces in order (core/transient.py NarrationBook.take, rule for rule)
-- and publish the taken ones to every member in one message (Backend.narrate).
-- KEYS[12] the party's narration hash. ARGV[7] narration_idle (s), ARGV[8] the most open streams,
-- ARGV[9] the most characters per stream; then 7 values per piece: stream_id, index, text, done
-- ('1' or '0'), action_id ('' for none), the text's length in characters, its narration.delta
-- envelope. Returns each piece's outcome (core/transient.py Outcome values).
--
-- The hash, per stream: m:<id> "<last index> <done 1|0> <updated> <characters> <created>",
-- t:<id> the text so far (deleted when the stream ends: an ended stream is not restated), a:<id>
-- the action it narrates. It lives twice narration_idle after its last piece; an ended stream is
-- remembered narration_idle (a retried piece of it is a repeat, not a new stream).
local K_NARRATION = KEYS[12]
local IDLE, MAX_OPEN, MAX_CHARS = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])

-- Forget the streams that ended narration_idle ago; the number of open ones.
local function open_streams()
  local open = 0
  for _, field in ipairs(redis.call('HKEYS', K_NARRATION)) do
    if string.sub(field, 1, 2) == 'm:' then
      local meta = redis.call('HGET', K_NARRATION, field)
      local _, done, updated = string.match(meta, '^(%S+) (%S+) (%S+)')
      if done ~= '1' then
        open = open + 1
      elseif tonumber(updated) + IDLE <= NOW then
        local id = string.sub(field, 3)
        redis.call('HDEL', K_NARRATION, field, 't:' .. id, 'a:' .. id)
      end
    end
  end
  return open
end

local taken, outcomes = {}, {}
for i = 10, #ARGV, 7 do
  local id, index, text, done = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  local action, chars, frame = ARGV[i + 4], tonumber(ARGV[i + 5]), ARGV[i + 6]
  local meta = redis.call('HGET', K_NARRATION, 'm:' .. id)
  local outcome = 'taken'
  if not meta then
    if index ~= 0 then
      outcome = 'gap'
    elseif open_streams() >= MAX_OPEN then
      outcome = 'too_many'
    elseif chars > MAX_CHARS then
      outcome = 'too_long'
    else
      local kept = text
      if done == '1' then
        kept = ''
      end
      redis.call('HSET', K_NARRATION, 'm:' .. id,
        '0 ' .. done .. ' ' .. fmt_time(NOW) .. ' ' .. chars .. ' ' .. fmt_time(NOW), 't:' .. id, kept)
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
        .. fmt_time(NOW) .. ' ' .. string.format('%d', held + chars) .. ' ' .. created)
      if done == '1' then
        redis.call('HDEL', K_NARRATION, 't:' .. id)
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
  publish_transient(table.concat(taken, ','))
  redis.call('PEXPIRE', K_NARRATION, math.max(1000, math.floor(IDLE * 2000)))
end
return outcomes
