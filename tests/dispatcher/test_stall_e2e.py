"""The stall rule end to end on a CPU: a real 2-rank gloo job whose rank 1 stops after its
first step, so rank 0 waits in the next ``all_gather`` while the job's parent keeps
sending heartbeats. The relay records the steps, the watchdog sees them stop, kills the
whole job (torchrun's ranks included) and retries it; the retry completes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.dispatcher.dispatch_support import World, database, eventually, make_settings, running
from tests.relay.support import running as relaying
from vidmaas.bus.events import read_task_events
from vidmaas.config import RelaySettings, StorageSettings
from vidmaas.dispatcher.executors.local import LocalExecutor
from vidmaas.domain.events import EventType
from vidmaas.domain.models import ModelRegistry
from vidmaas.relay.service import Relay

STALL_FLOOR_S = 5.0


def _two_rank_registry() -> ModelRegistry:
    """tiny-t2v as a 2-GPU CFG-parallel model (each rank one guidance branch, gloo)."""
    return ModelRegistry([
        m.model_copy(update={"nproc_per_node": 2, "strategy": "cfg_parallel"})
        if m.id == "tiny-t2v" else m for m in ModelRegistry.load().values()])


def _processes_of(task_id: str) -> list[int]:
    """Live processes whose environment names the task (the job's, its ranks')."""
    needle = f"VIDMAAS_TASK_ID={task_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat[stat.rindex(")") + 2] not in "ZX":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
async def test_a_rank_stuck_in_a_collective_is_stopped_as_stalled_and_the_retry_completes(
        tmp_path: Path, sqlite_url: str, redis: aioredis.Redis, redis_url: str,
        tiny_model_root: Path, local_storage: StorageSettings) -> None:
    settings = make_settings(db_url=sqlite_url, redis_url=redis_url, capacity=2,
                             max_attempts=2, reconcile_interval_s=0.25, stall_factor=5,
                             stall_floor_s=STALL_FLOOR_S)
    settings.local.work_root = tmp_path / "jobs"
    settings.model_root = tiny_model_root
    settings.storage = local_storage
    settings.runtime.heartbeat_interval_s = 0.5
    settings.runtime.collective_timeout_s = 300  # the watchdog, not the timeout, ends it
    started = time.monotonic()
    async with database(sqlite_url) as sessions:
        world = World(settings=settings, sessions=sessions, redis=redis)
        task = await world.submit("alice")
        executor = LocalExecutor(settings=settings, extra_env={
            "VIDMAAS_TEST_FAULT": "hang_at_step=1,hang_rank=1,hang_attempt=1",
            "VIDMAAS_PROGRESS_INTERVAL_S": "0"})
        relay = Relay(world.services(), consumer_name="r1",
                      settings=RelaySettings(send_webhooks=False))
        dispatcher = world.dispatcher(executor, registry=_two_rank_registry())
        async with relaying(relay), running(dispatcher):
            await eventually(lambda: _stepped(world, task.id), timeout_s=50, interval_s=0.1)
            first_job = _processes_of(task.id)  # sh, run, torchrun and its two ranks
            await eventually(lambda: _attempt_two(world, task.id), timeout_s=30,
                             interval_s=0.1)
            # The first attempt's job is gone, ranks and all (they live in sessions of
            # their own: a SIGKILL of the job's process group alone would miss them).
            await eventually(lambda: _all_gone(first_job), timeout_s=5)
            await eventually(lambda: _finished(world, task.id), timeout_s=50,
                             interval_s=0.1)
            # The second job exits once it has reported: nothing of the task lives on.
            await eventually(lambda: _none_of(task.id), timeout_s=20, interval_s=0.1)
        await executor.close()
        final = await world.get(task.id)
    took_s = time.monotonic() - started
    print(f"stall e2e: {took_s:.1f}s from submit to the retry's job ending")
    assert (final.status, final.attempts) == ("completed", 2), final.error_message
    events = await read_task_events(redis, task.id)
    retried = [e.data["message"] for _, e in events if e.type is EventType.LOG
               and "failed (stalled)" in str(e.data.get("message"))]
    assert retried == ["attempt 1 failed (stalled); retrying in 0s"]
    # Between attempt 1's last step and its stop the job kept beating: heartbeats alone
    # would never have stopped it.
    ids = [(int(eid.split("-")[0]) / 1000, e) for eid, e in events]
    dispatched = [t for t, e in ids if e.type is EventType.DISPATCHED]
    first_steps = [t for t, e in ids if e.type is EventType.PROGRESS and t < dispatched[1]
                   and e.data.get("stage") == "denoise" and e.data["step"] >= 1]
    beats = [t for t, e in ids if e.type is EventType.HEARTBEAT
             and first_steps[-1] < t < dispatched[1]]
    assert len(beats) >= 4, (len(beats), dispatched[1] - first_steps[-1])
    assert STALL_FLOOR_S <= dispatched[1] - first_steps[-1] < STALL_FLOOR_S + 10
    assert len(first_job) >= 5, first_job


async def _stepped(world: World, task_id: str) -> bool:
    task = await world.get(task_id)
    return task.attempts == 1 and task.last_step_at is not None


async def _all_gone(pids: list[int]) -> bool:
    return not _processes_of_any(pids)


async def _none_of(task_id: str) -> bool:
    return not _processes_of(task_id)


def _processes_of_any(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] not in "ZX":
            out.append(pid)
    return out


async def _attempt_two(world: World, task_id: str) -> bool:
    return (await world.get(task_id)).attempts >= 2


async def _finished(world: World, task_id: str) -> bool:
    await asyncio.sleep(0)
    return (await world.get(task_id)).status in ("completed", "failed", "cancelled")
