"""Every Redis key vidmaas uses, under the prefix ``vidmaas:``.

Guarantees: no other module spells a key; changing a name here changes it everywhere.
The queue and capacity keys share the hash tag ``{q}`` so that their Lua scripts,
which must be atomic over all of them, also run on Redis Cluster (one slot). The
queue scripts build per-user list names from ``USER_QUEUE_PREFIX``, which is why
those lists carry the same tag.
"""

from __future__ import annotations

PREFIX = "vidmaas:"

# Event streams (DESIGN §4).
EVENTS = PREFIX + "events"
"""The global stream, read by the relay's consumer group."""
EVENTS_DEAD = PREFIX + "events:dead"
"""Malformed events moved aside by the relay."""
RELAY_GROUP = "relay"
"""Consumer group name of the relays on ``EVENTS``."""


def task_events(task_id: str) -> str:
    """One task's own stream, read by WebSocket/SSE clients."""
    return f"{PREFIX}task:{task_id}:events"


# Queue (round-robin across users, FIFO within a user).
_Q = PREFIX + "{q}:"
QUEUE_USERS = _Q + "users"
"""LIST: the ring of users with queued tasks, in round-robin order (head goes next)."""
QUEUE_CLAIMS = _Q + "claims"
"""ZSET task_id → lease expiry (ms): entries a dispatcher took but has not acknowledged."""
QUEUE_CLAIM_OWNER = _Q + "claim-owner"
"""HASH task_id → dispatcher id holding the claim, and the user it came from."""
QUEUE_SIGNAL = _Q + "signal"
"""LIST used as a wake-up signal: pushed on enqueue and on capacity release."""
QUEUE_GPUS = _Q + "gpus"
"""HASH task_id → GPUs its job will need (set at enqueue, read by admission)."""
QUEUE_DELAYED = _Q + "delayed"
"""ZSET task_id → time (ms) a retry becomes due; moved into the queue when due."""
QUEUE_DELAYED_USERS = _Q + "delayed-users"
"""HASH task_id → user of a delayed retry."""
USER_QUEUE_PREFIX = _Q + "user:"


def user_queue(user_id: str) -> str:
    """LIST: one user's queued task ids, oldest first."""
    return USER_QUEUE_PREFIX + user_id


# Capacity.
CAPACITY_LEASES = _Q + "leases"
"""HASH task_id → GPUs held by that task's job."""
USER_RUNNING = _Q + "user-running"
"""HASH user → number of that user's tasks holding capacity."""
LEASE_OWNERS = _Q + "lease-users"
"""HASH task_id → user, so a release can decrement the right user."""


def cancel_flag(task_id: str) -> str:
    """Set when a task is to stop; the runtime checks it between denoising steps."""
    return f"{PREFIX}task:{task_id}:cancel"


def idempotency(user_id: str, key: str) -> str:
    """Short-lived lock while a create with an Idempotency-Key is in flight."""
    return f"{PREFIX}idem:{user_id}:{key}"


def stream_token(token_hash: str) -> str:
    """A short-lived browser token for WebSocket/SSE URLs."""
    return f"{PREFIX}stream-token:{token_hash}"


QUEUE_MOVED = PREFIX + "queue:moved"
"""Pub/Sub channel: the queue changed, positions of watched tasks may have moved."""

DISPATCHERS = PREFIX + "dispatchers"
"""ZSET dispatcher id → last-seen time (ms), for liveness and metrics."""

TEST_HOOK = PREFIX + "test:pause"
"""HASH step → seconds: crash tests pause a dispatcher at a named step."""
