-- Messages onto one channel, atomically: number them, keep them, publish them together.
-- KEYS[1] the channel's meta hash {e = epoch, s = last seq, st = state, ss = seq of state}
-- KEYS[2] the channel's history stream (entries {s = seq, d = data})
-- KEYS[3] the channel's archive: the last ARGV[8] closed candles (kline channels)
-- ARGV[1] pub/sub channel      ARGV[2] epoch, if the meta hash must be created
-- ARGV[3] history size (0: none)                       ARGV[4] history age (ms)
-- ARGV[5] meta ttl (s)         ARGV[6] 'publish' or 'spublish'
-- ARGV[7] '1' if each message is the stream's whole state     ARGV[8] archive size
-- ARGV[9], ARGV[10], ARGV[11], ...: for each message its data (JSON), the state after it
-- ('' if none) and '1' if it goes to the archive
-- Returns {epoch, seq of the first}. Published: ["<epoch>",<seq of the first>,[<data>,...]].
local meta = redis.call('hmget', KEYS[1], 'e', 's')
local epoch = meta[1]
-- anyone with access to Redis can write the hash: an epoch or a seq this script would not
-- have written (not letters and digits, not an integer) is a numbering started again
if not (epoch and string.match(epoch, '^%w+$') and #epoch <= 32
        and (not meta[2] or string.match(meta[2], '^%-?%d+$'))) then
  -- a new numbering: whatever history and state are left belong to a numbering that is gone
  epoch = ARGV[2]
  redis.call('del', KEYS[1], KEYS[2])
  redis.call('hset', KEYS[1], 'e', epoch)
end
local count = (#ARGV - 8) / 3
local last = redis.call('hincrby', KEYS[1], 's', count)
local first = last - count + 1
local size = tonumber(ARGV[3])
local whole = ARGV[7] == '1'
local state, state_seq = '', 0
local data = {}
local archived = false
for i = 1, count do
  local message = ARGV[6 + 3 * i]
  local after = ARGV[7 + 3 * i]
  local seq = first + i - 1
  if ARGV[8 + 3 * i] == '1' then
    redis.call('rpush', KEYS[3], message)
    archived = true
  end
  data[i] = message
  if size > 0 then
    redis.call('xadd', KEYS[2], 'MAXLEN', '~', size, '*', 's', seq, 'd', message)
  end
  if whole then
    state, state_seq = message, seq
  elseif after ~= '' then
    state, state_seq = after, seq
  end
end
if size > 0 then
  local now = redis.call('time')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('xtrim', KEYS[2], 'MINID', '~', now_ms - tonumber(ARGV[4]))
  redis.call('pexpire', KEYS[2], ARGV[4])
end
if state ~= '' then
  redis.call('hset', KEYS[1], 'st', state, 'ss', state_seq)
end
if archived then
  redis.call('ltrim', KEYS[3], -tonumber(ARGV[8]), -1)
  redis.call('expire', KEYS[3], ARGV[5])
end
redis.call('expire', KEYS[1], ARGV[5])
redis.call(ARGV[6], ARGV[1], '["' .. epoch .. '",' .. first .. ',[' .. table.concat(data, ',') .. ']]')
return {epoch, first}
