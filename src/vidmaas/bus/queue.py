"""The task queue and GPU capacity, in Redis (DESIGN §2).

Data structures (all keys in ``bus.keys``, one hash slot):
- a LIST per user of queued task ids, oldest first (FIFO within a user);
- a LIST ring of users that have queued tasks; the head goes next and moves to the
  tail after one of its tasks is taken (round-robin across users);
- a ZSET of claims: entries a dispatcher took but has not acknowledged, scored by
  lease expiry, so a crashed dispatcher's entries are found and taken over;
- a HASH of capacity leases task → GPUs, and a HASH user → running count.

Guarantees:
- ``claim_next`` is one atomic script: it takes the next task in fair order whose
  user is under the per-user running cap, acquires its GPUs, and records the claim,
  or takes nothing. The head of the fair order is never skipped for lack of GPUs
  (no starvation of large jobs): admission waits until it fits. The sum of leases
  never exceeds the capacity given, whatever the number of dispatchers.
- ``enqueue`` is idempotent: a task already queued or claimed is not added twice.
- ``position`` is exact for the current queue under this fairness rule.
- ``release`` frees a lease once; releasing twice is harmless.
- Every change that may let a dispatcher make progress pushes a wake-up signal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from vidmaas.bus import keys
from vidmaas.bus.events import text

SIGNAL_KEEP = 64

_ENQUEUE_LUA = """
-- KEYS: 1 ring, 2 user queue, 3 claims, 4 gpus, 5 signal
-- ARGV: 1 user, 2 task, 3 gpus, 4 front ('1'/'0'), 5 signal keep
if redis.call('ZSCORE', KEYS[3], ARGV[2]) then return 0 end
if redis.call('LPOS', KEYS[2], ARGV[2]) then return 0 end
if ARGV[4] == '1' then
  redis.call('LPUSH', KEYS[2], ARGV[2])
else
  redis.call('RPUSH', KEYS[2], ARGV[2])
end
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  if ARGV[4] == '1' then redis.call('LPUSH', KEYS[1], ARGV[1])
  else redis.call('RPUSH', KEYS[1], ARGV[1]) end
end
redis.call('LPUSH', KEYS[5], '1')
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[5]) - 1)
return 1
"""

_REMOVE_LUA = """
-- KEYS: 1 ring, 2 user queue, 3 gpus
-- ARGV: 1 user, 2 task
local n = redis.call('LREM', KEYS[2], 0, ARGV[2])
if n > 0 then redis.call('HDEL', KEYS[3], ARGV[2]) end
if redis.call('LLEN', KEYS[2]) == 0 then redis.call('LREM', KEYS[1], 0, ARGV[1]) end
return n
"""

_POSITION_LUA = """
-- KEYS: 1 ring, 2 user queue; ARGV: 1 user, 2 task, 3 user queue prefix
local idx = redis.call('LPOS', KEYS[2], ARGV[2])
if not idx then return -1 end
local ring = redis.call('LRANGE', KEYS[1], 0, -1)
local ahead = idx
local before = true
for _, u in ipairs(ring) do
  if u == ARGV[1] then
    before = false
  else
    local len = redis.call('LLEN', ARGV[3] .. u)
    if before then ahead = ahead + math.min(len, idx + 1)
    else ahead = ahead + math.min(len, idx) end
  end
end
return ahead + 1
"""

_POSITIONS_LUA = """
-- KEYS: 1 ring; ARGV: 1 user queue prefix, then user, task pairs
local ring = redis.call('LRANGE', KEYS[1], 0, -1)
local lens, order = {}, {}
for i, u in ipairs(ring) do
  lens[u] = redis.call('LLEN', ARGV[1] .. u)
  order[u] = i
end
local out = {}
for j = 2, #ARGV, 2 do
  local user, task = ARGV[j], ARGV[j + 1]
  local idx = redis.call('LPOS', ARGV[1] .. user, task)
  if not idx or not order[user] then
    out[#out + 1] = -1
  else
    local ahead = idx
    for _, u in ipairs(ring) do
      if u ~= user then
        if order[u] < order[user] then ahead = ahead + math.min(lens[u], idx + 1)
        else ahead = ahead + math.min(lens[u], idx) end
      end
    end
    out[#out + 1] = ahead + 1
  end
end
return out
"""

_CLAIM_LUA = """
-- KEYS: 1 ring, 2 leases, 3 user running, 4 lease users, 5 claims, 6 claim owner, 7 gpus
-- ARGV: 1 capacity, 2 per-user cap, 3 lease expiry ms, 4 dispatcher id, 5 user queue prefix
local ring = redis.call('LRANGE', KEYS[1], 0, -1)
if #ring == 0 then return {'empty'} end
local used = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(v) end
local capped = 0
for _, user in ipairs(ring) do
  local qkey = ARGV[5] .. user
  local task = redis.call('LINDEX', qkey, 0)
  if not task then
    redis.call('LREM', KEYS[1], 0, user)
  else
    local running = tonumber(redis.call('HGET', KEYS[3], user) or '0')
    if running < tonumber(ARGV[2]) then
      local gpus = tonumber(redis.call('HGET', KEYS[7], task) or '1')
      if used + gpus > tonumber(ARGV[1]) then return {'full', task} end
      redis.call('LPOP', qkey)
      redis.call('LREM', KEYS[1], 0, user)
      if redis.call('LLEN', qkey) > 0 then redis.call('RPUSH', KEYS[1], user) end
      redis.call('HSET', KEYS[2], task, gpus)
      redis.call('HSET', KEYS[4], task, user)
      redis.call('HINCRBY', KEYS[3], user, 1)
      redis.call('ZADD', KEYS[5], ARGV[3], task)
      redis.call('HSET', KEYS[6], task, ARGV[4] .. '|' .. user)
      return {'claimed', task, user, tostring(gpus)}
    else
      capped = capped + 1
    end
  end
end
if capped > 0 then return {'capped'} end
return {'empty'}
"""

_RELEASE_LUA = """
-- KEYS: 1 leases, 2 user running, 3 lease users, 4 signal; ARGV: 1 task, 2 signal keep
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
local user = redis.call('HGET', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if user then
  local left = redis.call('HINCRBY', KEYS[2], user, -1)
  if left <= 0 then redis.call('HDEL', KEYS[2], user) end
end
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[2]) - 1)
return 1
"""

_ACK_LUA = """
-- KEYS: 1 claims, 2 claim owner, 3 gpus; ARGV: 1 task
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

_PROMOTE_LUA = """
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


@dataclass(frozen=True, slots=True)
class Claim:
    task_id: str
    user_id: str
    gpus: int


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What ``claim_next`` did: ``claimed`` (with ``claim``), ``empty``, ``full`` (the next
    task does not fit in the free GPUs) or ``capped`` (every waiting user is at their cap)."""

    outcome: str
    claim: Claim | None = None
    blocked_task_id: str | None = None


def now_ms() -> int:
    return int(time.time() * 1000)


class TaskQueue:
    """Fair queue and capacity over one Redis connection pool."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client

    async def enqueue(self, *, user_id: str, task_id: str, gpus: int, front: bool = False) -> bool:
        """Add a task (at the back of its user's list, or the front for a retry)."""
        added = await self._r.eval(
            _ENQUEUE_LUA, 5, keys.QUEUE_USERS, keys.user_queue(user_id), keys.QUEUE_CLAIMS,
            keys.QUEUE_GPUS, keys.QUEUE_SIGNAL, user_id, task_id, gpus, "1" if front else "0",
            SIGNAL_KEEP)
        return bool(added)

    async def remove(self, *, user_id: str, task_id: str) -> bool:
        """Take a queued task out (cancel); False if it was not queued."""
        n = await self._r.eval(
            _REMOVE_LUA, 3, keys.QUEUE_USERS, keys.user_queue(user_id), keys.QUEUE_GPUS,
            user_id, task_id)
        return int(n) > 0

    async def position(self, *, user_id: str, task_id: str) -> int | None:
        """1-based place in the fair order, or None if the task is not queued."""
        pos = int(await self._r.eval(
            _POSITION_LUA, 2, keys.QUEUE_USERS, keys.user_queue(user_id), user_id, task_id,
            keys.USER_QUEUE_PREFIX))
        return None if pos < 0 else pos

    async def positions(self, items: list[tuple[str, str]]) -> dict[str, int | None]:
        """Positions of many (user, task) pairs in one script (a page of a list)."""
        if not items:
            return {}
        flat = [x for pair in items for x in pair]
        res = await self._r.eval(
            _POSITIONS_LUA, 1, keys.QUEUE_USERS, keys.USER_QUEUE_PREFIX, *flat)
        return {task: (None if int(p) < 0 else int(p))
                for (_, task), p in zip(items, res, strict=True)}

    async def is_queued(self, *, user_id: str, task_id: str) -> bool:
        return await self._r.lpos(keys.user_queue(user_id), task_id) is not None

    async def is_claimed(self, task_id: str) -> bool:
        return await self._r.zscore(keys.QUEUE_CLAIMS, task_id) is not None

    async def is_delayed(self, task_id: str) -> bool:
        return await self._r.zscore(keys.QUEUE_DELAYED, task_id) is not None

    async def claim_next(self, *, dispatcher_id: str, capacity: int, per_user_cap: int,
                         lease_s: float) -> ClaimResult:
        """Atomically take the next admissible task and its GPUs (see module doc)."""
        res = await self._r.eval(
            _CLAIM_LUA, 7, keys.QUEUE_USERS, keys.CAPACITY_LEASES, keys.USER_RUNNING,
            keys.LEASE_OWNERS, keys.QUEUE_CLAIMS, keys.QUEUE_CLAIM_OWNER, keys.QUEUE_GPUS,
            capacity, per_user_cap, now_ms() + int(lease_s * 1000), dispatcher_id,
            keys.USER_QUEUE_PREFIX)
        parts = [text(p) for p in res]
        if parts[0] == "claimed":
            return ClaimResult("claimed", Claim(parts[1], parts[2], int(parts[3])))
        if parts[0] == "full":
            return ClaimResult("full", blocked_task_id=parts[1])
        return ClaimResult(parts[0])

    async def renew_claim(self, task_id: str, *, lease_s: float) -> None:
        await self._r.zadd(keys.QUEUE_CLAIMS, {task_id: now_ms() + int(lease_s * 1000)}, xx=True)

    async def ack(self, task_id: str) -> None:
        """The claim is settled (the task runs, or ended): forget the queue entry."""
        await self._r.eval(_ACK_LUA, 3, keys.QUEUE_CLAIMS,
                           keys.QUEUE_CLAIM_OWNER, keys.QUEUE_GPUS, task_id)

    async def expired_claims(self, *, limit: int = 100) -> list[tuple[str, str, str]]:
        """(task, dispatcher, user) of claims whose lease ran out."""
        raw: list[str] = await self._r.zrangebyscore(  # type: ignore[assignment]
            keys.QUEUE_CLAIMS, "-inf", now_ms(), start=0, num=limit)
        ids = [text(t) for t in raw]
        out = []
        for task_id in ids:
            owner = await self._r.hget(keys.QUEUE_CLAIM_OWNER, task_id)
            dispatcher, _, user = text(owner or "|").partition("|")
            out.append((task_id, dispatcher, user))
        return out

    async def claims(self) -> list[str]:
        return [text(t) for t in await self._r.zrange(keys.QUEUE_CLAIMS, 0, -1)]  # type: ignore[arg-type]

    async def release(self, task_id: str) -> bool:
        """Free the task's GPUs and running slot; True if it held any."""
        n = await self._r.eval(_RELEASE_LUA, 4, keys.CAPACITY_LEASES,
                               keys.USER_RUNNING, keys.LEASE_OWNERS, keys.QUEUE_SIGNAL,
                               task_id, SIGNAL_KEEP)
        return bool(n)

    async def leases(self) -> dict[str, int]:
        """task → GPUs, for every task holding capacity."""
        raw = await self._r.hgetall(keys.CAPACITY_LEASES)
        return {text(k): int(v) for k, v in raw.items()}

    async def gpus_in_use(self) -> int:
        return sum((await self.leases()).values())

    async def schedule_retry(self, *, user_id: str, task_id: str, gpus: int,
                             delay_s: float) -> None:
        """Queue a retry after ``delay_s`` (``promote_due`` moves it into the queue)."""
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.zadd(keys.QUEUE_DELAYED, {task_id: now_ms() + int(delay_s * 1000)})
            pipe.hset(keys.QUEUE_DELAYED_USERS, task_id, user_id)
            pipe.hset(keys.QUEUE_GPUS, task_id, gpus)
            # Wake a sleeping dispatcher so that it re-reads when the next retry is due.
            pipe.lpush(keys.QUEUE_SIGNAL, "1")
            pipe.ltrim(keys.QUEUE_SIGNAL, 0, SIGNAL_KEEP - 1)
            await pipe.execute()

    async def promote_due(self) -> list[tuple[str, str]]:
        """Take due retries out of the delayed set; the caller enqueues them (front)."""
        res = [text(x) for x in await self._r.eval(
            _PROMOTE_LUA, 2, keys.QUEUE_DELAYED, keys.QUEUE_DELAYED_USERS, now_ms())]
        return [(res[i], res[i + 1]) for i in range(0, len(res), 2)]

    async def next_due_in_s(self) -> float | None:
        first = await self._r.zrange(keys.QUEUE_DELAYED, 0, 0, withscores=True)
        if not first:
            return None
        return max(0.0, (float(first[0][1]) - now_ms()) / 1000)

    async def wait_signal(self, timeout_s: float) -> bool:
        """Sleep until something may have changed (a task arrived, capacity freed)."""
        res = await self._r.blpop([keys.QUEUE_SIGNAL], timeout=timeout_s)
        return res is not None

    async def signal(self) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.lpush(keys.QUEUE_SIGNAL, "1")
            pipe.ltrim(keys.QUEUE_SIGNAL, 0, SIGNAL_KEEP - 1)
            await pipe.execute()

    async def depths(self) -> dict[str, int]:
        """user → queued tasks."""
        users = [text(u) for u in await self._r.lrange(keys.QUEUE_USERS, 0, -1)]
        if not users:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.llen(keys.user_queue(u))
            lens = await pipe.execute()
        return {u: int(n) for u, n in zip(users, lens, strict=True) if int(n)}

    async def user_running(self) -> dict[str, int]:
        raw = await self._r.hgetall(keys.USER_RUNNING)
        return {text(k): int(v) for k, v in raw.items()}

    async def announce_move(self) -> None:
        """Tell API processes that positions may have changed."""
        await self._r.publish(keys.QUEUE_MOVED, "1")
