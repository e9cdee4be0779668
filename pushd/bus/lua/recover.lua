-- Where a channel stands, with what a (re)joining subscriber needs, read atomically.
-- KEYS[1] meta hash, KEYS[2] history stream (as in publish.lua)
-- ARGV[1] since seq ('' if none)   ARGV[2] since epoch   ARGV[3] epoch, if meta must be created
-- ARGV[4] '1' to also return the stored state          ARGV[5] meta ttl (s)
-- ARGV[6] most entries to return
-- Returns {epoch, seq, state seq or false, state or false, entries newest first}: the entries
-- after the lowest of since (same epoch) and the state's seq, as many as history still has.
-- Anyone with access to Redis can write the hash: a field is used only if it is what the
-- scripts write (an integer, an epoch of letters and digits); a numbering whose epoch or seq
-- is not is started again (as if the hash were gone), a state whose seq is not is none.
local function integer(value)
  if value and string.match(value, '^%-?%d+$') then
    return tonumber(value)
  end
  return nil
end
local meta = redis.call('hmget', KEYS[1], 'e', 's')
local epoch = meta[1]
if not (epoch and string.match(epoch, '^%w+$') and #epoch <= 32
        and (not meta[2] or integer(meta[2]))) then
  epoch = ARGV[3]
  redis.call('del', KEYS[1], KEYS[2])
  redis.call('hset', KEYS[1], 'e', epoch, 's', 0)
  redis.call('expire', KEYS[1], ARGV[5])
end
local seq = integer(redis.call('hget', KEYS[1], 's')) or 0
local from = false
if ARGV[1] ~= '' and ARGV[2] == epoch then
  from = tonumber(ARGV[1])
end
local state, state_seq = false, false
if ARGV[4] == '1' then
  local got = redis.call('hmget', KEYS[1], 'st', 'ss')
  local ss = integer(got[2])
  if got[1] and ss then
    state, state_seq = got[1], ss
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
