-- take_over: an action claimed by a node for its own link (its in-process engine: begin_action.lua's
-- g; its HTTP link: claim_action.lua's), whose node is gone (its heartbeat expired: the caller checked), is claimed by the calling node, which hands it
-- to its own link; the engine deduplicates by action_id (the gone node may have applied it).
-- Atomic: of the nodes asking, one takes it. KEYS[12] the action record, ARGV[7] the gone node's
-- id, ARGV[8] the calling node's id. Returns 1 if taken over, 0 if it has its final answer or
-- another claimer (a node took it over already) or no record.
local found = redis.call('HMGET', K_ACTION, 'c', 'r', 'x', 'g')
if not found[1] or found[2] or found[3] or found[4] ~= ARGV[7] then
  return 0
end
redis.call('HSET', K_ACTION, 'g', ARGV[8])
return 1
