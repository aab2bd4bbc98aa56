"""What the reconciler needs to rebuild Redis state from the database (DESIGN §8).

Guarantees:
- ``server_run_id`` names the Redis server process: it changes on every restart (with
  or without its data) and on a failover, which is what makes ``QUEUE_EPOCH`` stale.
- ``restore_lease`` gives an active task its capacity lease again (GPUs, its user's
  running count and GPUs held) in one script, only if the task holds none: running it
  twice, or for a task whose lease survived, changes nothing.
- ``set_epoch`` records that this server's leases were rebuilt; ``epoch_and_run_id``
  reads it with the server's run id in one round trip.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from vidmaas.bus import keys
from vidmaas.bus.events import text

_RESTORE_LEASE_LUA = """
-- KEYS: 1 leases, 2 lease info, 3 user running, 4 user gpus
-- ARGV: 1 task, 2 user, 3 gpus, 4 start ms, 5 model
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1
then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1],
           table.concat({ARGV[2], ARGV[3], '0', ARGV[4], ARGV[5], ''}, '|'))
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
redis.call('HINCRBY', KEYS[4], ARGV[2], tonumber(ARGV[3]))
return 1
"""


async def server_run_id(client: aioredis.Redis) -> str:
    """The run id of the Redis server ``client`` talks to."""
    info = await client.info("server")
    return str(info["run_id"])


async def epoch_and_run_id(client: aioredis.Redis) -> tuple[str | None, str]:
    """The stored epoch and ``server_run_id``, in one round trip: the epoch is current when they
    are equal (this server's leases were rebuilt)."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(keys.QUEUE_EPOCH)
        pipe.info("server")
        value, info = await pipe.execute()
    return (None if value is None else text(value)), str(info["run_id"])


async def set_epoch(client: aioredis.Redis, run_id: str) -> None:
    await client.set(keys.QUEUE_EPOCH, run_id)


async def restore_lease(client: aioredis.Redis, *, task_id: str, user_id: str, gpus: int,
                        start_ms: int, model: str) -> bool:
    """Lease ``gpus`` to an active task that holds none; True if it had to. The lease
    charges its user from ``start_ms`` when released (no estimate is charged twice)."""
    n = await client.eval(_RESTORE_LEASE_LUA, 4, keys.CAPACITY_LEASES, keys.LEASE_INFO,
                          keys.USER_RUNNING, keys.USER_GPUS, task_id, user_id, gpus,
                          start_ms, model)
    return bool(n)
