-- settle: after the grace period, party.leave (disconnected) if the character is still online and
-- has no live connection (Backend.settle). ARGV[7] character_id, ARGV[8] the leave body.
-- Returns {seq or 0, epoch or ''}.
local character_id, body = ARGV[7], ARGV[8]
if redis.call('SISMEMBER', K_ONLINE, character_id) == 0 or live_characters()[character_id] then
  return {0, ''}
end
redis.call('HDEL', K_GONE, character_id)
local epoch = ensure_epoch()
local seq = append(epoch, body, 'party.leave', {character_id, 'disconnected'})
return {seq, epoch}
