"""The task queue and GPU capacity, in Redis (DESIGN §2; the rule is in docs/dispatcher.md).

Data structures (all keys in ``bus.keys``, one hash slot):
- a ZSET per user of queued task ids, scored by ``domain.fairness.order_key_ms``
  (priority class first, then FIFO, with bounded aging) on Redis's own clock when the
  enqueue script runs, arrivals of the same millisecond kept in order;
- a ZSET of the users that have queued tasks, scored by their *virtual time*: the
  GPU-seconds they have been served, divided by their weight. A user who starts
  queueing begins at the larger of their own virtual time and the system's (the
  start tag of the latest admitted task), so being away earns no credit and a
  newcomer is served next rather than behind everyone's backlog;
- a ZSET of claims: entries a dispatcher took but has not acknowledged, scored by
  lease expiry, so a crashed dispatcher's entries are found and taken over;
- a HASH of capacity leases task → GPUs, with per-lease user, cost and start time,
  and per-user counts of jobs and GPUs held.

Guarantees:
- ``claim_next`` is one atomic script: it takes the head task of the user with the
  least virtual time (ties: who started queueing first) among users under their
  caps (jobs at once, and their own GPUs-at-once quota), acquires its GPUs, charges
  the user the task's estimated cost (GPUs × the model's moving-average run time)
  over their weight, and records the claim; or takes nothing. The head of the fair
  order is never skipped for lack of GPUs (no starvation of large jobs): admission
  waits until it fits. The sum of leases never exceeds the capacity given,
  whatever the number of dispatchers.
- ``release`` frees a lease once (releasing twice is harmless) and settles the
  charge: the user's virtual time is corrected by what the lease really held (GPUs
  × seconds) minus the estimate, so fairness is by GPU-seconds received, not by
  turns. A completed task's hold time feeds its model's moving average.
- ``enqueue`` is idempotent: a task already queued or claimed is not added twice.
- ``enqueue_announced`` on a single Redis enqueues, computes the position, publishes
  ``queued`` with it and announces the move in one script (``bus.admit_lua``).
- Scripts go by digest (``bus.scripts``): a Redis that lost its script cache gets the
  source again on its NOSCRIPT answer.
- ``positions`` is exact for the current queue under this rule (least virtual time
  first, the same fixed costs, capacity and caps aside): every script that changes a
  task's virtual start rewrites it in one index of all queued tasks
  (``keys.QUEUE_STARTS``), so a position is one rank there, O(log n) whatever the
  number of users. ``order`` merges the users' queues instead, without the index.
- Every change that may let a dispatcher make progress pushes a wake-up signal.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from vidmaas.bus import keys
from vidmaas.bus.admit_lua import ADMIT_LUA
from vidmaas.bus.events import StreamLimits, publish, publish_args, text
from vidmaas.bus.queue_lua import (
    ACK_LUA,
    CLAIM_LUA,
    ENQUEUE_LUA,
    ORDER_LUA,
    POSITIONS_LUA,
    PROMOTE_LUA,
    RELEASE_LUA,
    REMOVE_LUA,
    SET_SHARE_LUA,
)
from vidmaas.bus.scripts import Script
from vidmaas.domain import events as ev
from vidmaas.domain.fairness import Priority, Share, order_key_ms

SIGNAL_KEEP = 64
RUN_S_ALPHA = 0.2
"""Weight of the newest completed task in a model's moving-average run time."""

_ADMIT = Script(ADMIT_LUA)
"""Enqueue, position, ``queued`` event and move announcement in one script."""
_SINGLE = StreamLimits()
_MARK = 987654321012345
"""Written as the position in the ``queued`` event's arguments; the script puts the real
one in its place (the event's encoding stays ``domain.events.encode``'s)."""
_ACK, _CLAIM, _ENQUEUE, _ORDER, _POSITIONS, _PROMOTE, _RELEASE, _REMOVE, _SET_SHARE = (
    Script(src) for src in (ACK_LUA, CLAIM_LUA, ENQUEUE_LUA, ORDER_LUA, POSITIONS_LUA,
                            PROMOTE_LUA, RELEASE_LUA, REMOVE_LUA, SET_SHARE_LUA))


def _positions_args(items: list[tuple[str, str]]) -> list[Any]:
    """The key count, keys and arguments of ``POSITIONS_LUA`` for (user, task) pairs."""
    return [2, keys.QUEUE_USERS, keys.USER_SHARES, keys.USER_QUEUE_PREFIX,
            *(x for pair in items for x in pair)]


def _positions_of(items: list[tuple[str, str]], res: Any) -> dict[str, int | None]:
    """The script's answer as task → 1-based position, None where not queued."""
    return {task: (None if int(p) < 0 else int(p))
            for (_, task), p in zip(items, res, strict=True)}


@dataclass(frozen=True, slots=True)
class Claim:
    task_id: str
    user_id: str
    gpus: int
    model: str = ""
    worker_id: str | None = None
    """The pool worker the task was assigned to (None: the task gets a job of its own)."""


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What ``claim_next`` did: ``claimed`` (with ``claim``), ``empty``, ``full`` (the next
    task does not fit in the free GPUs), ``capped`` (every waiting user is at a cap) or
    ``recovering`` (leases not rebuilt yet on this Redis server)."""

    outcome: str
    claim: Claim | None = None
    blocked_task_id: str | None = None


def now_ms() -> int:
    return int(time.time() * 1000)


class TaskQueue:
    """Fair queue and capacity over one Redis connection pool.

    ``priority_step_s``: how far one priority class moves a task ahead within its
    user's queue (the aging bound); ``default_run_s``: the run time assumed for a
    model that has completed no task yet (its cost estimate until it has).
    """

    def __init__(self, client: aioredis.Redis, *, priority_step_s: float = 600.0,
                 default_run_s: float = 60.0) -> None:
        self._r = client
        self.priority_step_s = priority_step_s
        self.default_run_s = default_run_s

    async def enqueue(self, *, user_id: str, task_id: str, gpus: int, front: bool = False,
                      model: str = "", priority: Priority = Priority.NORMAL,
                      share: Share | None = None) -> bool:
        """Add a task (in its user's order, or at the front of it for a retry).

        ``share`` refreshes the user's weight and GPU quota; None keeps the stored one.
        """
        return bool(await _ENQUEUE.run(self._r, *self._enqueue_args(
            user_id=user_id, task_id=task_id, gpus=gpus, front=front, model=model,
            priority=priority, share=share)))

    async def enqueue_with_position(self, *, user_id: str, task_id: str, gpus: int,
                                    front: bool = False, model: str = "",
                                    priority: Priority = Priority.NORMAL,
                                    share: Share | None = None) -> int | None:
        """``enqueue`` and then ``position`` in one round trip (a pipeline: the scripts
        run one after the other, so the position is the new task's)."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.eval(ENQUEUE_LUA, *self._enqueue_args(
                user_id=user_id, task_id=task_id, gpus=gpus, front=front, model=model,
                priority=priority, share=share))
            pipe.eval(POSITIONS_LUA, *_positions_args([(user_id, task_id)]))
            _, res = await pipe.execute()
        return _positions_of([(user_id, task_id)], res)[task_id]

    async def enqueue_announced(self, *, user_id: str, task_id: str, gpus: int,
                                front: bool = False, model: str = "",
                                priority: Priority = Priority.NORMAL,
                                share: Share | None = None,
                                limits: StreamLimits = _SINGLE) -> int | None:
        """``enqueue_with_position``, then publish ``queued`` with that position and
        announce the move (``announce_move``). On a single Redis all of it is one script
        (one round trip; nothing else runs between the enqueue and its event). On Redis
        Cluster, where the streams are in other slots, the event and the announcement
        follow as separate commands."""
        if limits.cluster:
            position = await self.enqueue_with_position(
                user_id=user_id, task_id=task_id, gpus=gpus, front=front, model=model,
                priority=priority, share=share)
            await asyncio.gather(publish(self._r, ev.queued(task_id, position=position or 0),
                                         limits), self.announce_move())
            return position
        stream_keys, publish_argv = publish_args(ev.queued(task_id, position=_MARK), limits)
        at = next(i for i, v in enumerate(publish_argv, 1) if str(_MARK) in str(v))
        enq = self._enqueue_args(user_id=user_id, task_id=task_id, gpus=gpus, front=front,
                                 model=model, priority=priority, share=share)
        n = enq[0]
        res = await _ADMIT.run(self._r, n + len(stream_keys), *enq[1:n + 1], *stream_keys,
                               *enq[n + 1:], keys.QUEUE_MOVED, _MARK, at, *publish_argv)
        return None if int(res) < 0 else int(res)

    def _enqueue_args(self, *, user_id: str, task_id: str, gpus: int, front: bool,
                      model: str, priority: Priority, share: Share | None) -> list[Any]:
        """The key count, keys and arguments of ``ENQUEUE_LUA``."""
        key = order_key_ms(enqueued_ms=0, priority=priority,
                           priority_step_s=self.priority_step_s)
        return [12, keys.QUEUE_USERS, keys.QUEUE_CLAIMS, keys.QUEUE_GPUS,
                keys.QUEUE_SIGNAL, keys.QUEUE_VTIME, keys.QUEUE_VNOW, keys.QUEUE_SEQ,
                keys.USER_SHARES, keys.QUEUE_COST, keys.QUEUE_MODEL, keys.MODEL_RUN_S,
                keys.MODEL_QUEUED,
                user_id, task_id, gpus, "1" if front else "0", SIGNAL_KEEP, key, model,
                repr(float(self.default_run_s)), "" if share is None else share.encode(),
                keys.USER_QUEUE_PREFIX]

    async def set_share(self, user_id: str, share: Share) -> None:
        """Change a user's weight and GPU quota now (an admin changed them)."""
        await _SET_SHARE.run(self._r, 2, keys.QUEUE_USERS, keys.USER_SHARES, user_id,
                             share.encode(), keys.USER_QUEUE_PREFIX)
        await self.signal()

    async def remove(self, *, user_id: str, task_id: str) -> bool:
        """Take a queued task out (cancel); False if it was not queued."""
        n = await _REMOVE.run(
            self._r, 7, keys.QUEUE_USERS, keys.QUEUE_GPUS, keys.QUEUE_COST,
            keys.QUEUE_MODEL, keys.QUEUE_VTIME, keys.USER_SHARES, keys.MODEL_QUEUED,
            user_id, task_id,
            keys.USER_QUEUE_PREFIX)
        return int(n) > 0

    async def position(self, *, user_id: str, task_id: str) -> int | None:
        """1-based place in the fair order, or None if the task is not queued."""
        return (await self.positions([(user_id, task_id)]))[task_id]

    async def positions(self, items: list[tuple[str, str]]) -> dict[str, int | None]:
        """Positions of many (user, task) pairs in one script (a page of a list)."""
        if not items:
            return {}
        res = await _POSITIONS.run(self._r, *_positions_args(items))
        return _positions_of(items, res)

    async def order(self, *, limit: int) -> list[Claim]:
        """The first ``limit`` queued tasks in the order admission takes them (capacity
        and caps aside), with their users, GPUs and models: what start-time estimates
        replay."""
        res = [text(x) for x in await _ORDER.run(
            self._r, 4, keys.QUEUE_USERS, keys.USER_SHARES, keys.QUEUE_GPUS, keys.QUEUE_MODEL,
            keys.USER_QUEUE_PREFIX, limit)]
        return [Claim(res[i], res[i + 1], int(res[i + 2]), res[i + 3])
                for i in range(0, len(res), 4)]

    async def is_queued(self, *, user_id: str, task_id: str) -> bool:
        return await self._r.zscore(keys.user_queue(user_id), task_id) is not None

    async def is_claimed(self, task_id: str) -> bool:
        return await self._r.zscore(keys.QUEUE_CLAIMS, task_id) is not None

    async def is_delayed(self, task_id: str) -> bool:
        return await self._r.zscore(keys.QUEUE_DELAYED, task_id) is not None

    async def claim_next(self, *, dispatcher_id: str, capacity: int, per_user_cap: int,
                         lease_s: float, pooled: frozenset[str] = frozenset(),
                         epoch_guard: bool = False) -> ClaimResult:
        """Atomically take the next admissible task and its GPUs (see module doc).

        A task of a model in ``pooled`` is taken only onto a live idle worker of its
        model (``Claim.worker_id``), holding no GPUs of its own: the worker's are leased.
        ``epoch_guard``: take nothing (``recovering``) unless ``keys.QUEUE_EPOCH`` names
        this Redis server, i.e. its leases were rebuilt since it (re)started
        (``bus.recovery``).
        """
        now = now_ms()
        guard = [keys.QUEUE_EPOCH] if epoch_guard else []
        res = await _CLAIM.run(
            self._r, 16 + len(guard), keys.QUEUE_USERS, keys.CAPACITY_LEASES,
            keys.USER_RUNNING, keys.LEASE_INFO, keys.QUEUE_CLAIMS, keys.QUEUE_CLAIM_OWNER,
            keys.QUEUE_GPUS, keys.QUEUE_VTIME, keys.QUEUE_VNOW, keys.USER_SHARES,
            keys.QUEUE_COST, keys.QUEUE_MODEL, keys.USER_GPUS, keys.MODEL_QUEUED,
            keys.POOL_WORKERS, keys.POOL_ALIVE, *guard,
            capacity, per_user_cap, now + int(lease_s * 1000), dispatcher_id,
            keys.USER_QUEUE_PREFIX, now, keys.POOL_IDLE_PREFIX, *sorted(pooled))
        parts = [text(p) for p in res]
        if parts[0] == "claimed":
            return ClaimResult("claimed", Claim(parts[1], parts[2], int(parts[3]), parts[4],
                                                parts[5] or None))
        if parts[0] == "full":
            return ClaimResult("full", blocked_task_id=parts[1])
        return ClaimResult(parts[0])

    async def renew_claim(self, task_id: str, *, lease_s: float) -> None:
        await self._r.zadd(keys.QUEUE_CLAIMS, {task_id: now_ms() + int(lease_s * 1000)}, xx=True)

    async def ack(self, task_id: str) -> None:
        """The claim is settled (the task runs, or ended): forget the queue entry."""
        await _ACK.run(self._r, 3, keys.QUEUE_CLAIMS, keys.QUEUE_CLAIM_OWNER, keys.QUEUE_GPUS,
                       task_id)

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

    async def release(self, task_id: str, *, completed: bool = False) -> bool:
        """Free the task's GPUs and running slot and settle its charge; True if it held
        any. ``completed``: the task succeeded, so its hold time is a sample of its
        model's run time."""
        n = await _RELEASE.run(
            self._r, 9, keys.CAPACITY_LEASES, keys.USER_RUNNING, keys.LEASE_INFO,
            keys.QUEUE_SIGNAL, keys.USER_GPUS, keys.QUEUE_VTIME, keys.QUEUE_USERS,
            keys.USER_SHARES, keys.MODEL_RUN_S,
            task_id, SIGNAL_KEEP, now_ms(), "1" if completed else "0", RUN_S_ALPHA,
            keys.USER_QUEUE_PREFIX)
        return bool(n)

    async def leases(self) -> dict[str, int]:
        """task → GPUs, for every task holding capacity of its own (pool workers' GPUs
        are in ``bus.pools``)."""
        raw = await self._r.hgetall(keys.CAPACITY_LEASES)
        return {text(k): int(v) for k, v in raw.items()
                if not text(k).startswith(keys.POOL_LEASE_PREFIX)}

    async def gpus_in_use(self) -> int:
        """GPUs held by task jobs and pool workers together (the one budget)."""
        raw = await self._r.hvals(keys.CAPACITY_LEASES)
        return sum(int(v) for v in raw)

    async def queued_by_model(self) -> dict[str, int]:
        """model → tasks of it waiting in the queue."""
        raw = await self._r.hgetall(keys.MODEL_QUEUED)
        return {text(k): int(v) for k, v in raw.items() if int(v) > 0}

    async def virtual_times(self) -> dict[str, float]:
        """user → virtual time (normalised GPU-seconds received, weight applied): the
        start of their next queued task, or where they left off if none is queued."""
        out = {text(k): float(v) for k, v in (await self._r.hgetall(keys.QUEUE_VTIME)).items()}
        heads: list[tuple[str, float]] = await self._r.zrange(  # type: ignore[assignment]
            keys.QUEUE_USERS, 0, -1, withscores=True)
        for user, head in heads:
            out[user] = float(head)
        return out

    async def model_run_s(self) -> dict[str, float]:
        """model → moving-average seconds a completed task held its GPUs."""
        raw = await self._r.hgetall(keys.MODEL_RUN_S)
        return {text(k): float(v) for k, v in raw.items()}

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
        res = [text(x) for x in await _PROMOTE.run(
            self._r, 2, keys.QUEUE_DELAYED, keys.QUEUE_DELAYED_USERS, now_ms())]
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
        users = [str(u) for u in await self._r.zrange(keys.QUEUE_USERS, 0, -1)]
        if not users:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.zcard(keys.user_queue(u))
            lens = await pipe.execute()
        return {u: int(n) for u, n in zip(users, lens, strict=True) if int(n)}

    async def user_running(self) -> dict[str, int]:
        raw = await self._r.hgetall(keys.USER_RUNNING)
        return {text(k): int(v) for k, v in raw.items()}

    async def announce_move(self) -> None:
        """Tell API processes that positions may have changed."""
        await self._r.publish(keys.QUEUE_MOVED, "1")
