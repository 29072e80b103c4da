-- refresh: heartbeat of this node's live connections of the party (Backend.refresh); a forgotten
-- connection is re-added, as core/presence.py does. ARGV[7] presence_ttl (seconds), ARGV[8..]
-- presence entries. Returns the next presence expiry.
local expires = fmt_time(NOW + tonumber(ARGV[7]))
for i = 8, #ARGV do
  redis.call('ZADD', K_PRESENCE, expires, ARGV[i])
end
touch()
return next_expiry()
