-- head: the party's epoch and top seq, starting a history if it has none (the bus's baseline).
-- Returns {epoch, top}.
local epoch = ensure_epoch_expiring()
return {epoch, tonumber(redis.call('HGET', K_META, 'seq'))}
