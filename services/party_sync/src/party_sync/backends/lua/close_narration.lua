-- close_narration: close a stream with no piece for narration_idle (NarrationBook.close_idle):
-- its empty last piece (done) goes to every member. KEYS[12] the narration hash (narrate.lua
-- describes it). ARGV[7] stream_id, ARGV[8] narration_idle (s), ARGV[9] now as an RFC 3339
-- timestamp, ARGV[10] the trace_id of the closing piece, ARGV[11] the hash's keep time in ms,
-- ARGV[12] when the node sent this call and ARGV[13] the most seconds after that it may run
-- (narrate.lua: a call Redis runs too late changes nothing); ARGV[14] the action the caller
-- knows the stream narrates ('' if none) and KEYS[13] its record: if the stream does narrate it
-- and its result is out (the record has r), the stream is closed now, idle or not (over with
-- its action).
-- Returns {'closed', index} | {'due', when to look again} | {'none'} (ended) | {'gone'} (not
-- known: never, or forgotten after its keep time, say during a long stall: a node still showing
-- it closes it for its own members) | {'stale'}.
local K_NARRATION, id = KEYS[12], ARGV[7]
if too_late(ARGV[12], ARGV[13]) then
  return {'stale'}
end
narration_fresh(K_NARRATION, tonumber(ARGV[11]))
local meta = redis.call('HGET', K_NARRATION, 'm:' .. id)
if not meta then
  return {'gone'}
end
local last, ended, updated, held, created = string.match(meta, '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
if ended == '1' then
  return {'none'}
end
local due = tonumber(updated) + tonumber(ARGV[8])
local over = ARGV[14] ~= '' and KEYS[13] ~= nil
  and redis.call('HGET', K_NARRATION, 'a:' .. id) == ARGV[14]
  and redis.call('HEXISTS', KEYS[13], 'r') == 1
if due > NOW and not over then
  return {'due', fmt_time(due)}
end
local index = string.format('%d', tonumber(last) + 1)
-- the last index stays the engine's: a late piece after it is 'ended', not a repeat
redis.call('HSET', K_NARRATION, 'm:' .. id, last .. ' 1 ' .. NOW_TEXT .. ' ' .. held .. ' ' .. created)
redis.call('HDEL', K_NARRATION, 't:' .. id)
redis.call('HINCRBY', K_NARRATION, 'o', -1)
narration_written(K_NARRATION, tonumber(ARGV[11]))
local action = redis.call('HGET', K_NARRATION, 'a:' .. id)
local tail = ''
if action then
  tail = ',"action_id":"' .. action .. '"'
end
publish_transient('{"type":"narration.delta","timestamp":"' .. ARGV[9] .. '","trace_id":"' .. ARGV[10]
  .. '","payload":{"stream_id":"' .. id .. '","index":' .. index .. ',"text":"","done":true' .. tail .. '}}')
return {'closed', tonumber(index)}
