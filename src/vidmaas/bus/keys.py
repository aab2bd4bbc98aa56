"""Every Redis key vidmaas uses, under the prefix ``vidmaas:``.

Guarantees: no other module spells a key; changing a name here changes it everywhere.
The queue and capacity keys share the hash tag ``{q}`` so that their Lua scripts,
which must be atomic over all of them, also run on Redis Cluster (one slot). The
queue scripts build per-user queue names from ``USER_QUEUE_PREFIX``, which is why
those keys carry the same tag.
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


# Queue (weighted fair share across users, priority then FIFO within a user).
_Q = PREFIX + "{q}:"
QUEUE_USERS = _Q + "fair:users"
"""ZSET user → virtual start time of the user's next queued task: the users with queued
tasks; the smallest goes next."""
QUEUE_VTIME = _Q + "fair:vtime"
"""HASH user → virtual time (normalised GPU-seconds received) of a user with nothing
queued, so leaving the queue and coming back never earns credit."""
QUEUE_VNOW = _Q + "fair:vnow"
"""STRING: the system virtual time (start tag of the latest admitted task); a user who
starts queueing begins at max(own virtual time, this)."""
QUEUE_SEQ = _Q + "fair:seq-counter"
"""STRING counter: the order in which users started queueing (breaks ties)."""
USER_SHARES = _Q + "fair:shares"
"""HASH user → ``weight|gpu_cap``: the fairness weight and GPUs-at-once quota of a user
(0: no cap of their own)."""
QUEUE_CLAIMS = _Q + "claims"
"""ZSET task_id → lease expiry (ms): entries a dispatcher took but has not acknowledged."""
QUEUE_CLAIM_OWNER = _Q + "claim-owner"
"""HASH task_id → dispatcher id holding the claim, and the user it came from."""
QUEUE_SIGNAL = _Q + "signal"
"""LIST used as a wake-up signal: pushed on enqueue and on capacity release."""
QUEUE_GPUS = _Q + "gpus"
"""HASH task_id → GPUs its job will need (set at enqueue, read by admission)."""
QUEUE_COST = _Q + "cost"
"""HASH task_id → estimated cost in GPU-seconds (GPUs × the model's typical run time),
fixed at enqueue: what admission charges, and what queue positions count."""
QUEUE_MODEL = _Q + "model"
"""HASH task_id → model id of a queued task."""
QUEUE_DELAYED = _Q + "delayed"
"""ZSET task_id → time (ms) a retry becomes due; moved into the queue when due."""
QUEUE_DELAYED_USERS = _Q + "delayed-users"
"""HASH task_id → user of a delayed retry."""
USER_QUEUE_PREFIX = _Q + "fair:"
"""Prefix of the per-user keys below (the queue scripts build them from it)."""
QUEUE_STARTS = USER_QUEUE_PREFIX + "starts"
"""ZSET of every queued task by its virtual start (``base + cost before it / weight``),
members ``<user seq, 16 digits>|<task id>``: a position is a rank in it. The scripts
build it from ``USER_QUEUE_PREFIX`` and rebuild it from the users' queues when absent."""


def user_queue(user_id: str) -> str:
    """ZSET: one user's queued task ids scored by their order key (enqueue time in ms,
    moved earlier for a higher priority class)."""
    return USER_QUEUE_PREFIX + "o:" + user_id


def user_queue_costs(user_id: str) -> str:
    """ZSET: the same tasks scored by the summed cost of the user's tasks before them
    since the user started queueing (their virtual start, before the weight)."""
    return USER_QUEUE_PREFIX + "p:" + user_id


def user_fair_state(user_id: str) -> str:
    """HASH ``base`` (virtual time at cost 0), ``next`` (cost sum so far) and ``seq``
    (when the user started queueing) of a user with queued tasks."""
    return USER_QUEUE_PREFIX + "h:" + user_id


# Capacity.
CAPACITY_LEASES = _Q + "leases"
"""HASH task_id → GPUs held by that task's job."""
LEASE_INFO = _Q + "lease-info"
"""HASH task_id → ``user|gpus|cost|start_ms|model`` of a held lease, so a release
decrements the right user and charges what the lease really cost."""
USER_RUNNING = _Q + "user-running"
"""HASH user → number of that user's tasks holding capacity."""
USER_GPUS = _Q + "user-gpus"
"""HASH user → GPUs that user's tasks hold."""
QUEUE_EPOCH = _Q + "epoch"
"""STRING: the run id of the Redis server whose capacity leases were last rebuilt from
the database (``dispatcher.recovery``). Admission claims nothing while it names another
server (this one restarted, or lost its data): leases lost with it are restored first,
so capacity is never exceeded."""
MODEL_RUN_S = _Q + "model-run-s"
"""HASH model → moving average of how long a completed task held its GPUs (seconds)."""


# Warm pools (DESIGN §12): long-lived workers of one model each.
POOL_WORKERS = _Q + "pool:workers"
"""HASH worker id → ``model|gpus|state|since_ms|task|attempt|done``: every registered
pool worker (``starting``, ``idle``, ``busy`` or ``draining``)."""
POOL_ALIVE = _Q + "pool:alive"
"""ZSET worker id → lease expiry (ms), renewed by the worker's heartbeat."""
POOL_IDLE_PREFIX = _Q + "pool:idle:"
"""Prefix of the per-model idle sets (the claim script builds them from it)."""
MODEL_QUEUED = _Q + "model-queued"
"""HASH model → number of its tasks waiting in the queue."""
POOL_LEASE_PREFIX = "pool:"
"""Member-name prefix of a worker's GPUs in ``CAPACITY_LEASES`` (task ids never start so)."""


def pool_idle(model: str) -> str:
    """ZSET worker id → idle since (ms): a model's workers ready for an assignment."""
    return POOL_IDLE_PREFIX + model


def worker_inbox(worker_id: str) -> str:
    """LIST of assignments (JSON) for one worker, oldest first."""
    return f"{PREFIX}pool:{worker_id}:inbox"


def task_fence(task_id: str) -> str:
    """``worker|attempt`` that may publish for a pooled task; anything else is dropped."""
    return f"{PREFIX}task:{task_id}:fence"


def task_outbox(task_id: str) -> str:
    """HASH ``seq`` (the newest outbox event of the task on its streams) and ``id`` (its
    event id): what makes publishing an outbox row a second time a no-op
    (``bus.outbox``). Expires with the task's stream."""
    return f"{PREFIX}task:{task_id}:outbox"


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
