-- abandon_action: ActionLedger.abandon: forget an unfinished action so a retry may run; a finished
-- one is kept (it ran: a resend gets its result). KEYS[12] the action record, ARGV[7] action_id.
local record = K_ACTION
local found = redis.call('HMGET', record, 'c', 'r')
if found[1] and not found[2] then
  redis.call('DEL', record)
  release_lock(found[1], ARGV[7])
end
return 0
