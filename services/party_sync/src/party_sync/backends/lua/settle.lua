-- settle: after the grace period, party.leave (disconnected) if the character is still online and
-- has no live connection (Backend.settle). ARGV[7] character_id, ARGV[8] the leave body, ARGV[9]
-- the gone deadline the disconnect that began this grace wrote ('': not checked): another one
-- there means the character connected and disconnected again since (a second blip), and that
-- later grace settles it (core/presence.py, grace_is_current).
-- Returns {seq or 0, epoch or ''}.
local character_id, body, mark = ARGV[7], ARGV[8], ARGV[9]
if redis.call('SISMEMBER', K_ONLINE, character_id) == 0 or live_characters()[character_id] then
  return {0, ''}
end
if mark ~= '' then
  local gone = redis.call('HGET', K_GONE, character_id)
  if gone and gone ~= mark then
    return {0, ''}
  end
end
redis.call('HDEL', K_GONE, character_id)
local epoch = ensure_epoch()
local seq = append(epoch, body, 'party.leave', {character_id, 'disconnected'})
return {seq, epoch}
