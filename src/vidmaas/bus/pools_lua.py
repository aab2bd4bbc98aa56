"""The Lua scripts behind ``bus.pools`` (each runs atomically in Redis).

Guarantees: every script touches only keys passed in ``KEYS`` or built from a prefix
passed in ``ARGV`` (a model's idle set); a worker record is one ``|``-joined string
(model, GPUs, state, since ms, task, attempt, tasks done), read and written by ``rec``
and ``put`` only.
"""

from __future__ import annotations

LIB = """
local function rec(workers, w)
  local raw = redis.call('HGET', workers, w)
  if not raw then return nil end
  local f = {}
  for part in string.gmatch(raw .. '|', '([^|]*)|') do f[#f + 1] = part end
  return f
end
local function put(workers, w, f) redis.call('HSET', workers, w, table.concat(f, '|')) end
local function signal(key, keep)
  redis.call('LPUSH', key, '1')
  redis.call('LTRIM', key, 0, tonumber(keep) - 1)
end
"""

RESERVE_LUA = LIB + """
-- KEYS: 1 leases, 2 workers, 3 alive; ARGV: 1 worker, 2 model, 3 gpus, 4 capacity,
--       5 now ms, 6 lease expiry ms, 7 lease member
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local used = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do used = used + tonumber(v) end
if used + tonumber(ARGV[3]) > tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[7], ARGV[3])
put(KEYS[2], ARGV[1], {ARGV[2], ARGV[3], 'starting', ARGV[5], '', '', '0'})
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return 1
"""

HEARTBEAT_LUA = LIB + """
-- KEYS: 1 workers, 2 alive, 3 leases, 4 epoch, 5 idle prefix, 6 signal
-- ARGV: 1 worker, 2 lease expiry ms, 3 lease member, 4 now ms, 5 keep, then what the
--       worker knows of itself: 6 model, 7 gpus, 8 state, 9 task, 10 attempt, 11 done
local f = rec(KEYS[1], ARGV[1])
if not f then
  if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then  -- Redis lost its data, and a
    -- dispatcher gave this live worker its GPUs back: register again (GPUs too) as it is
    redis.call('HSET', KEYS[3], ARGV[3], ARGV[7])
    put(KEYS[1], ARGV[1], {ARGV[6], ARGV[7], ARGV[8], ARGV[4], ARGV[9], ARGV[10], ARGV[11]})
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
    if ARGV[8] == 'idle' then redis.call('ZADD', KEYS[5] .. ARGV[6], ARGV[4], ARGV[1]) end
    signal(KEYS[6], ARGV[5])
    return ARGV[8]
  end
  if redis.call('GET', KEYS[4]) ~=
      string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') then
    return '?'  -- Redis lost its data and no dispatcher has rebuilt it yet: wait
  end
  return ''  -- retired
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return f[3]
"""

READY_LUA = LIB + """
-- KEYS: 1 workers, 2 idle prefix, 3 signal, 4 alive; ARGV: 1 worker, 2 now ms, 3 keep,
--       4 lease expiry ms, 5 finished a task ('1'/'0')
local f = rec(KEYS[1], ARGV[1])
if not f or f[3] == 'draining' then return 0 end
local done = tonumber(f[7]) or 0
if ARGV[5] == '1' then done = done + 1 end
put(KEYS[1], ARGV[1], {f[1], f[2], 'idle', ARGV[2], '', '', tostring(done)})
redis.call('ZADD', KEYS[2] .. f[1], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
signal(KEYS[3], ARGV[3])
return 1
"""

ASSIGN_LUA = LIB + """
-- KEYS: 1 workers, 2 fence, 3 inbox; ARGV: 1 worker, 2 task, 3 attempt, 4 payload,
--       5 fence ttl s
local f = rec(KEYS[1], ARGV[1])
if not f or f[3] ~= 'busy' or f[5] ~= ARGV[2] then return 0 end
if redis.call('GET', KEYS[2]) == ARGV[1] .. '|' .. ARGV[3] then return 1 end  -- already sent
f[6] = ARGV[3]
put(KEYS[1], ARGV[1], f)
redis.call('SET', KEYS[2], ARGV[1] .. '|' .. ARGV[3], 'EX', ARGV[5])
redis.call('RPUSH', KEYS[3], ARGV[4])
return 1
"""

UNCLAIM_LUA = LIB + """
-- KEYS: 1 workers, 2 idle prefix, 3 signal; ARGV: 1 worker, 2 task, 3 now ms, 4 keep
-- A worker marked busy by a claim whose assignment was never sent goes back to idle.
local f = rec(KEYS[1], ARGV[1])
if not f or f[3] ~= 'busy' or f[5] ~= ARGV[2] or f[6] ~= '' then return 0 end
put(KEYS[1], ARGV[1], {f[1], f[2], 'idle', ARGV[3], '', '', f[7]})
redis.call('ZADD', KEYS[2] .. f[1], ARGV[3], ARGV[1])
signal(KEYS[3], ARGV[4])
return 1
"""

DRAIN_LUA = LIB + """
-- KEYS: 1 workers, 2 idle prefix, 3 inbox; ARGV: 1 worker, 2 now ms, 3 exit payload,
--       4 only if idle ('1'/'0')
local f = rec(KEYS[1], ARGV[1])
if not f then return 0 end
if ARGV[4] == '1' and f[3] ~= 'idle' then return 0 end
redis.call('ZREM', KEYS[2] .. f[1], ARGV[1])
if f[3] ~= 'draining' then
  f[3] = 'draining'
  f[4] = ARGV[2]
  put(KEYS[1], ARGV[1], f)
  redis.call('RPUSH', KEYS[3], ARGV[3])
end
return 1
"""

LEAVE_LUA = LIB + """
-- KEYS: 1 workers, 2 idle prefix; ARGV: 1 worker, 2 now ms, 3 finished a task ('1'/'0')
-- A worker about to exit by itself: draining, with no task, so that its retirement
-- retries nothing (the task it finished is the relay's to complete).
local f = rec(KEYS[1], ARGV[1])
if not f then return 0 end
local done = tonumber(f[7]) or 0
if ARGV[3] == '1' then done = done + 1 end
put(KEYS[1], ARGV[1], {f[1], f[2], 'draining', ARGV[2], '', '', tostring(done)})
redis.call('ZREM', KEYS[2] .. f[1], ARGV[1])
return 1
"""

RETIRE_LUA = LIB + """
-- KEYS: 1 workers, 2 alive, 3 idle prefix, 4 leases, 5 signal, 6 inbox, 7 fence of the
--       task the caller read from the record
-- ARGV: 1 worker, 2 lease member, 3 keep, 4 that task ('' for none)
local f = rec(KEYS[1], ARGV[1])
if f and f[5] ~= ARGV[4] then return {'', '', 'moved'} end  -- read again, then retry
if f and f[5] ~= '' then
  -- Fenced out at once: whatever this worker publishes for the task is dropped now.
  local v = redis.call('GET', KEYS[7])
  if v and string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
    redis.call('SET', KEYS[7], '-', 'KEEPTTL')
  end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[6])
local freed = redis.call('HDEL', KEYS[4], ARGV[2])
if not f then
  if freed > 0 then signal(KEYS[5], ARGV[3]) end
  return {}
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3] .. f[1], ARGV[1])
signal(KEYS[5], ARGV[3])
return {f[5], f[6]}
"""

FENCE_OUT_LUA = """
-- KEYS: 1 fence; ARGV: 1 its value to clear: set to '-' (a missing one was lost, restored)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], '-', 'KEEPTTL')
return 1
"""
