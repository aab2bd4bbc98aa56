"""The Lua scripts behind ``bus.queue`` (each runs atomically in Redis).

Guarantees: every script touches only keys passed in ``KEYS`` or built from the fair
queue prefix (``keys.USER_QUEUE_PREFIX``), all under the ``{q}`` hash tag; numbers are
written with 17 significant digits, so a stored double reads back exactly.

The virtual start of a queued task is computed in one way only, ``start()`` below:
``base + prefix / weight``, from the stored doubles. Admission (which takes the
smallest head) and positions (which count the tasks with a smaller start) therefore
agree exactly, ties included (ties go to the user who started queueing first).
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
local function ukeys(prefix, user)
  return prefix .. 'o:' .. user, prefix .. 'p:' .. user, prefix .. 'h:' .. user
end
local function start(base, prefix, w) return base + prefix / w end
-- Re-score a user in the users ZSET by the start of their head task (or drop them).
local function rescore(users, user, pkey, hkey, w)
  local head = redis.call('ZRANGE', pkey, 0, 0, 'WITHSCORES')
  if not head[1] then
    redis.call('ZREM', users, user)
    return
  end
  local base = tonumber(redis.call('HGET', hkey, 'base') or '0')
  redis.call('ZADD', users, fmt(start(base, tonumber(head[2]), w)), user)
end
-- The index of every queued task by its virtual start (prefix .. 'starts'): members are
-- the user's queueing seq, zero-padded, '|' and the task, so equal starts order by seq
-- (who started queueing first), as admission does. A position is a ZRANK in it.
local function tag(hkey)
  return string.format('%016d', tonumber(redis.call('HGET', hkey, 'seq') or '0')) .. '|'
end
local function index_tasks(prefix, pkey, hkey, w, tasks)
  local g = prefix .. 'starts'
  local base = tonumber(redis.call('HGET', hkey, 'base') or '0')
  local t0 = tag(hkey)
  for _, t in ipairs(tasks) do
    local p = redis.call('ZSCORE', pkey, t)
    if p then redis.call('ZADD', g, fmt(start(base, tonumber(p), w)), t0 .. t) end
  end
end
local function index_user(prefix, user, shares)
  local okey, pkey, hkey = ukeys(prefix, user)
  index_tasks(prefix, pkey, hkey, (share_of(shares, user)), redis.call('ZRANGE', okey, 0, -1))
end
-- A Redis written by a version without the index: build it from the queues, once.
local function ensure_index(users, shares, prefix)
  if redis.call('EXISTS', prefix .. 'starts') == 1 then return end
  for _, u in ipairs(redis.call('ZRANGE', users, 0, -1)) do index_user(prefix, u, shares) end
end
-- A user's queue emptied: remember their virtual time, forget the per-user state.
local function retire(users, vtime, user, okey, pkey, hkey, w)
  local base = tonumber(redis.call('HGET', hkey, 'base') or '0')
  local nxt = tonumber(redis.call('HGET', hkey, 'next') or '0')
  redis.call('HSET', vtime, user, fmt(start(base, nxt, w)))
  redis.call('ZREM', users, user)
  redis.call('DEL', okey, pkey, hkey)
end
"""

ENQUEUE_BODY = """
-- KEYS: 1 users, 2 claims, 3 gpus, 4 signal, 5 vtime, 6 vnow, 7 seq counter, 8 shares,
--       9 cost, 10 model, 11 model run s, 12 model queued
-- ARGV: 1 user, 2 task, 3 gpus, 4 front, 5 signal keep, 6 order key at time 0 (added
--       to Redis's own clock: tasks order as the script runs them), 7 model,
--       8 default run s, 9 share ('' keeps the stored one), 10 fair prefix
local user, task = ARGV[1], ARGV[2]
local okey, pkey, hkey = ukeys(ARGV[10], user)
if redis.call('ZSCORE', KEYS[2], task) then return 0 end
if redis.call('ZSCORE', okey, task) then return 0 end
ensure_index(KEYS[1], KEYS[8], ARGV[10])
local old_w = share_of(KEYS[8], user)
if ARGV[9] ~= '' then redis.call('HSET', KEYS[8], user, ARGV[9]) end
local w = share_of(KEYS[8], user)
local gpus = tonumber(ARGV[3])
local run_s = tonumber(redis.call('HGET', KEYS[11], ARGV[7]) or ARGV[8])
if run_s < 0.001 then run_s = 0.001 end
local cost = gpus * run_s
redis.call('HSET', KEYS[3], task, gpus)
redis.call('HSET', KEYS[9], task, fmt(cost))
redis.call('HSET', KEYS[10], task, ARGV[7])
redis.call('HINCRBY', KEYS[12], ARGV[7], 1)
if not redis.call('ZSCORE', KEYS[1], user) then
  local vt = tonumber(redis.call('HGET', KEYS[5], user) or '0')
  local vnow = tonumber(redis.call('GET', KEYS[6]) or '0')
  if vnow > vt then vt = vnow end
  redis.call('DEL', okey, pkey, hkey)
  redis.call('HSET', hkey, 'base', fmt(vt), 'next', '0', 'seq', redis.call('INCR', KEYS[7]))
end
local now = redis.call('TIME')
local key = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[6])
if ARGV[4] == '1' then
  local first = redis.call('ZRANGE', okey, 0, 0, 'WITHSCORES')
  if first[2] then key = math.min(key, tonumber(first[2]) - 1) end
else
  -- Arrivals of one class within the same millisecond keep their order (equal scores
  -- would order by task id): just after the last of them.
  local last = redis.call('ZREVRANGEBYSCORE', okey, '(' .. fmt(key + 1), fmt(key),
                          'WITHSCORES', 'LIMIT', 0, 1)
  if last[2] then key = tonumber(last[2]) + 0.001 end
end
redis.call('ZADD', okey, fmt(key), task)
local rank = redis.call('ZRANK', okey, task)
local after = redis.call('ZRANGE', okey, rank + 1, -1)
local nxt = tonumber(redis.call('HGET', hkey, 'next'))
if #after == 0 then
  redis.call('ZADD', pkey, fmt(nxt), task)
else
  redis.call('ZADD', pkey, redis.call('ZSCORE', pkey, after[1]), task)
  for _, t in ipairs(after) do redis.call('ZINCRBY', pkey, fmt(cost), t) end
end
redis.call('HSET', hkey, 'next', fmt(nxt + cost))
rescore(KEYS[1], user, pkey, hkey, w)
if w ~= old_w then
  index_user(ARGV[10], user, KEYS[8])
else
  after[#after + 1] = task
  index_tasks(ARGV[10], pkey, hkey, w, after)
end
signal(KEYS[4], ARGV[5])
return 1
"""

REMOVE_LUA = LIB + """
-- KEYS: 1 users, 2 gpus, 3 cost, 4 model, 5 vtime, 6 shares, 7 model queued
-- ARGV: 1 user, 2 task, 3 prefix
local user, task = ARGV[1], ARGV[2]
local okey, pkey, hkey = ukeys(ARGV[3], user)
local rank = redis.call('ZRANK', okey, task)
if not rank then return 0 end
local w = share_of(KEYS[6], user)
local cost = tonumber(redis.call('HGET', KEYS[3], task) or '0')
local after = redis.call('ZRANGE', okey, rank + 1, -1)
ensure_index(KEYS[1], KEYS[6], ARGV[3])
redis.call('ZREM', ARGV[3] .. 'starts', tag(hkey) .. task)
redis.call('ZREM', okey, task)
redis.call('ZREM', pkey, task)
for _, t in ipairs(after) do redis.call('ZINCRBY', pkey, fmt(-cost), t) end
index_tasks(ARGV[3], pkey, hkey, w, after)
local nxt = tonumber(redis.call('HGET', hkey, 'next') or '0')
redis.call('HSET', hkey, 'next', fmt(nxt - cost))
local model = redis.call('HGET', KEYS[4], task)
if model and redis.call('HINCRBY', KEYS[7], model, -1) <= 0 then
  redis.call('HDEL', KEYS[7], model)
end
redis.call('HDEL', KEYS[2], task)
redis.call('HDEL', KEYS[3], task)
redis.call('HDEL', KEYS[4], task)
if redis.call('ZCARD', okey) == 0 then
  retire(KEYS[1], KEYS[5], user, okey, pkey, hkey, w)
else
  rescore(KEYS[1], user, pkey, hkey, w)
end
return 1
"""

POSITIONS_BODY = """
-- KEYS: 1 users, 2 shares; ARGV: 1 fair prefix, then user, task pairs
-- A task's position: 1 + the queued tasks whose (start, user seq) is smaller, i.e. its
-- rank in the index of starts (O(log n) each, whatever the number of users).
ensure_index(KEYS[1], KEYS[2], ARGV[1])
local g = ARGV[1] .. 'starts'
local out = {}
for j = 2, #ARGV, 2 do
  local _, _, hkey = ukeys(ARGV[1], ARGV[j])
  local rank = redis.call('ZRANK', g, tag(hkey) .. ARGV[j + 1])
  if rank then out[#out + 1] = rank + 1 else out[#out + 1] = -1 end
end
return out
"""

ENQUEUE_LUA = LIB + ENQUEUE_BODY
POSITIONS_LUA = LIB + POSITIONS_BODY


ORDER_LUA = LIB + """
-- KEYS: 1 users, 2 shares, 3 gpus, 4 model; ARGV: 1 fair prefix, 2 limit
-- The first tasks in the order admission takes them (ignoring capacity and caps):
-- a merge of the users' queues by (start, user seq), with a binary heap over users.
local limit = tonumber(ARGV[2])
local users = redis.call('ZRANGE', KEYS[1], 0, -1)
local heap = {}
local function less(a, b)
  if a.s ~= b.s then return a.s < b.s end
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
local function load(e)
  local got = redis.call('ZRANGE', e.pkey, e.idx, e.idx, 'WITHSCORES')
  if not got[1] then return false end
  e.task = got[1]
  e.s = start(e.base, tonumber(got[2]), e.w)
  return true
end
for _, u in ipairs(users) do
  local _, pkey, hkey = ukeys(ARGV[1], u)
  local st = redis.call('HMGET', hkey, 'base', 'seq')
  local e = {user = u, pkey = pkey, idx = 0, base = tonumber(st[1] or '0'),
             seq = tonumber(st[2] or '0'), w = share_of(KEYS[2], u)}
  if load(e) then push(e) end
end
local out = {}
while #heap > 0 and #out < 4 * limit do
  local e = pop()
  out[#out + 1] = e.task
  out[#out + 1] = e.user
  out[#out + 1] = redis.call('HGET', KEYS[3], e.task) or '1'
  out[#out + 1] = redis.call('HGET', KEYS[4], e.task) or ''
  e.idx = e.idx + 1
  if load(e) then push(e) end
end
return out
"""

CLAIM_LUA = LIB + """
-- KEYS: 1 users, 2 leases, 3 user running, 4 lease info, 5 claims, 6 claim owner, 7 gpus,
--       8 vtime, 9 vnow, 10 shares, 11 cost, 12 model, 13 user gpus, 14 model queued,
--       15 pool workers, 16 pool alive
-- ARGV: 1 capacity, 2 per-user job cap, 3 lease expiry ms, 4 dispatcher id,
--       5 fair prefix, 6 now ms, 7 pool idle prefix, 8.. pooled models
-- KEYS[17] (optional), the epoch: claim nothing unless it names this server's run id
-- (after a restart or a loss of data, leases are rebuilt from the database first).
if #KEYS == 17 and redis.call('GET', KEYS[17]) ~=
    string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') then
  return {'recovering'}
end
-- A pooled model's task is admitted only onto a live idle worker of its model (whose
-- GPUs are already leased); a user whose head waits for one is passed over, so a busy
-- pool holds back nobody else.
local pooled = {}
for i = 8, #ARGV do pooled[ARGV[i]] = true end
local now = tonumber(ARGV[6])
local function idle_worker(model)
  local ikey = ARGV[7] .. model
  for _, w in ipairs(redis.call('ZRANGE', ikey, 0, -1)) do
    local alive = tonumber(redis.call('ZSCORE', KEYS[16], w) or '0')
    if alive > now and redis.call('HEXISTS', KEYS[15], w) == 1 then return w, ikey end
  end
  return nil, ikey
end
local users = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
if #users == 0 then return {'empty'} end
local used = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(v) end
local cands = {}
for i = 1, #users, 2 do
  local _, _, hkey = ukeys(ARGV[5], users[i])
  cands[#cands + 1] = {users[i], tonumber(users[i + 1]),
                       tonumber(redis.call('HGET', hkey, 'seq') or '0')}
end
table.sort(cands, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[3] < b[3]
end)
local capped = 0
for _, c in ipairs(cands) do
  local user = c[1]
  local okey, pkey, hkey = ukeys(ARGV[5], user)
  local task = redis.call('ZRANGE', pkey, 0, 0)[1]
  if not task then
    redis.call('ZREM', KEYS[1], user)
  else
    local gpus = tonumber(redis.call('HGET', KEYS[7], task) or '1')
    local running = tonumber(redis.call('HGET', KEYS[3], user) or '0')
    local held = tonumber(redis.call('HGET', KEYS[13], user) or '0')
    local w, gpu_cap = share_of(KEYS[10], user)
    local model = redis.call('HGET', KEYS[12], task) or ''
    local worker, ikey = nil, nil
    if pooled[model] then worker, ikey = idle_worker(model) end
    if running >= tonumber(ARGV[2]) or (gpu_cap > 0 and held + gpus > gpu_cap) then
      capped = capped + 1
    elseif pooled[model] and not worker then
      capped = capped + 1
    else
      if not worker and used + gpus > tonumber(ARGV[1]) then return {'full', task} end
      local cost = redis.call('HGET', KEYS[11], task) or '0'
      if redis.call('HINCRBY', KEYS[14], model, -1) <= 0 then
        redis.call('HDEL', KEYS[14], model)
      end
      redis.call('ZREM', ARGV[5] .. 'starts', tag(hkey) .. task)
      redis.call('ZREM', okey, task)
      redis.call('ZREM', pkey, task)
      redis.call('HDEL', KEYS[11], task)
      redis.call('HDEL', KEYS[12], task)
      if c[2] > tonumber(redis.call('GET', KEYS[9]) or '0') then
        redis.call('SET', KEYS[9], fmt(c[2]))
      end
      if redis.call('ZCARD', okey) == 0 then
        retire(KEYS[1], KEYS[8], user, okey, pkey, hkey, w)
      else
        rescore(KEYS[1], user, pkey, hkey, w)
      end
      if worker then
        redis.call('ZREM', ikey, worker)
        local rec = redis.call('HGET', KEYS[15], worker)
        local f = {}
        for part in string.gmatch(rec .. '|', '([^|]*)|') do f[#f + 1] = part end
        redis.call('HSET', KEYS[15], worker, table.concat(
          {f[1], f[2], 'busy', ARGV[6], task, '', f[7]}, '|'))
      else
        redis.call('HSET', KEYS[2], task, gpus)
      end
      redis.call('HSET', KEYS[4], task, table.concat(
        {user, gpus, cost, ARGV[6], model, worker or ''}, '|'))
      redis.call('HINCRBY', KEYS[3], user, 1)
      redis.call('HINCRBY', KEYS[13], user, gpus)
      redis.call('ZADD', KEYS[5], ARGV[3], task)
      redis.call('HSET', KEYS[6], task, ARGV[4] .. '|' .. user)
      return {'claimed', task, user, tostring(gpus), model, worker or ''}
    end
  end
end
if capped > 0 then return {'capped'} end
return {'empty'}
"""

RELEASE_LUA = LIB + """
-- KEYS: 1 leases, 2 user running, 3 lease info, 4 signal, 5 user gpus, 6 vtime, 7 users,
--       8 shares, 9 model run s
-- ARGV: 1 task, 2 signal keep, 3 now ms, 4 completed ('1'/'0'), 5 run-time alpha,
--       6 fair prefix
local info = redis.call('HGET', KEYS[3], ARGV[1])
local freed = redis.call('HDEL', KEYS[1], ARGV[1])
if not info and freed == 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
if info then
  local f = {}
  for part in string.gmatch(info .. '|', '([^|]*)|') do f[#f + 1] = part end
  local user, gpus, cost, t0, model = f[1], tonumber(f[2]), tonumber(f[3]), tonumber(f[4]), f[5]
  if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then redis.call('HDEL', KEYS[2], user) end
  if redis.call('HINCRBY', KEYS[5], user, -gpus) <= 0 then redis.call('HDEL', KEYS[5], user) end
  local held_s = math.max(0, (tonumber(ARGV[3]) - t0) / 1000)
  local w = share_of(KEYS[8], user)
  local delta = (gpus * held_s - cost) / w
  local _, pkey, hkey = ukeys(ARGV[6], user)
  if redis.call('ZSCORE', KEYS[7], user) then
    redis.call('HSET', hkey, 'base', fmt(tonumber(redis.call('HGET', hkey, 'base')) + delta))
    rescore(KEYS[7], user, pkey, hkey, w)
    ensure_index(KEYS[7], KEYS[8], ARGV[6])
    index_user(ARGV[6], user, KEYS[8])
  else
    redis.call('HSET', KEYS[6], user,
               fmt(tonumber(redis.call('HGET', KEYS[6], user) or '0') + delta))
  end
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

SET_SHARE_LUA = LIB + """
-- KEYS: 1 users, 2 shares; ARGV: 1 user, 2 share, 3 fair prefix
-- A weight change keeps the user's next start where it is; later ones follow the weight.
local user = ARGV[1]
local old_w = share_of(KEYS[2], user)
redis.call('HSET', KEYS[2], user, ARGV[2])
local w = share_of(KEYS[2], user)
if redis.call('ZSCORE', KEYS[1], user) then
  local _, pkey, hkey = ukeys(ARGV[3], user)
  local head = redis.call('ZRANGE', pkey, 0, 0, 'WITHSCORES')
  local p = tonumber(head[2] or '0')
  local base = tonumber(redis.call('HGET', hkey, 'base') or '0')
  redis.call('HSET', hkey, 'base', fmt(base + p / old_w - p / w))
  rescore(KEYS[1], user, pkey, hkey, w)
  ensure_index(KEYS[1], KEYS[2], ARGV[3])
  index_user(ARGV[3], user, KEYS[2])
end
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
