-- snapshot: the projection behind system.hello, consistent with its seq (Backend.snapshot).
-- Returns {epoch, seq, member ids in roster order, names (flat), online ids, state (flat),
-- ballots of the open vote (flat)}.
local epoch = ensure_epoch_expiring()
local ballots = {}
if redis.call('HGET', K_VOTE, 'finished') == '0' then
  ballots = redis.call('HGETALL', K_BALLOTS)
end
return {
  epoch,
  tonumber(redis.call('HGET', K_META, 'seq')),
  redis.call('ZRANGE', K_MEMBERS, 0, -1),
  redis.call('HGETALL', K_NAMES),
  redis.call('SMEMBERS', K_ONLINE),
  redis.call('HGETALL', K_STATE),
  ballots,
}
