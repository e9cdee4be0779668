-- One message onto one channel, atomically: number it, keep it, publish it.
-- KEYS[1] the channel's meta hash {e = epoch, s = last seq, st = state, ss = seq of state}
-- KEYS[2] the channel's history stream (entries {s = seq, d = data})
-- ARGV[1] pub/sub channel      ARGV[2] data (JSON)     ARGV[3] state after it ('' if none)
-- ARGV[4] epoch, if the meta hash must be created      ARGV[5] history size (0: none)
-- ARGV[6] history age (ms)     ARGV[7] meta ttl (s)    ARGV[8] 'publish' or 'spublish'
-- ARGV[9] '1' if the data is the stream's whole state
-- Returns {epoch, seq}. The message published is ["<epoch>",<seq>,<data>].
local epoch = redis.call('hget', KEYS[1], 'e')
if not epoch then
  -- a new numbering: whatever history is left belongs to a numbering that is gone
  epoch = ARGV[4]
  redis.call('del', KEYS[2])
  redis.call('hset', KEYS[1], 'e', epoch)
end
local seq = redis.call('hincrby', KEYS[1], 's', 1)
local size = tonumber(ARGV[5])
if size > 0 then
  local now = redis.call('time')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('xadd', KEYS[2], 'MAXLEN', '~', size, '*', 's', seq, 'd', ARGV[2])
  redis.call('xtrim', KEYS[2], 'MINID', '~', now_ms - tonumber(ARGV[6]))
  redis.call('pexpire', KEYS[2], ARGV[6])
end
local state = ARGV[3]
if ARGV[9] == '1' then
  state = ARGV[2]
end
if state ~= '' then
  redis.call('hset', KEYS[1], 'st', state, 'ss', seq)
end
redis.call('expire', KEYS[1], ARGV[7])
redis.call(ARGV[8], ARGV[1], '["' .. epoch .. '",' .. seq .. ',' .. ARGV[2] .. ']')
return {epoch, seq}
