"""The Lua scripts behind ``bus.queue`` (each runs atomically in Redis).

Guarantees: every script touches only keys passed in ``KEYS`` or built from the user
queue prefix, all under the ``{q}`` hash tag; numbers are written with 17
significant digits so that virtual times and order keys survive the round trip.
The meaning of each script is documented in ``bus.queue``.
"""

from __future__ import annotations

LIB = """
local function fmt(x) return string.format('%.17g', x) end
local function signal(key, keep)
  redis.call('LPUSH', key, '1')
  redis.call('LTRIM', key, 0, tonumber(keep) - 1)
end
local function share_of(shares, user)
  local s = redis.call('HGET', shares, user) or '1|0'
  local sep = string.find(s, '|', 1, true)
  local w = tonumber(string.sub(s, 1, sep - 1)) or 1
  if w <= 0 then w = 1 end
  return w, tonumber(string.sub(s, sep + 1)) or 0
end
"""

ENQUEUE_LUA = LIB + """
-- KEYS: 1 users, 2 user queue, 3 claims, 4 gpus, 5 signal, 6 vtime, 7 vnow, 8 user seq,
--       9 seq counter, 10 shares, 11 cost, 12 model, 13 model run s
-- ARGV: 1 user, 2 task, 3 gpus, 4 front, 5 signal keep, 6 order key, 7 model,
--       8 default run s, 9 share ('' keeps the stored one)
if redis.call('ZSCORE', KEYS[3], ARGV[2]) then return 0 end
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then return 0 end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[10], ARGV[1], ARGV[9]) end
local score = tonumber(ARGV[6])
if ARGV[4] == '1' then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if first[2] then score = math.min(score, tonumber(first[2]) - 1) end
end
redis.call('ZADD', KEYS[2], fmt(score), ARGV[2])
local gpus = tonumber(ARGV[3])
local run_s = tonumber(redis.call('HGET', KEYS[13], ARGV[7]) or ARGV[8])
redis.call('HSET', KEYS[4], ARGV[2], gpus)
redis.call('HSET', KEYS[11], ARGV[2], fmt(gpus * run_s))
redis.call('HSET', KEYS[12], ARGV[2], ARGV[7])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local vt = tonumber(redis.call('HGET', KEYS[6], ARGV[1]) or '0')
  local vnow = tonumber(redis.call('GET', KEYS[7]) or '0')
  if vnow > vt then vt = vnow end
  redis.call('HSET', KEYS[6], ARGV[1], fmt(vt))
  redis.call('ZADD', KEYS[1], fmt(vt), ARGV[1])
  redis.call('HSET', KEYS[8], ARGV[1], redis.call('INCR', KEYS[9]))
end
signal(KEYS[5], ARGV[5])
return 1
"""

REMOVE_LUA = """
-- KEYS: 1 users, 2 user queue, 3 gpus, 4 cost, 5 model; ARGV: 1 user, 2 task
local n = redis.call('ZREM', KEYS[2], ARGV[2])
if n > 0 then
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('HDEL', KEYS[4], ARGV[2])
  redis.call('HDEL', KEYS[5], ARGV[2])
end
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
return n
"""

POSITIONS_LUA = LIB + """
-- KEYS: 1 users, 2 user seq, 3 shares, 4 cost; ARGV: 1 user queue prefix, then task ids
local want, nwant = {}, 0
for j = 2, #ARGV do
  if not want[ARGV[j]] then want[ARGV[j]] = -1; nwant = nwant + 1 end
end
local users = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local heap = {}
local function less(a, b)
  if a.vt ~= b.vt then return a.vt < b.vt end
  return a.seq < b.seq
end
local function push(e)
  heap[#heap + 1] = e
  local i = #heap
  while i > 1 do
    local p = math.floor(i / 2)
    if less(heap[i], heap[p]) then heap[i], heap[p] = heap[p], heap[i]; i = p else break end
  end
end
local function pop()
  local top = heap[1]
  heap[1] = heap[#heap]
  heap[#heap] = nil
  local i = 1
  while true do
    local l, r, m = 2 * i, 2 * i + 1, i
    if l <= #heap and less(heap[l], heap[m]) then m = l end
    if r <= #heap and less(heap[r], heap[m]) then m = r end
    if m == i then break end
    heap[i], heap[m] = heap[m], heap[i]
    i = m
  end
  return top
end
for i = 1, #users, 2 do
  local u = users[i]
  local tasks = redis.call('ZRANGE', ARGV[1] .. u, 0, -1)
  if #tasks > 0 then
    local w = share_of(KEYS[3], u)
    push({vt = tonumber(users[i + 1]), seq = tonumber(redis.call('HGET', KEYS[2], u) or '0'),
          tasks = tasks, idx = 1, w = w})
  end
end
local pos, found = 0, 0
while #heap > 0 and found < nwant do
  local e = pop()
  local t = e.tasks[e.idx]
  pos = pos + 1
  if want[t] == -1 then want[t] = pos; found = found + 1 end
  e.idx = e.idx + 1
  if e.idx <= #e.tasks then
    e.vt = e.vt + tonumber(redis.call('HGET', KEYS[4], t) or '0') / e.w
    push(e)
  end
end
local out = {}
for j = 2, #ARGV do out[#out + 1] = want[ARGV[j]] end
return out
"""

CLAIM_LUA = LIB + """
-- KEYS: 1 users, 2 leases, 3 user running, 4 lease info, 5 claims, 6 claim owner, 7 gpus,
--       8 vtime, 9 vnow, 10 user seq, 11 shares, 12 cost, 13 model, 14 user gpus
-- ARGV: 1 capacity, 2 per-user job cap, 3 lease expiry ms, 4 dispatcher id,
--       5 user queue prefix, 6 now ms
local users = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
if #users == 0 then return {'empty'} end
local used = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(v) end
local cands = {}
for i = 1, #users, 2 do
  cands[#cands + 1] = {users[i], tonumber(users[i + 1]),
                       tonumber(redis.call('HGET', KEYS[10], users[i]) or '0')}
end
table.sort(cands, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[3] < b[3]
end)
local capped = 0
for _, c in ipairs(cands) do
  local user = c[1]
  local qkey = ARGV[5] .. user
  local task = redis.call('ZRANGE', qkey, 0, 0)[1]
  if not task then
    redis.call('ZREM', KEYS[1], user)
  else
    local gpus = tonumber(redis.call('HGET', KEYS[7], task) or '1')
    local running = tonumber(redis.call('HGET', KEYS[3], user) or '0')
    local held = tonumber(redis.call('HGET', KEYS[14], user) or '0')
    local weight, gpu_cap = share_of(KEYS[11], user)
    if running >= tonumber(ARGV[2]) or (gpu_cap > 0 and held + gpus > gpu_cap) then
      capped = capped + 1
    else
      if used + gpus > tonumber(ARGV[1]) then return {'full', task} end
      local cost = tonumber(redis.call('HGET', KEYS[12], task) or '0')
      local model = redis.call('HGET', KEYS[13], task) or ''
      redis.call('ZREM', qkey, task)
      redis.call('HDEL', KEYS[12], task)
      redis.call('HDEL', KEYS[13], task)
      local vt = c[2]
      if vt > tonumber(redis.call('GET', KEYS[9]) or '0') then
        redis.call('SET', KEYS[9], fmt(vt))
      end
      local nvt = vt + cost / weight
      redis.call('HSET', KEYS[8], user, fmt(nvt))
      if redis.call('ZCARD', qkey) > 0 then redis.call('ZADD', KEYS[1], fmt(nvt), user)
      else redis.call('ZREM', KEYS[1], user) end
      redis.call('HSET', KEYS[2], task, gpus)
      redis.call('HSET', KEYS[4], task,
                 user .. '|' .. gpus .. '|' .. fmt(cost) .. '|' .. ARGV[6] .. '|' .. model)
      redis.call('HINCRBY', KEYS[3], user, 1)
      redis.call('HINCRBY', KEYS[14], user, gpus)
      redis.call('ZADD', KEYS[5], ARGV[3], task)
      redis.call('HSET', KEYS[6], task, ARGV[4] .. '|' .. user)
      return {'claimed', task, user, tostring(gpus), model}
    end
  end
end
if capped > 0 then return {'capped'} end
return {'empty'}
"""

RELEASE_LUA = LIB + """
-- KEYS: 1 leases, 2 user running, 3 lease info, 4 signal, 5 user gpus, 6 vtime, 7 users,
--       8 shares, 9 model run s
-- ARGV: 1 task, 2 signal keep, 3 now ms, 4 completed ('1'/'0'), 5 run-time alpha
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
local info = redis.call('HGET', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if info then
  local f = {}
  for part in string.gmatch(info .. '|', '([^|]*)|') do f[#f + 1] = part end
  local user, gpus, cost, start, model = f[1], tonumber(f[2]), tonumber(f[3]), tonumber(f[4]), f[5]
  if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then redis.call('HDEL', KEYS[2], user) end
  if redis.call('HINCRBY', KEYS[5], user, -gpus) <= 0 then redis.call('HDEL', KEYS[5], user) end
  local held_s = math.max(0, (tonumber(ARGV[3]) - start) / 1000)
  local weight = share_of(KEYS[8], user)
  local vt = tonumber(redis.call('HGET', KEYS[6], user) or '0') + (gpus * held_s - cost) / weight
  redis.call('HSET', KEYS[6], user, fmt(vt))
  if redis.call('ZSCORE', KEYS[7], user) then redis.call('ZADD', KEYS[7], fmt(vt), user) end
  if ARGV[4] == '1' and model ~= '' then
    local old = tonumber(redis.call('HGET', KEYS[9], model) or '')
    local a = tonumber(ARGV[5])
    local avg = held_s
    if old then avg = a * held_s + (1 - a) * old end
    redis.call('HSET', KEYS[9], model, fmt(avg))
  end
end
signal(KEYS[4], ARGV[2])
return 1
"""

ACK_LUA = """
-- KEYS: 1 claims, 2 claim owner, 3 gpus; ARGV: 1 task
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

PROMOTE_LUA = """
-- KEYS: 1 delayed, 2 delayed users; ARGV: 1 now ms
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
local out = {}
for _, task in ipairs(due) do
  local user = redis.call('HGET', KEYS[2], task)
  redis.call('ZREM', KEYS[1], task)
  redis.call('HDEL', KEYS[2], task)
  if user then out[#out + 1] = task; out[#out + 1] = user end
end
return out
"""
