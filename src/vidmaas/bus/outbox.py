"""Publishing outbox events exactly once, in order per task (DESIGN §4, ``db.outbox``).

Guarantees:
- ``publish_entry`` writes an outbox event to the task's stream and the global stream
  like ``bus.events.publish`` (same fields, the task stream's entry id is the event id
  clients resume from), and in the same Lua script records the event's per-task
  ``seq`` in the task's outbox mark (``keys.task_outbox``). An event whose ``seq`` the
  mark already covers is not written again (``duplicate``): two publishers racing on
  one row, a publisher that died after the write and before deleting the row, and a
  sweep after a hard kill all write it once.
- Order per task: without ``force`` an event is written only if it is the next one
  after the mark (``seq`` = mark + 1, or 1 for a task without a mark); otherwise the
  answer is ``gap`` and nothing is written, because an older event of the task is still
  in the outbox. ``force`` (the drain, which publishes a task's rows oldest first from
  the database, where every older row is already gone) writes any ``seq`` above the
  mark: after Redis lost the mark with its streams, the oldest row left is the next.
- On a single Redis the check, both stream writes and the mark are one script, so
  atomic. On Redis Cluster the keys live in different slots: the steps run one after
  another (mark read, task stream, mark, global stream), so a crash between them can
  repeat an event on the task stream (at least once there; the relay is idempotent by
  event id on the global one).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from vidmaas.bus import keys
from vidmaas.bus.events import StreamLimits, text
from vidmaas.bus.scripts import Script
from vidmaas.domain.events import Event, encode

_PUBLISH_OUTBOX_LUA = """
-- KEYS: 1 task stream, 2 global stream, 3 task outbox mark
-- ARGV: 1 task maxlen, 2 global maxlen, 3 task ttl, 4 seq, 5 force ('1'/'0'),
--       6 n fields, fields…
local seq = tonumber(ARGV[4])
local last = tonumber(redis.call('HGET', KEYS[3], 'seq') or '0')
if seq <= last then return {'duplicate', redis.call('HGET', KEYS[3], 'id') or ''} end
if ARGV[5] ~= '1' and seq ~= last + 1 then return {'gap', ''} end
local n = tonumber(ARGV[6])
local fields = {}
for i = 7, 6 + 2 * n do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
fields[#fields + 1] = 'event_id'
fields[#fields + 1] = id
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
redis.call('HSET', KEYS[3], 'seq', seq, 'id', id)
redis.call('EXPIRE', KEYS[3], ARGV[3])
return {'published', id}
"""
_PUBLISH_OUTBOX = Script(_PUBLISH_OUTBOX_LUA)


class Outcome(enum.StrEnum):
    PUBLISHED = "published"
    """Written now."""
    DUPLICATE = "duplicate"
    """Written before (by this publisher or another): nothing written now."""
    GAP = "gap"
    """An older event of the task has to go first: nothing written (never with force)."""


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    event_id: str | None
    """The event id written now, or the task's newest outbox event id for a duplicate
    (None when unknown, and for a gap)."""


async def publish_entry(client: aioredis.Redis, event: Event, *, seq: int, force: bool = False,
                        limits: StreamLimits) -> Result:
    """Write the task's ``seq``-th outbox event once (see the module docstring)."""
    fields = encode(event)
    task_key, mark = keys.task_events(event.task_id), keys.task_outbox(event.task_id)
    if limits.cluster:
        return await _publish_cluster(client, event, fields, seq=seq, force=force,
                                      limits=limits)
    flat: list[str | int] = [limits.task_maxlen, limits.global_maxlen, limits.task_ttl_s,
                             seq, "1" if force else "0", len(fields)]
    for k, v in fields.items():
        flat += [k, v]
    raw = await _PUBLISH_OUTBOX.run(client, 3, task_key, keys.EVENTS, mark, *flat)
    outcome, event_id = (text(p) for p in raw)
    return Result(Outcome(outcome), event_id or None)


async def _publish_cluster(client: aioredis.Redis, event: Event, fields: dict[str, str], *,
                           seq: int, force: bool, limits: StreamLimits) -> Result:
    r: Any = client
    task_key, mark = keys.task_events(event.task_id), keys.task_outbox(event.task_id)
    last = int(await r.hget(mark, "seq") or 0)
    if seq <= last:
        return Result(Outcome.DUPLICATE, text(await r.hget(mark, "id") or "") or None)
    if not force and seq != last + 1:
        return Result(Outcome.GAP, None)
    event_id = text(await r.xadd(task_key, fields, maxlen=limits.task_maxlen, approximate=True))
    await r.expire(task_key, limits.task_ttl_s)
    await r.hset(mark, mapping={"seq": seq, "id": event_id})
    await r.expire(mark, limits.task_ttl_s)
    await r.xadd(keys.EVENTS, {**fields, "event_id": event_id}, maxlen=limits.global_maxlen,
                 approximate=True)
    return Result(Outcome.PUBLISHED, event_id)


async def marked_seq(client: aioredis.Redis, task_id: str) -> int:
    """The ``seq`` of the task's newest outbox event on its streams (0: none known)."""
    return int(await client.hget(keys.task_outbox(task_id), "seq") or 0)
