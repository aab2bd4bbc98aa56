"""Publishing and reading events (DESIGN §4).

Guarantees:
- ``publish`` writes one event to the task's stream and to the global stream
  atomically on a single Redis (one Lua script, which Redis runs as one
  transaction), and task stream first then global on Redis Cluster. It returns the
  task stream's entry id: the event id clients resume from. The global entry
  carries that id in its ``event_id`` field, so the relay can be idempotent by it.
- Task streams are capped (``MAXLEN ~``) and expire ``task_stream_ttl_s`` after
  their last event; the global stream is capped too.
- ``publish_sync`` is the same for the job runtime, which uses a blocking client
  from its worker threads; ``publish_fenced_sync`` (pool workers) writes only while
  the task's fence names the writer, in the same script, and raises ``FenceLost`` (a
  Redis error, retried like one) when the fence is gone with Redis's data.
- The readers here are the only place that reads a task's stream: ``read_task_events``
  and ``read_range`` return events strictly after a given id, in order; ``last_entry``
  the newest; ``attempt_result`` the terminal event of the task's current attempt;
  ``superseded`` whether an event belongs to an earlier attempt. Every reader skips
  (and logs) entries that are not valid events.
- ``id_key`` orders stream ids; ``text`` is the one bytes→str helper for Redis replies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from vidmaas.bus import keys
from vidmaas.bus.scripts import Script
from vidmaas.domain.events import Event, EventType, MalformedEvent, decode, encode

log = logging.getLogger(__name__)

PUBLISH_BODY = """
-- KEYS: 1 task stream, 2 global stream[, 3 fence]; ARGV: 1 task maxlen, 2 global maxlen,
--       3 task ttl, 4 n fields, fields…[, expected fence]
if #KEYS == 3 then
  local fence = redis.call('GET', KEYS[3])
  if not fence then return 0 end  -- no fence at all: Redis lost it (a taken-back one is '-')
  if fence ~= ARGV[#ARGV] then return false end
end
local n = tonumber(ARGV[4])
local fields = {}
for i = 5, 4 + 2 * n do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
fields[#fields + 1] = 'event_id'
fields[#fields + 1] = id
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
return id
"""
_PUBLISH = Script(PUBLISH_BODY)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    task_maxlen: int = 2000
    task_ttl_s: int = 3 * 24 * 3600
    global_maxlen: int = 1_000_000
    cluster: bool = False


def publish_args(event: Event, limits: StreamLimits) -> tuple[list[str], list[str | int]]:
    """The keys and arguments of ``PUBLISH_BODY`` for ``event`` (no fence)."""
    fields = encode(event)
    flat: list[str | int] = [limits.task_maxlen, limits.global_maxlen, limits.task_ttl_s,
                             len(fields)]
    for k, v in fields.items():
        flat += [k, v]
    return [keys.task_events(event.task_id), keys.EVENTS], flat


def text(value: str | bytes) -> str:
    """A Redis reply value as text (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value


_s = text


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair (``"12-3"`` → ``(12, 3)``; ``"5"`` is ``5-0``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


ATTEMPT_MARKERS = frozenset({EventType.QUEUED, EventType.DISPATCHED})
"""Events that begin a new attempt of a task (a retry is re-``queued``, then ``dispatched``)."""


async def publish(client: aioredis.Redis, event: Event,
                  limits: StreamLimits = StreamLimits()) -> str:
    """Write ``event`` to both streams; return its event id."""
    if limits.cluster:
        fields = encode(event)
        task_key = keys.task_events(event.task_id)
        r: Any = client
        event_id = _s(await r.xadd(task_key, fields, maxlen=limits.task_maxlen,
                                   approximate=True))
        await r.expire(task_key, limits.task_ttl_s)
        await r.xadd(keys.EVENTS, {**fields, "event_id": event_id},
                     maxlen=limits.global_maxlen, approximate=True)
        return event_id
    key_list, argv = publish_args(event, limits)
    result = await _PUBLISH.run(client, len(key_list), *key_list, *argv)
    return _s(result)


def publish_sync(client: redis.Redis, event: Event, limits: StreamLimits = StreamLimits()) -> str:
    """``publish`` for blocking clients (the job runtime)."""
    if limits.cluster:
        fields = encode(event)
        task_key = keys.task_events(event.task_id)
        rs: Any = client
        event_id = _s(rs.xadd(task_key, fields, maxlen=limits.task_maxlen, approximate=True))
        rs.expire(task_key, limits.task_ttl_s)
        rs.xadd(keys.EVENTS, {**fields, "event_id": event_id},
                maxlen=limits.global_maxlen, approximate=True)
        return event_id
    key_list, argv = publish_args(event, limits)
    return _s(_PUBLISH.run_sync(client, len(key_list), *key_list, *argv))


def publish_fenced_sync(client: redis.Redis, event: Event, *, fence: str,
                        limits: StreamLimits = StreamLimits()) -> str | None:
    """``publish_sync`` for a pool worker: written only while the task's fence
    (``keys.task_fence``) equals ``fence`` — checked in the same script on a single
    Redis, just before on Redis Cluster. None when the event was dropped (the fence
    names another worker or attempt); ``FenceLost`` when there is no fence at all
    (Redis lost its data: a dispatcher gives it back, so the caller may retry)."""
    fence_key = keys.task_fence(event.task_id)
    if limits.cluster:
        current = client.get(fence_key)
        if current is None:
            raise FenceLost(f"task {event.task_id} has no fence")
        if _s(current) != fence:
            return None
        return publish_sync(client, event, limits)
    key_list, argv = publish_args(event, limits)
    result = _PUBLISH.run_sync(client, 3, *key_list, fence_key, *argv, fence)
    if result == 0:
        raise FenceLost(f"task {event.task_id} has no fence")
    return None if result is None else _s(result)


class FenceLost(redis.exceptions.RedisError):
    """A fenced publish found no fence at all: Redis lost its data, and the dispatcher's
    rebuild gives the fence back. A Redis error, so callers that retry those retry it."""


def parse_entries(entries: list[tuple[str | bytes, dict[str | bytes, str | bytes]]],
                  ) -> list[tuple[str, Event]]:
    """Decoded (id, event) pairs of stream entries; invalid entries are logged and skipped."""
    out: list[tuple[str, Event]] = []
    for raw_id, fields in entries:
        entry_id = _s(raw_id)
        try:
            out.append((entry_id, decode(fields)))
        except MalformedEvent as e:
            log.warning("skipping malformed entry %s: %s", entry_id, e)
    return out


async def read_task_events(client: aioredis.Redis, task_id: str, *, after: str = "0-0",
                           block_ms: int | None = None, count: int = 500,
                           ) -> list[tuple[str, Event]]:
    """Events of one task strictly after ``after`` (``0-0``: from the start)."""
    key = keys.task_events(task_id)
    resp = cast(Any, await client.xread({key: after}, count=count, block=block_ms))
    if not resp:
        return []
    _, entries = resp[0]
    return parse_entries(entries)


async def last_entry(client: aioredis.Redis, task_id: str,
                     ) -> tuple[str | None, Event | None]:
    """The newest entry id of a task's stream and its event (None if malformed or absent)."""
    raw = cast(Any, await client.xrevrange(keys.task_events(task_id), count=1))
    if not raw:
        return None, None
    parsed = parse_entries(raw)
    return _s(raw[0][0]), parsed[0][1] if parsed else None


async def newest_global_id(client: aioredis.Redis) -> str | None:
    """The id of the newest entry of the global stream, if any."""
    raw = cast(Any, await client.xrevrange(keys.EVENTS, count=1))
    return _s(raw[0][0]) if raw else None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a task's stream: its valid events, the id of the last entry read
    (malformed entries included; None when the page is empty), and whether it was full
    (more may follow)."""

    events: list[tuple[str, Event]]
    last_id: str | None
    full: bool


async def read_page(client: aioredis.Redis, task_id: str, *, after: str, upto: str = "+",
                    count: int = 500) -> Page:
    """Up to ``count`` entries with ``after`` < id ≤ ``upto``."""
    raw = cast(Any, await client.xrange(keys.task_events(task_id), min="(" + after, max=upto,
                                        count=count))
    return Page(parse_entries(raw), _s(raw[-1][0]) if raw else None, len(raw) >= count)


async def read_range(client: aioredis.Redis, task_id: str, *, after: str, upto: str = "+",
                     page: int = 500) -> list[tuple[str, Event]]:
    """Every event with ``after`` < id ≤ ``upto``, read in pages of ``page``."""
    out: list[tuple[str, Event]] = []
    while True:
        got = await read_page(client, task_id, after=after, upto=upto, count=page)
        out += got.events
        if not got.full or got.last_id is None:
            return out
        after = got.last_id


async def attempt_result(client: aioredis.Redis, task_id: str, *, scan: int = 500,
                         ) -> Event | None:
    """The terminal event published for the task's current attempt, if any: the newest
    terminal event not older than the newest ``dispatched`` (within the last ``scan``)."""
    raw = cast(Any, await client.xrevrange(keys.task_events(task_id), count=scan))
    for _id, event in parse_entries(list(raw)):
        if event.type.terminal:
            return event
        if event.type is EventType.DISPATCHED:
            return None
    return None


async def superseded(client: aioredis.Redis, task_id: str, event_id: str, *,
                     scan: int = 2000) -> bool:
    """True if the task's stream holds a ``queued`` or ``dispatched`` after ``event_id``:
    the event belongs to an earlier attempt than the task's current one."""
    raw = cast(Any, await client.xrange(keys.task_events(task_id), min=f"({event_id}",
                                        count=scan))
    markers = {m.value for m in ATTEMPT_MARKERS}
    return any(f.get("type", "") in markers for _, f in raw)
