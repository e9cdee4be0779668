-- Where a channel stands, with what a (re)joining subscriber needs, read atomically.
-- KEYS[1] meta hash, KEYS[2] history stream (as in publish.lua)
-- ARGV[1] since seq ('' if none)   ARGV[2] since epoch   ARGV[3] epoch, if meta must be created
-- ARGV[4] '1' to also return the stored state          ARGV[5] meta ttl (s)
-- ARGV[6] most entries to return
-- Returns {epoch, seq, state seq or false, state or false, entries newest first}: the entries
-- after the lowest of since (same epoch) and the state's seq, as many as history still has.
local epoch = redis.call('hget', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[3]
  redis.call('del', KEYS[2])
  redis.call('hset', KEYS[1], 'e', epoch, 's', 0)
  redis.call('expire', KEYS[1], ARGV[5])
end
local seq = tonumber(redis.call('hget', KEYS[1], 's') or '0')
local from = false
if ARGV[1] ~= '' and ARGV[2] == epoch then
  from = tonumber(ARGV[1])
end
local state, state_seq = false, false
if ARGV[4] == '1' then
  local got = redis.call('hmget', KEYS[1], 'st', 'ss')
  if got[1] then
    state, state_seq = got[1], tonumber(got[2])
    if not from or state_seq < from then
      from = state_seq
    end
  end
end
local entries = {}
if from and from < seq then
  entries = redis.call('xrevrange', KEYS[2], '+', '-', 'COUNT', math.min(seq - from, tonumber(ARGV[6])))
end
return {epoch, seq, state_seq, state, entries}
