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
wake-up signal. The scripts are in ``bus.pools_lua`` and go by digest (``bus.scripts``).
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
from vidmaas.bus.pools_lua import (
    ASSIGN_LUA,
    DRAIN_LUA,
    FENCE_OUT_LUA,
    HEARTBEAT_LUA,
    LEAVE_LUA,
    READY_LUA,
    RESERVE_LUA,
    RETIRE_LUA,
    UNCLAIM_LUA,
)
from vidmaas.bus.scripts import Script

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


_RESERVE = Script(RESERVE_LUA)
_HEARTBEAT = Script(HEARTBEAT_LUA)
_READY = Script(READY_LUA)
_ASSIGN = Script(ASSIGN_LUA)
_UNCLAIM = Script(UNCLAIM_LUA)
_DRAIN = Script(DRAIN_LUA)
_LEAVE = Script(LEAVE_LUA)
_RETIRE = Script(RETIRE_LUA)
_FENCE_OUT = Script(FENCE_OUT_LUA)


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
        ok = await _RESERVE.run(
            self._r, 3, keys.CAPACITY_LEASES, keys.POOL_WORKERS, keys.POOL_ALIVE,
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
        ok = await _ASSIGN.run(
            self._r, 3, keys.POOL_WORKERS, keys.task_fence(task_id),
            keys.worker_inbox(worker_id), worker_id, task_id, attempt, payload, FENCE_TTL_S)
        return bool(ok)

    async def unclaim(self, worker_id: str, task_id: str) -> bool:
        """Put back to idle a worker that a claim of ``task_id`` marked busy but that was
        never sent the assignment (its dispatcher died, or the task was cancelled)."""
        ok = await _UNCLAIM.run(
            self._r, 3, keys.POOL_WORKERS, keys.POOL_IDLE_PREFIX, keys.QUEUE_SIGNAL,
            worker_id, task_id, now_ms(), SIGNAL_KEEP)
        return bool(ok)

    async def drain(self, worker_id: str, *, only_if_idle: bool = False) -> bool:
        """Ask a worker to exit after what it is doing; no new assignment reaches it.
        With ``only_if_idle``, only an idle worker is drained (reclaiming GPUs)."""
        exit_msg = Assignment(task_id=None, attempt=0, args=[], exit=True).encode()
        ok = await _DRAIN.run(
            self._r, 3, keys.POOL_WORKERS, keys.POOL_IDLE_PREFIX, keys.worker_inbox(worker_id),
            worker_id, now_ms(), exit_msg, "1" if only_if_idle else "0")
        return bool(ok)

    async def retire(self, worker_id: str) -> tuple[str | None, int | None]:
        """Forget an ended worker and free its GPUs; (task, attempt) it was busy with. The
        same script clears the task's fence if it names this worker (a lingering worker
        publishes nothing more for it). Raises if its task changed under all ten tries."""
        for _ in range(10):  # the record's task changes under us only on a race
            raw = await self._r.hget(keys.POOL_WORKERS, worker_id)
            task = _parse(worker_id, text(raw), None).task_id if raw is not None else None
            res = await _RETIRE.run(
                self._r, 7, keys.POOL_WORKERS, keys.POOL_ALIVE, keys.POOL_IDLE_PREFIX,
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
        return bool(await _FENCE_OUT.run(self._r, 1, keys.task_fence(task_id),
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
        state = text(_HEARTBEAT.run_sync(
            self._r, 6, keys.POOL_WORKERS, keys.POOL_ALIVE, keys.CAPACITY_LEASES,
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
        ok = _READY.run_sync(self._r, 4, keys.POOL_WORKERS, keys.POOL_IDLE_PREFIX,
                             keys.QUEUE_SIGNAL, keys.POOL_ALIVE, self.worker_id, now,
                             SIGNAL_KEEP, now + int(self.lease_s * 1000),
                             "1" if finished_task else "0")
        self._done += 1 if finished_task else 0
        self._state, self._task = (WorkerState.IDLE if ok else WorkerState.DRAINING), None
        return bool(ok)

    def leave(self, *, finished_task: bool = False) -> bool:
        """Stop taking assignments before exiting by itself (a limit reached, a failure):
        ``draining`` with no task; False if the worker was already retired."""
        ok = _LEAVE.run_sync(self._r, 2, keys.POOL_WORKERS, keys.POOL_IDLE_PREFIX,
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
