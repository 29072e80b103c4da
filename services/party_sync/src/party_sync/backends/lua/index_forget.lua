-- index_forget (not a party script: its one key is the presence index, in its own slot).
-- Remove a party that the sweep found without connections, unless another node re-indexed it
-- since the sweep read it. ARGV[1] party_id, ARGV[2] the score the sweep read.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
