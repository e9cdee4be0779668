-- Take or keep a lease: KEYS[1] the lease, ARGV[1] this node's id, ARGV[2] its life (ms).
-- Returns 1 if this node holds it and did (renewed), 2 if it took it now (the key was gone:
-- it expired, or Redis lost it), 0 if another node holds it.
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
