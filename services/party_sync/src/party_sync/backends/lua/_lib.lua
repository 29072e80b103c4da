-- Shared prelude of every party script (redis_scripts.py prepends it to each script body).
--
-- KEYS[1..11] are the party's keys in keys.PartyKeys order; KEYS[12] is an action record when
-- a script needs one, or the party's narration hash (narrate, close_narration, snapshot). A script
-- that names its keys only through the K_ locals below is given only those it names, in that order,
-- and this header is rewritten to match (redis_scripts.key_layout: e.g. begin_action's K_LOCKS,
-- K_ACTION = KEYS[1], KEYS[2]). ARGV[1..6] is the common header (redis_scripts.header):
--   1 epoch candidate (used only if the party has no history yet)   2 the party's channel
--   3 party_ttl in ms   4 history bounds   5 now (Unix seconds)   6 action_record_ttl in ms
-- ARGV[4] is "<size>" or "<size>:<max bytes>:<max age ms>" (0 = no bound; core/history.py).
-- Everything one operation reads and writes is in one slot and one script, so it is atomic
-- across nodes (docs/redis.md: one script allocates the next seq, appends, publishes).

local K_META, K_HISTORY, K_MEMBERS, K_NAMES, K_ONLINE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_STATE, K_PRESENCE, K_GONE, K_LOCKS = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local K_VOTE, K_BALLOTS, K_ACTION = KEYS[10], KEYS[11], KEYS[12]
local EPOCH_CANDIDATE, CHANNEL = ARGV[1], ARGV[2]
-- PARTY_TTL, RECORD_TTL: milliseconds as the node sent them (integers), what PEXPIRE takes: a
-- number given to redis.call is formatted by a printf ('%.17g') on every call. NOW_TEXT: now as the
-- node sent it, which is fmt_time(NOW) (the node formats it '%.6f'), so a script writes the time it
-- runs at without formatting a float again.
local PARTY_TTL, RECORD_TTL = ARGV[3], ARGV[6]
local NOW, NOW_TEXT = tonumber(ARGV[5]), ARGV[5]

-- What this header holds is made on every call of every script (a script is run from its first
-- line each time), so what only some scripts need is below, as definitions that prelude_for
-- (redis_scripts.py) gives only to the scripts that use them.

local function fmt_time(t)
  return string.format('%.6f', t)
end

-- The same as numbers, for arithmetic.
local PARTY_TTL_MS = tonumber(PARTY_TTL)
local RECORD_TTL_MS = tonumber(RECORD_TTL)

-- ARGV[4], the history bounds, for the scripts that hold events (hold_many).
local HISTORY_SIZE, HISTORY_BYTES, HISTORY_AGE_MS = string.match(ARGV[4], '^(%d+):(%d+):(%d+)$')
if HISTORY_SIZE then
  HISTORY_SIZE, HISTORY_BYTES = tonumber(HISTORY_SIZE), tonumber(HISTORY_BYTES)
  HISTORY_AGE_MS = tonumber(HISTORY_AGE_MS)
else  -- a plain count (what earlier versions send)
  HISTORY_SIZE, HISTORY_BYTES, HISTORY_AGE_MS = tonumber(ARGV[4]), 0, 0
end

-- Every party key but the action records lives party_ttl after the last activity (give or take
-- TOUCH_SLACK, below). touch() refreshes all eleven.
local function touch()
  for i = 1, 11 do
    redis.call('PEXPIRE', KEYS[i], PARTY_TTL)
  end
end

-- Refreshing all eleven on every event was half of an action's Redis commands (docs/benchmarks.md),
-- so an event does the full touch() only once META's expiry has run down by TOUCH_SLACK, i.e. at
-- most once per TOUCH_SLACK of activity. Otherwise it gives the keys it wrote (a key it re-created
-- has no expiry yet) META's own remaining time: every key of the party still expires with META,
-- together, between party_ttl minus TOUCH_SLACK and party_ttl after the last activity, and a
-- party without META starts a new history (ensure_epoch deletes the stale keys). A key that
-- existed before the write needs nothing: it already expires when META does (it was given META's
-- time, or party_ttl with META in touch()), and a write keeps a key's expiry; so callers list only
-- the keys a write may have created (fold() tells which).
local TOUCH_SLACK_MS = math.min(60000, math.floor(PARTY_TTL_MS / 10))
local function touch_written(written, also)
  local left = redis.call('PTTL', K_META)
  if left < PARTY_TTL_MS - TOUCH_SLACK_MS then  -- also: no expiry (-1)
    touch()
    return
  end
  if #written + #also == 0 then
    return
  end
  left = string.format('%d', left)  -- once, not by each redis.call (see PARTY_TTL)
  for _, key in ipairs(written) do
    redis.call('PEXPIRE', key, left)
  end
  for _, key in ipairs(also) do
    redis.call('PEXPIRE', key, left)
  end
end

-- The current epoch; a party without one (new, flushed, restarted, expired) starts a new history
-- from nothing, so no client ever trusts a seq of the lost one. Returns the epoch, and true when
-- it created META (with no expiry: the caller's touch() or append() gives it one).
local function ensure_epoch()
  local epoch = redis.call('HGET', K_META, 'epoch')
  if epoch then
    return epoch, false
  end
  redis.call('DEL', K_HISTORY, K_MEMBERS, K_NAMES, K_ONLINE, K_STATE, K_VOTE, K_BALLOTS)
  redis.call('HSET', K_META, 'epoch', EPOCH_CANDIDATE, 'seq', 0)
  return EPOCH_CANDIDATE, true
end

-- ensure_epoch for a script that publishes nothing (head, snapshot), on a party it may be the
-- first to see (a handshake that subscribed, then failed before connect.lua): a META it creates
-- is given the party's expiry, else it would never expire. Set just under touch_written's
-- threshold (party_ttl - TOUCH_SLACK), so that the party's first event still does the full
-- touch() and the history that event creates expires with META too. No write for a known party.
local function ensure_epoch_expiring()
  local epoch, created = ensure_epoch()
  if created then
    redis.call('PEXPIRE', K_META, math.max(1, PARTY_TTL_MS - TOUCH_SLACK_MS - 1))
  end
  return epoch
end

-- Presence entries are "<connection_id>:<character_id>" (connection ids are hex: no ':').
local function character_of(entry)
  return string.sub(entry, string.find(entry, ':', 1, true) + 1)
end

-- Characters with at least one live (unexpired) connection, as a set.
local function live_characters()
  local live = {}
  local entries = redis.call('ZRANGEBYSCORE', K_PRESENCE, '(' .. NOW_TEXT, '+inf')
  for _, entry in ipairs(entries) do
    live[character_of(entry)] = true
  end
  return live
end

-- When the presence sweep must next look at this party (for the presence index): the earliest
-- connection expiry or settle deadline; '' when there is neither.
local function next_expiry()
  local best = nil
  local first = redis.call('ZRANGE', K_PRESENCE, 0, 0, 'WITHSCORES')
  if first[2] then
    best = tonumber(first[2])
  end
  for _, deadline in ipairs(redis.call('HVALS', K_GONE)) do
    local d = tonumber(deadline)
    if not best or d < best then
      best = d
    end
  end
  if best then
    return fmt_time(best)
  end
  return ''
end

-- A character's action lock is "<until> <action_id> <action_type>" (written by begin_action.lua;
-- a lock without its type, from an earlier version, is "<until> <action_id>").
local function parse_lock(lock)
  local space = string.find(lock, ' ', 1, true)
  local rest = string.sub(lock, space + 1)
  local second = string.find(rest, ' ', 1, true)
  if second then
    return tonumber(string.sub(lock, 1, space - 1)), string.sub(rest, 1, second - 1),
      string.sub(rest, second + 1)
  end
  return tonumber(string.sub(lock, 1, space - 1)), rest, 'choice'
end

local function read_lock(character_id)
  local lock = redis.call('HGET', K_LOCKS, character_id)
  if not lock then
    return nil, nil
  end
  local until_, holder = parse_lock(lock)
  return until_, holder
end

-- Messages for every member outside the sequenced stream (core/transient.py): one PUBLISH of
-- their envelopes, joined by commas, on the party's channel.
local function publish_transient(frames)
  redis.call('PUBLISH', CHANNEL, '{"transient":[' .. frames .. ']}')
end

-- action.failed for an action whose final answer became the refusal (a system.error envelope):
-- its code and trace_id are told. Ids match [A-Za-z0-9._:-] (nothing to escape); the timestamp
-- is formatted by the node.
local function publish_failed(action_id, character_id, refusal, timestamp)
  local ok, message = pcall(cjson.decode, refusal)
  if not ok or type(message) ~= 'table' or type(message.payload) ~= 'table' then
    return
  end
  local code, trace = message.payload.code, message.trace_id
  if type(code) ~= 'string' or type(trace) ~= 'string' then
    return
  end
  publish_transient('{"type":"action.failed","timestamp":"' .. timestamp .. '","trace_id":'
    .. cjson.encode(trace) .. ',"payload":{"action_id":"' .. action_id .. '","character_id":"'
    .. character_id .. '","code":' .. cjson.encode(code) .. '}}')
end

local function release_lock(character_id, action_id)
  local _, holder = read_lock(character_id)
  if holder == action_id then
    redis.call('HDEL', K_LOCKS, character_id)
  end
end

-- An action still in flight without holding its character (an engine started it and works on
-- past its deadline, or it has none: a vote's choice) is listed by snapshot.lua until its final
-- answer: "~<action_id>" → "<the deadline it was given> <character_id> <action_type> <expires>"
-- in the locks hash (core/actions.py ActionLedger._outliving); expires with the action's record.
local function outlive(action_id, deadline, character_id, action_type, began)
  redis.call('HSET', K_LOCKS, '~' .. action_id, deadline .. ' ' .. character_id .. ' ' .. action_type
    .. ' ' .. fmt_time(began + RECORD_TTL_MS / 1000))
end

local function answered(action_id)
  redis.call('HDEL', K_LOCKS, '~' .. action_id)
end

-- Fold one event into the projection: the rules of core/projection.py, field for field.
-- f holds the fold arguments prepared by redis_scripts.fold_args. Returns true when the keys it
-- wrote existed before (a field it set was there already), so they keep their expiry
-- (touch_written); else nothing.
local function fold(seq, kind, f)
  if kind == 'party.join' then
    redis.call('ZADD', K_MEMBERS, 'NX', seq, f[1])
    redis.call('HSET', K_NAMES, f[1], f[2])
    redis.call('SADD', K_ONLINE, f[1])
  elseif kind == 'party.leave' then
    redis.call('SREM', K_ONLINE, f[1])
    if f[2] == 'left' then
      redis.call('ZREM', K_MEMBERS, f[1])
      redis.call('HDEL', K_NAMES, f[1])
    end
  elseif kind == 'scene.update' then
    return redis.call('HSET', K_STATE, 'scene', f[1]) == 0
  elseif kind == 'combat.update' then
    return redis.call('HSET', K_STATE, 'combat', f[1]) == 0
  elseif kind == 'party.state' then
    return redis.call('HSET', K_STATE, 'party_state', f[1]) == 0
  elseif kind == 'vote.started' then
    redis.call('HSET', K_STATE, 'vote_id', f[1], 'vote', f[2], 'vote_tallies', f[3],
      'vote_voted', 0, 'vote_eligible', redis.call('SCARD', K_ONLINE))
  elseif kind == 'vote.update' then
    if redis.call('HGET', K_STATE, 'vote_id') == f[1] then
      redis.call('HSET', K_STATE, 'vote_tallies', f[2], 'vote_voted', f[3], 'vote_eligible', f[4])
    end
  elseif kind == 'vote.finished' then
    if redis.call('HGET', K_STATE, 'vote_id') == f[1] then
      redis.call('HDEL', K_STATE, 'vote_id', 'vote', 'vote_tallies', 'vote_voted', 'vote_eligible')
    end
  end
end

-- The keys an event of this kind may have (re-)created: what fold() (or, for votes, the
-- transaction of redis_votes.py around it) writes. Not the history: it is created only with a
-- new META (ensure_epoch), which makes that event do the full touch, and never emptied after.
local NOTHING = {}
local function written_by(kind)
  if kind == 'party.join' or kind == 'party.leave' then
    return {K_MEMBERS, K_NAMES, K_ONLINE}
  elseif kind == 'scene.update' or kind == 'combat.update' or kind == 'party.state' then
    return {K_STATE}
  elseif kind == 'vote.started' or kind == 'vote.update' or kind == 'vote.finished' then
    return {K_STATE, K_VOTE, K_BALLOTS}
  end
  return NOTHING
end

-- A history entry is the event's encoded JSON. With a bytes or an age bound it is prefixed by
-- "<stamp ms> <offset> " (offset: the bytes of the epoch's events recorded before it, counted in
-- META's 'hb'), so trimming learns an entry's age and the bytes held from it to the newest by
-- reading that entry alone. Readers take the JSON from its first '{' (event_of); an entry
-- without the prefix (written by an earlier version, or with neither bound) is the JSON itself.
local function event_of(entry)
  if string.byte(entry, 1) == 123 then  -- '{'
    return entry
  end
  return string.sub(entry, (string.find(entry, '{', 1, true)))
end

-- Append events (their encoded JSON, oldest first) to the history and drop the oldest while more
-- than HISTORY_SIZE are held or the oldest does not fit: the bytes from it to the newest exceed
-- HISTORY_BYTES, or it is older than HISTORY_AGE_MS (an entry without a stamp fits neither).
-- Never the newest. The rule of core/history.py to_drop, in the same milliseconds. Several events
-- are appended with one RPUSH and trimmed once: the same history as one call per event, since
-- every condition only grows with what is appended after an entry (its count, its bytes to the
-- newest; its age is NOW's). Common path: 2 calls more than the count alone (HINCRBY, one
-- LRANGE of the first 2 candidates); each further LRANGE doubles its window.
local function hold_many(datas)
  if HISTORY_BYTES == 0 and HISTORY_AGE_MS == 0 then
    if redis.call('RPUSH', K_HISTORY, unpack(datas)) > HISTORY_SIZE then
      redis.call('LTRIM', K_HISTORY, -HISTORY_SIZE, -1)
    end
    return
  end
  local now_ms = math.floor(NOW * 1000)
  local added = 0
  for _, data in ipairs(datas) do
    added = added + #data
  end
  local total = redis.call('HINCRBY', K_META, 'hb', added)
  local entries, offset = {}, total - added
  for i, data in ipairs(datas) do
    entries[i] = string.format('%d %d %s', now_ms, offset, data)  -- integers: no float printf
    offset = offset + #data
  end
  local n = redis.call('RPUSH', K_HISTORY, unpack(entries))
  local at, window = math.max(0, n - HISTORY_SIZE), 2
  while at < n - 1 do
    local fits = false
    local last = math.min(at + window, n - 1) - 1  -- the newest (n - 1) is not a candidate
    for _, entry in ipairs(redis.call('LRANGE', K_HISTORY, at, last)) do
      local stamp, offset_of = string.match(entry, '^(%d+) (%d+) ')
      fits = stamp ~= nil
        and (HISTORY_BYTES == 0 or total - tonumber(offset_of) <= HISTORY_BYTES)
        and (HISTORY_AGE_MS == 0 or now_ms - tonumber(stamp) <= HISTORY_AGE_MS)
      if fits then
        break
      end
      at = at + 1
    end
    if fits then
      break
    end
    window = window * 2
  end
  if at > 0 then
    redis.call('LTRIM', K_HISTORY, at, -1)
  end
end

-- Number one event: next seq, spliced into the body (as codec.with_seq does), folded into the
-- projection. Returns seq, data, and fold()'s answer (true: the keys it wrote had an expiry). The
-- caller holds it (hold_many), gives the keys it wrote their expiry (touch_written) and publishes
-- it, in that order, in the same script (append, below, or publish_many.lua for several events).
local function sequence(body, kind, f)
  local seq = redis.call('HINCRBY', K_META, 'seq', '1')
  -- one new string (a substring then a concatenation would make, and hash, two of the body's size)
  local data = string.gsub(body, '^{', string.format('{"seq":%d,', seq), 1)
  return seq, data, fold(seq, kind, f)
end

-- Sequence one event: numbered and folded (sequence), appended to the bounded history, its keys'
-- expiry given, and published, all in this one atomic step, so pub/sub order is seq order and
-- history never lacks a published event. ``also`` (optional): other party keys the calling script
-- wrote, for their expiry. Returns seq, data.
local function append(epoch, body, kind, f, also)
  local seq, data, kept = sequence(body, kind, f)
  hold_many({data})
  touch_written(kept and NOTHING or written_by(kind), also or NOTHING)
  redis.call('PUBLISH', CHANNEL, '{"epoch":"' .. epoch .. '","event":' .. data .. '}')
  return seq, data
end

-- True when Redis runs this call more than `allowed` seconds after `sent` (both on Redis's clock:
-- the node adds the offset it measured): Redis was stalled and the node has given up on it.
local function too_late(sent, allowed)
  local clock = redis.call('TIME')
  return tonumber(clock[1]) + tonumber(clock[2]) / 1000000 > tonumber(sent) + tonumber(allowed)
end

-- The party's narration hash (narrate.lua describes it), forgotten when nothing was written to it
-- for its keep time (core/transient.py kept_for): checked against NOW (the hash's PEXPIRE, set to
-- the same time, is the backstop that frees the memory). A script that uses it calls this first.
local function narration_fresh(key, kept_ms)
  local written = redis.call('HGET', key, 'w')
  if written and tonumber(written) + kept_ms / 1000 <= NOW then
    redis.call('DEL', key)
  end
end

-- Note a write of the narration hash at NOW, never moving its time back: a call a little late, or
-- from a node whose clock is behind, would otherwise make the next one forget the hash.
local function narration_written(key, kept_ms)
  local written = redis.call('HGET', key, 'w')
  if not written or tonumber(written) < NOW then
    redis.call('HSET', key, 'w', NOW_TEXT)
  end
  redis.call('PEXPIRE', key, kept_ms)
end
