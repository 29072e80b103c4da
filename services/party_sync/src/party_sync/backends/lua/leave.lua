-- leave: a voluntary leave, party.leave (left) if the character is a member (Backend.leave).
-- ARGV[7] character_id, ARGV[8] the leave body, ARGV[9] presence_ttl (seconds): for that long a
-- tombstone in K_GONE stops refresh.lua from announcing the character again while its tabs close.
-- Returns {seq or 0, epoch or ''}.
local character_id, body = ARGV[7], ARGV[8]
if not redis.call('ZSCORE', K_MEMBERS, character_id) then
  return {0, ''}
end
redis.call('HSET', K_GONE, character_id, fmt_time(NOW + tonumber(ARGV[9])))
local epoch = ensure_epoch()
local seq = append(epoch, body, 'party.leave', {character_id, 'left'})
return {seq, epoch}
