"""Warm-pool workers in Redis (DESIGN §12): registration, leases, idleness, assignments, fences.

A pool worker is one long-lived gang of GPUs running ``vidmaas-job serve`` for one
model. Its life in Redis (keys in ``bus.keys``, the shared ones under the queue's
``{q}`` tag):

- The dispatcher ``reserve``s a worker before starting it: in one script the
  worker's GPUs are leased in the same ``CAPACITY_LEASES`` budget as task jobs (so
  pools and jobs together never exceed the capacity, whatever the number of
  dispatchers) and the worker is registered ``starting`` with a lease that covers
  its start-up.
- The worker renews its lease with every ``heartbeat``; once its model is loaded it
  says ``ready`` (it enters its model's idle set). ``TaskQueue.claim_next`` takes a
  pooled task only onto a live idle worker, atomically marking it ``busy``. After
  Redis lost its data, a dispatcher's rebuild gives each live worker process its GPU
  lease back (``restore_worker``), and the worker's next heartbeat registers it again
  as it knows itself to be, its lease set to the GPUs it holds; with neither on a
  rebuilt Redis, it was retired and exits.
- The dispatcher then ``assign``s: it writes the task's *fence* (``worker|attempt``)
  and pushes the assignment to the worker's inbox. The worker only works on an
  assignment whose fence is its own, and every event it publishes for the task is
  dropped unless the fence still names it (``bus.events.publish_fenced_sync``):
  a worker that lost its lease, or a stale assignment of an earlier attempt, can
  never publish for a newer attempt.
- After a task the worker says ``ready`` again, or ``leave``s when it exits by itself
  (a limit reached): draining with no task, so nothing is retried. ``drain`` asks a
  worker to exit (scale-down, reclaim, replacement) and stops new assignments to it;
  ``retire`` forgets a worker that has ended (or whose lease ran out), frees its
  GPUs and returns the task it was busy with, if any, for a retry; in the same script
  it sets that task's fence to ``-`` if the fence names the worker, so a worker that
  lingers can publish nothing more for it (and no rebuild gives it back); ``fence_out``
  does the same for one attempt the dispatcher takes back from a worker.

Every state change that may let a dispatcher make progress pushes the queue's
wake-up signal.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from vidmaas.bus import keys
from vidmaas.bus.events import text

SIGNAL_KEEP = 64
FENCE_TTL_S = 7 * 24 * 3600


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class Worker:
    id: str
    model: str
    gpus: int
    state: WorkerState
    since_ms: int
    """When it entered its current state."""
    task_id: str | None
    attempt: int | None
    tasks_done: int
    alive_until_ms: int

    @property
    def alive(self) -> bool:
        return self.alive_until_ms > now_ms()


@dataclass(frozen=True, slots=True)
class Assignment:
    """What a worker is told to do: one attempt of one task, with the runtime's arguments
    (``domain.jobs.job_args``), or ``exit``."""

    task_id: str | None
    attempt: int
    args: list[str]
    exit: bool = False

    def encode(self) -> str:
        return json.dumps({"task_id": self.task_id, "attempt": self.attempt,
                           "args": self.args, "exit": self.exit})

    @classmethod
    def decode(cls, raw: str) -> Assignment:
        data: dict[str, Any] = json.loads(raw)
        return cls(task_id=data.get("task_id"), attempt=int(data.get("attempt") or 0),
                   args=[str(a) for a in data.get("args") or []], exit=bool(data.get("exit")))


def now_ms() -> int:
    return int(time.time() * 1000)


def fence_value(worker_id: str, attempt: int) -> str:
    return f"{worker_id}|{attempt}"


_LIB = """
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

_RESERVE_LUA = _LIB + """
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

_HEARTBEAT_LUA = _LIB + """
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

_READY_LUA = _LIB + """
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

_ASSIGN_LUA = _LIB + """
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

_UNCLAIM_LUA = _LIB + """
-- KEYS: 1 workers, 2 idle prefix, 3 signal; ARGV: 1 worker, 2 task, 3 now ms, 4 keep
-- A worker marked busy by a claim whose assignment was never sent goes back to idle.
local f = rec(KEYS[1], ARGV[1])
if not f or f[3] ~= 'busy' or f[5] ~= ARGV[2] or f[6] ~= '' then return 0 end
put(KEYS[1], ARGV[1], {f[1], f[2], 'idle', ARGV[3], '', '', f[7]})
redis.call('ZADD', KEYS[2] .. f[1], ARGV[3], ARGV[1])
signal(KEYS[3], ARGV[4])
return 1
"""

_DRAIN_LUA = _LIB + """
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

_LEAVE_LUA = _LIB + """
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

_RETIRE_LUA = _LIB + """
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

_FENCE_OUT_LUA = """
-- KEYS: 1 fence; ARGV: 1 its value to clear: set to '-' (a missing one was lost, restored)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], '-', 'KEEPTTL')
return 1
"""


def _parse(worker_id: str, raw: str, alive_ms: float | None) -> Worker:
    model, gpus, state, since, task, attempt, done = (raw.split("|") + [""] * 7)[:7]
    return Worker(id=worker_id, model=model, gpus=int(gpus or 0), state=WorkerState(state),
                  since_ms=int(float(since or 0)), task_id=task or None,
                  attempt=int(attempt) if attempt else None, tasks_done=int(done or 0),
                  alive_until_ms=int(alive_ms or 0))


def lease_member(worker_id: str) -> str:
    return keys.POOL_LEASE_PREFIX + worker_id


class PoolRegistry:
    """The dispatcher's side of the pool protocol (see the module docstring)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client

    async def reserve(self, *, worker_id: str, model: str, gpus: int, capacity: int,
                      start_lease_s: float) -> bool:
        """Lease ``gpus`` for a new worker and register it ``starting``; False if they do
        not fit in ``capacity`` (or the id is taken)."""
        now = now_ms()
        ok = await self._r.eval(
            _RESERVE_LUA, 3, keys.CAPACITY_LEASES, keys.POOL_WORKERS, keys.POOL_ALIVE,
            worker_id, model, gpus, capacity, now, now + int(start_lease_s * 1000),
            lease_member(worker_id))
        return bool(ok)

    async def workers(self, model: str | None = None) -> list[Worker]:
        raw = await self._r.hgetall(keys.POOL_WORKERS)
        if not raw:
            return []
        scored: list[tuple[str, float]] = await self._r.zrange(  # type: ignore[assignment]
            keys.POOL_ALIVE, 0, -1, withscores=True)
        alive = dict(scored)
        out = [_parse(text(w), text(v), alive.get(text(w))) for w, v in raw.items()]
        return sorted((w for w in out if model is None or w.model == model),
                      key=lambda w: w.id)

    async def get(self, worker_id: str) -> Worker | None:
        raw = await self._r.hget(keys.POOL_WORKERS, worker_id)
        if raw is None:
            return None
        alive = await self._r.zscore(keys.POOL_ALIVE, worker_id)
        return _parse(worker_id, text(raw), alive)

    async def assign(self, *, worker_id: str, task_id: str, attempt: int,
                     args: list[str]) -> bool:
        """Fence ``task_id`` to this worker and attempt and hand it the assignment; False
        if the worker is no longer busy with that task (it died or was retired)."""
        payload = Assignment(task_id=task_id, attempt=attempt, args=args).encode()
        ok = await self._r.eval(
            _ASSIGN_LUA, 3, keys.POOL_WORKERS, keys.task_fence(task_id),
            keys.worker_inbox(worker_id), worker_id, task_id, attempt, payload, FENCE_TTL_S)
        return bool(ok)

    async def unclaim(self, worker_id: str, task_id: str) -> bool:
        """Put back to idle a worker that a claim of ``task_id`` marked busy but that was
        never sent the assignment (its dispatcher died, or the task was cancelled)."""
        ok = await self._r.eval(
            _UNCLAIM_LUA, 3, keys.POOL_WORKERS, keys.POOL_IDLE_PREFIX, keys.QUEUE_SIGNAL,
            worker_id, task_id, now_ms(), SIGNAL_KEEP)
        return bool(ok)

    async def drain(self, worker_id: str, *, only_if_idle: bool = False) -> bool:
        """Ask a worker to exit after what it is doing; no new assignment reaches it.
        With ``only_if_idle``, only an idle worker is drained (reclaiming GPUs)."""
        exit_msg = Assignment(task_id=None, attempt=0, args=[], exit=True).encode()
        ok = await self._r.eval(
            _DRAIN_LUA, 3, keys.POOL_WORKERS, keys.POOL_IDLE_PREFIX, keys.worker_inbox(worker_id),
            worker_id, now_ms(), exit_msg, "1" if only_if_idle else "0")
        return bool(ok)

    async def retire(self, worker_id: str) -> tuple[str | None, int | None]:
        """Forget an ended worker and free its GPUs; (task, attempt) it was busy with. The
        same script clears the task's fence if it names this worker (a lingering worker
        publishes nothing more for it). Raises if its task changed under all ten tries."""
        for _ in range(10):  # the record's task changes under us only on a race
            raw = await self._r.hget(keys.POOL_WORKERS, worker_id)
            task = _parse(worker_id, text(raw), None).task_id if raw is not None else None
            res = await self._r.eval(
                _RETIRE_LUA, 7, keys.POOL_WORKERS, keys.POOL_ALIVE, keys.POOL_IDLE_PREFIX,
                keys.CAPACITY_LEASES, keys.QUEUE_SIGNAL, keys.worker_inbox(worker_id),
                keys.task_fence(task or "-"), worker_id, lease_member(worker_id), SIGNAL_KEEP,
                task or "")
            parts = [text(p) for p in res]
            if len(parts) < 3:
                return (parts[0], int(parts[1]) if parts[1] else None) \
                    if len(parts) >= 2 and parts[0] else (None, None)
        raise RuntimeError(f"worker {worker_id} not retired: its task kept changing")

    async def fence_out(self, *, task_id: str, worker_id: str, attempt: int) -> bool:
        """Take ``task_id``'s attempt back from ``worker_id``: its fence is cleared if it
        still names that worker and attempt, so the worker's next publish is refused.
        True if it did."""
        return bool(await self._r.eval(_FENCE_OUT_LUA, 1, keys.task_fence(task_id),
                                       fence_value(worker_id, attempt)))

    async def restore_worker(self, *, worker_id: str, gpus: int) -> bool:
        """Lease ``gpus`` again to a live worker process whose lease Redis lost (it then
        registers itself again); True if it had to."""
        return bool(await self._r.hsetnx(keys.CAPACITY_LEASES, lease_member(worker_id),
                                         gpus))

    async def restore_fence(self, *, task_id: str, worker_id: str, attempt: int) -> bool:
        """Give an active pooled task's attempt its fence back after Redis lost it (the
        database says which worker and attempt); never replaces a fence that exists."""
        return bool(await self._r.set(keys.task_fence(task_id),
                                      fence_value(worker_id, attempt), nx=True,
                                      ex=FENCE_TTL_S))

    async def fence_of(self, task_id: str) -> str | None:
        value = await self._r.get(keys.task_fence(task_id))
        return None if value is None else text(value)


class WorkerLink:
    """The worker's side (rank 0 of ``vidmaas-job serve``), over a blocking client."""

    def __init__(self, client: redis.Redis, *, worker_id: str, lease_s: float,
                 model: str = "", gpus: int = 1) -> None:
        self._r = client
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.model = model
        """The model and GPUs the worker re-registers with after Redis lost its data."""
        self.gpus = gpus
        self._state = WorkerState.STARTING
        self._task: tuple[str, int] | None = None
        self._done = 0

    def heartbeat(self) -> WorkerState | None:
        """Renew the lease; the current state, or None if the worker was retired. After
        Redis lost its data, the worker registers again (as it knows itself to be) once
        a dispatcher has given it its GPUs back, and is told its own state until then."""
        task, attempt = self._task or ("", 0)
        now = now_ms()
        state = text(self._r.eval(
            _HEARTBEAT_LUA, 6, keys.POOL_WORKERS, keys.POOL_ALIVE, keys.CAPACITY_LEASES,
            keys.QUEUE_EPOCH, keys.POOL_IDLE_PREFIX, keys.QUEUE_SIGNAL, self.worker_id,
            now + int(self.lease_s * 1000), lease_member(self.worker_id), now, SIGNAL_KEEP,
            self.model, self.gpus, self._state.value, task, attempt if task else "",
            self._done))
        if state == "?":
            return self._state
        return WorkerState(state) if state else None

    def ready(self, *, finished_task: bool = False) -> bool:
        """Enter the idle set; False if the worker is draining or was retired (exit)."""
        now = now_ms()
        ok = self._r.eval(_READY_LUA, 4, keys.POOL_WORKERS, keys.POOL_IDLE_PREFIX,
                          keys.QUEUE_SIGNAL, keys.POOL_ALIVE, self.worker_id, now, SIGNAL_KEEP,
                          now + int(self.lease_s * 1000), "1" if finished_task else "0")
        self._done += 1 if finished_task else 0
        self._state, self._task = (WorkerState.IDLE if ok else WorkerState.DRAINING), None
        return bool(ok)

    def leave(self, *, finished_task: bool = False) -> bool:
        """Stop taking assignments before exiting by itself (a limit reached, a failure):
        ``draining`` with no task; False if the worker was already retired."""
        ok = self._r.eval(_LEAVE_LUA, 2, keys.POOL_WORKERS, keys.POOL_IDLE_PREFIX,
                          self.worker_id, now_ms(), "1" if finished_task else "0")
        self._done += 1 if finished_task else 0
        self._state, self._task = WorkerState.DRAINING, None
        return bool(ok)

    def next_assignment(self, *, timeout_s: float) -> Assignment | None:
        """The next assignment whose fence is this worker's (stale ones are skipped), or
        None after ``timeout_s`` without one."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            got = self._r.blpop([keys.worker_inbox(self.worker_id)], timeout=max(left, 0.01))
            if got is None:
                return None
            a = Assignment.decode(text(got[1]))
            if a.exit:
                return a
            if a.task_id is not None and self.owns(a.task_id, a.attempt):
                self._state, self._task = WorkerState.BUSY, (a.task_id, a.attempt)
                return a
        return None

    def owns(self, task_id: str, attempt: int) -> bool:
        """Does the task's fence still name this worker and attempt?"""
        value = self._r.get(keys.task_fence(task_id))
        return value is not None and text(value) == fence_value(self.worker_id, attempt)
