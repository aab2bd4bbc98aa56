"""The settings groups, one model per role or concern (``Settings`` nests them).

Guarantees:
- Each group is a plain ``BaseModel`` whose defaults are the embedded defaults; the
  range a value must lie in is checked here, when the settings are built.
- Every duration or size carries its unit in its name (``_s``, ``_ms``, ``_bytes``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

_QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"
"""A Kubernetes memory quantity (``512Mi``, ``8Gi``)."""
_LABEL_VALUE = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
"""A Kubernetes label value."""


class DatabaseSettings(BaseModel):
    """Where tasks, users and keys live."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    url: str = "sqlite+aiosqlite:///./.vidmaas/vidmaas.db"
    """SQLAlchemy async URL: ``postgresql+asyncpg://…`` in production,
    ``sqlite+aiosqlite:///path`` for the embedded default. ``postgresql://`` is
    accepted and rewritten to the asyncpg driver."""
    pool_size: int = 10
    """Connections kept open per process (PostgreSQL only)."""
    connect_timeout_s: float = 5.0
    """How long opening a PostgreSQL connection may take before the request that needed
    it fails with 503 ``database_unavailable`` (an unreachable server never hangs one)."""
    pool_timeout_s: float = 10.0
    """How long a request waits for a free pooled connection (PostgreSQL) before it
    fails with 503 ``database_unavailable``."""
    echo_sql: bool = False
    """Log every SQL statement (debugging only)."""


class RedisSettings(BaseModel):
    """Queue, event streams, cancel flags and capacity leases."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    url: str = "redis://127.0.0.1:6379/0"
    """``redis://`` or ``rediss://`` URL, password included if any."""
    cluster: bool = False
    """Redis Cluster: event writes become a pipeline instead of one transaction."""
    task_stream_maxlen: int = 2000
    """Approximate cap on entries kept in one task's event stream."""
    task_stream_ttl_s: int = 3 * 24 * 3600
    """How long a task's event stream is kept after the task ends."""
    global_stream_maxlen: int = 1_000_000
    """Approximate cap on the global event stream (consumed by the relay)."""


class StorageSettings(BaseModel):
    """Object storage for input images and output videos."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    url: str = "file://./.vidmaas/objects"
    """``s3://bucket/prefix`` or ``file:///absolute/dir`` (``file://./rel`` is relative
    to the working directory)."""
    s3_endpoint_url: str | None = None
    """S3 endpoint for S3-compatible services (MinIO, SeaweedFS, Ceph); None means AWS."""
    s3_public_endpoint_url: str | None = None
    """Endpoint used in presigned URLs handed to browsers, if it differs from the
    endpoint the services use (an ingress in front of the object store)."""
    s3_region: str = "us-east-1"
    """S3 region used for signing."""
    s3_access_key_id: SecretStr | None = None
    """Access key; None means the default AWS credential chain."""
    s3_secret_access_key: SecretStr | None = None
    """Secret key; None means the default AWS credential chain."""
    presign_ttl_s: int = 3600
    """Lifetime of a presigned download URL."""
    redirect_downloads: bool = True
    """Answer downloads with a redirect to a presigned URL when the store can make
    one; otherwise (or when False) stream the bytes through the API."""
    retry_attempts: int = Field(default=8, ge=1)
    """Attempts a job makes at fetching its input or uploading its video while the
    store is unreachable or answers 5xx (exponential backoff with jitter), before it
    fails retryably. The API does not wait: it answers 503 at once."""
    retry_total_s: float = Field(default=120.0, ge=0)
    """Seconds after a job's first fetch or upload attempt past which no new attempt
    starts."""


class ApiSettings(BaseModel):
    """The HTTP API role."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 8000
    """TCP port to bind."""
    max_upload_bytes: int = 20 * 1024 * 1024
    """Largest accepted request body for an upload (413 above it)."""
    max_image_pixels: int = 40_000_000
    """Largest accepted input image in pixels (width × height); guards against
    decompression bombs (422 above it)."""
    max_image_side_px: int = 8192
    """Largest accepted width or height of an input image."""
    max_prompt_chars: int = 10_000
    """Longest accepted prompt."""
    max_queued_per_user: int = 50
    """Tasks one user may have waiting (queued) at once, unless an admin set the user's
    own quota; 429 above it."""
    key_cache_ttl_s: float = 10.0
    """How long an API process remembers a key that authenticated (by its hash): a
    revoked or expired key, or a disabled user's key, stops working within this time
    (an entry never outlives the key's expiry). The key's ``last_used_at`` is written
    at most once per period per process. 0 looks every key up every time."""
    stream_token_ttl_s: int = 300
    """Lifetime of the short-lived token browsers use on WebSocket/SSE URLs."""
    stream_ping_interval_s: float = 15.0
    """Keep-alive ping interval on WebSocket and SSE connections."""
    stream_buffer_events: int = 256
    """Per-connection buffer; progress is coalesced and terminal events kept when full."""
    stream_read_block_ms: int = 2000
    """How long each blocked ``XREAD`` of the per-process stream reader waits before it
    loops when nothing arrives; a new key wakes it at once (``CLIENT UNBLOCK``), so this
    only sets how often an idle reader makes a round trip."""
    stream_read_max_events: int = 200
    """Most entries the stream reader takes from one task's stream per ``XREAD``; never
    more than half of ``stream_buffer_events``, so one read cannot fill a connection."""
    stream_backfill_page_events: int = 500
    """Page size of the ``XRANGE`` reads that back-fill a client joining a task behind
    the stream reader's position."""
    stream_terminal_grace_s: float = 2.0
    """How long a stream whose task row is terminal waits for the terminal event before
    it ends anyway."""
    stream_row_check_max_interval_s: float = 5.0
    """After a terminal event a stream checks the task row (a retryable failure sends the
    task back to ``queued``) at doubling intervals, from 0.1 s up to this."""
    stream_eta_min_interval_s: float = 1.0
    """Start estimates pushed on the streams are recomputed at most this often (1 s by
    default): each costs two Redis reads and one narrow query, however many clients
    watch."""
    stream_eta_refresh_s: float = 10.0
    """Estimates are refreshed this often even when the queue does not move (running
    tasks make progress); a push goes out only when one moved by over max(5 s, 10 %)."""
    stream_queue_coalesce_s: float = 0.02
    """After a queue move, wait this long so that a burst of moves costs one recompute of
    the watched tasks' queue positions."""
    stream_resume_max_tasks: int = 200
    """Most tasks a client may list when it resumes ``WS /v1/events`` (``?after=`` or
    the ``resume`` message); a longer list is refused with close code 4400."""
    stream_resume_wait_s: float = 10.0
    """How long ``WS /v1/events?resume=message`` waits for the client's ``resume``
    message before it closes with 4400."""
    cors_origins: list[str] = Field(default_factory=list)
    """Origins allowed to call the API from a browser (empty: same origin only)."""
    openai_default_model: str = "wan2.2-ti2v-5b"
    """Model used by ``POST /v1/videos`` when the request names none."""


class DispatcherSettings(BaseModel):
    """Admission, fairness, retries, watchdog and reconciler."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    per_user_running_cap: int = 2
    """Jobs one user may have dispatching or running at once."""
    max_attempts: int = 3
    """Attempts per task, counting the first, before an infrastructure failure is final."""
    retry_backoff_s: float = 5.0
    """Delay before the first retry; doubles each attempt."""
    heartbeat_timeout_s: float = 120.0
    """A running job silent for longer than this is treated as lost."""
    dispatching_timeout_s: float = 300.0
    """A task ``dispatching`` for longer than this is resolved by asking the executor."""
    pending_timeout_s: float = 900.0
    """A job whose pods stay Pending (unschedulable, image pull) longer than this fails."""
    task_deadline_s: float = 3600.0
    """Longest a task may run once dispatched, before it is cancelled and failed."""
    stall_factor: float = Field(default=5.0, ge=0)
    """A running task that reported a denoising step but no next one for this many times
    its expected step time (the registry's ``step_s``, else learnt from the model's
    recent run times) is stopped and retried as ``stalled`` (5 by default; 0 turns the
    rule off). Heartbeats cannot tell: a rank stuck in a collective keeps them coming."""
    stall_floor_s: float = Field(default=120.0, ge=0)
    """The stall rule never fires sooner than this after the last step (120 s by
    default), however short the expected step."""
    reconcile_interval_s: float = 30.0
    """Period of the reconciler and watchdog sweeps."""
    claim_lease_s: float = 60.0
    """A dispatcher's claim on a queue entry; an unacknowledged entry older than this
    is taken over by another dispatcher."""
    cancel_grace_s: float = 20.0
    """Time a job has to stop by itself after a cancel before it is stopped hard."""
    delete_unknown_jobs: bool = False
    """Delete jobs the database does not know (otherwise they are only reported)."""
    wake_max_s: float = 5.0
    """Longest the admission loop sleeps without a wake-up signal (5 s by default): it
    also wakes for the next due retry, and this bound keeps its blocking Redis wait
    under socket and proxy idle timeouts."""
    cancel_scan_interval_s: float = 1.0
    """Period of the scan for ``cancelling`` tasks, whose jobs get stopped (1 s by
    default): how long a cancel may wait before its job is told to stop."""
    requeue_grace_s: float = 10.0
    """Age a ``queued`` task missing from the queue must reach before the reconciler
    enqueues it (10 s by default), so it never races the api's enqueue or a retry
    being scheduled."""
    lease_grace_s: float = 10.0
    """Time a task that is no longer active must have been unchanged before the
    reconciler releases GPUs it still holds (10 s by default): whoever just finished
    or requeued it is releasing them right now."""
    stop_timeout_s: float = 10.0
    """How long a stopping dispatcher lets its loops finish the step they are in (a
    claim being dispatched, a job update) before cancelling them (10 s by default)."""


class OutboxSettings(BaseModel):
    """The event outbox: events stored with their status change, published after it."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    max_pending: int = Field(default=100_000, ge=1)
    """Most events the outbox holds while Redis cannot take them (100000 by default). At
    the bound a status change still commits, but its event is not stored (a warning is
    logged): the task's row stays right and clients see the status in their next
    snapshot, but its stream misses that event; ``/readyz`` answers 503 from the bound
    on. The count is only checked while publishing fails, never on the healthy path."""
    sweep_interval_s: float = Field(default=2.0, gt=0)
    """Period of the dispatcher's outbox sweep (2 s by default), which republishes what
    a crash or a Redis outage left in the outbox: how long an event may wait once Redis
    is back."""
    sweep_grace_s: float = Field(default=2.0, ge=0)
    """Age an outbox row must reach before the sweep publishes it (2 s by default); a
    younger one is being published by the role that wrote it."""
    sweep_batch: int = Field(default=500, ge=1)
    """Rows one sweep pass reads at most (the oldest first)."""


class QuotaSettings(BaseModel):
    """Every user's defaults: fairness weight, highest priority class, quotas. An admin
    overrides them per user (``/v1/admin/users/{id}``, ``vidmaas users update``); the
    queued-tasks quota's default is ``api.max_queued_per_user``."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    weight: float = Field(default=1.0, ge=0.01, le=100.0)
    """Fairness weight a new user gets (relative: a user of weight 2 receives twice the
    GPU-seconds of a user of weight 1 while both wait), from 0.01 to 100."""
    max_priority: Literal["low", "normal", "high"] = "normal"
    """Highest priority class a new user may ask for (``low``, ``normal``, ``high``)."""
    gpus_at_once: int | None = Field(default=None, ge=0)
    """GPUs one user's tasks may hold at once; None: only the global caps apply."""
    gpu_seconds_day: float | None = Field(default=None, ge=0)
    """GPU-seconds one user may use per UTC day (creates are refused above it, 429);
    None: no limit."""
    gpu_seconds_month: float | None = Field(default=None, ge=0)
    """GPU-seconds one user may use per UTC month (429 above it); None: no limit."""


class LocalExecutorSettings(BaseModel):
    """The local executor: jobs as process groups on this machine."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    work_root: Path = Path("./.vidmaas/jobs")
    """Parent of each job's fresh work directory."""
    keep_work_dirs: bool = False
    """Keep a job's work directory after it ends (debugging)."""
    log_tail_bytes: int = 4000
    """How much of a failed job's log is kept in the failure message."""


class KubeSettings(BaseModel):
    """The Kubernetes executor: one Kubeflow PyTorchJob per task, one LeaderWorkerSet per
    warm-pool worker."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    namespace: str = "vidmaas"
    """Namespace the PyTorchJobs are created in."""
    template_path: Path | None = None
    """A Jinja2 PyTorchJob template of the operator's own; None uses the shipped one."""
    crd_schema_path: Path | None = None
    """PyTorchJob CRD file to validate rendered manifests against; None skips the
    CRD check (the rendered manifest is still parsed and checked)."""
    pool_template_path: Path | None = None
    """A Jinja2 LeaderWorkerSet template of the operator's own for warm-pool workers;
    None uses the shipped one."""
    pool_crd_schema_path: Path | None = None
    """LeaderWorkerSet CRD file to validate rendered pool manifests against; None skips
    the CRD check (the rendered manifest is still parsed and checked)."""
    image: str = "vidmaas/runtime:0.1.0"
    """The job runtime image."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Pull policy of the job containers."""
    gpu_resource_name: str = "nvidia.com/gpu"
    """Extended resource requested per GPU (``nvidia.com/gpu``, or HAMI's vGPU name)."""
    gpu_memory_resource_name: str | None = None
    """HAMI vGPU memory resource (e.g. ``nvidia.com/gpumem``); None omits it."""
    gpu_memory_mib: int | None = Field(default=None, ge=1)
    """vGPU memory per GPU (MiB) for every model alike; None: each model's registry
    ``gpu_memory_gib`` (the default, and what a HAMI cluster should use)."""
    model_volume: Literal["hostPath", "pvc", "image"] = "hostPath"
    """How the model directory reaches the pod."""
    model_host_path: str = "/data/models"
    """Node directory holding the models (``hostPath``)."""
    model_pvc_name: str = "vidmaas-models"
    """ReadOnlyMany PVC holding the models (``pvc``)."""
    model_mount_path: str = "/models"
    """Where the model directory is mounted in the container."""
    s3_secret_name: str = "vidmaas-s3"
    """Secret with ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``."""
    redis_secret_name: str = "vidmaas-redis"
    """Secret with ``VIDMAAS_REDIS_URL`` for the job runtime."""
    service_account: str | None = None
    """Service account of the job pods."""
    kueue_queue: str | None = None
    """Kueue LocalQueue name; when set, jobs are created suspended and Kueue admits them."""
    ttl_seconds_after_finished: int = 3600
    """runPolicy.ttlSecondsAfterFinished."""
    backoff_limit: int = 0
    """runPolicy.backoffLimit (retries are vidmaas's, not the operator's)."""
    clean_pod_policy: Literal["None", "All", "Running"] = "All"
    """runPolicy.cleanPodPolicy."""
    kubeconfig: Path | None = None
    """kubeconfig file; None means in-cluster configuration, then ~/.kube/config."""
    api_server_url: str | None = None
    """Talk to this API server URL directly (no kubeconfig); used with emulators."""
    cpu_request: str = "4"
    """CPU request of each job container."""
    memory_request: str | None = Field(default=None, pattern=_QUANTITY)
    """Memory request and limit of every job container alike; None: each model's
    registry ``pod_memory_gib``."""
    shm_size_limit: str = Field(default="8Gi", pattern=_QUANTITY)
    """``sizeLimit`` of the in-memory ``/dev/shm`` volume (counts against pod memory)."""
    gpu_product: str | None = Field(default=None, pattern=_LABEL_VALUE)
    """Node selector ``nvidia.com/gpu.product`` (e.g. ``NVIDIA-H100-80GB-HBM3``, as the
    GPU feature discovery labels nodes); None: any GPU node."""
    entrypoint: Literal["vidmaas-job", "run.sh"] = "vidmaas-job"
    """The main container's command: ``vidmaas-job run`` or the seed's ``run.sh``."""
    multi_node: bool = False
    """Let a job span nodes as the registry's ``nnodes`` says; off: every job runs in
    one pod on one node with all its GPUs (``nnodes × nproc_per_node``)."""
    rdma_resource_name: str | None = None
    """Extended resource of an RDMA device (e.g. ``rdma/hca``) requested by each pod of
    a job that spans nodes; None: none (NCCL uses TCP sockets between nodes)."""
    rdma_per_pod: int = Field(default=1, ge=1)
    """Amount of the RDMA resource per pod."""
    nccl_socket_ifname: str | None = None
    """``NCCL_SOCKET_IFNAME`` for jobs that span nodes (e.g. ``eth0`` or ``^lo,docker``)."""
    nccl_ib_hca: str | None = None
    """``NCCL_IB_HCA`` for jobs that span nodes (e.g. ``mlx5_0,mlx5_1``)."""
    hami_nccl_workaround: bool = False
    """Set ``NCCL_P2P_DISABLE=1`` and ``NCCL_SHM_DISABLE=1`` in the jobs (HAMI vGPUs,
    where NCCL's peer-to-peer and shared-memory transports can crash or hang)."""
    collective_timeout_s: int | None = Field(default=None, ge=10)
    """Collective timeout the runtime gives torch.distributed
    (``VIDMAAS_COLLECTIVE_TIMEOUT_S``, with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``);
    None: the runtime's default."""


class RuntimeSettings(BaseModel):
    """Postprocess and reporting settings passed to the job runtime."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    watermark_text: str = "AI generated · vidmaas"
    """Text watermark drawn on every frame; empty disables it."""
    watermark_logo_path: Path | None = None
    """A PNG logo watermark instead of (or besides) the text."""
    heartbeat_interval_s: float = 5.0
    """Period of heartbeat events while a job lives."""
    progress_min_interval_s: float = 0.2
    """Progress events closer together than this are coalesced."""
    collective_timeout_s: float = Field(default=600.0, gt=0)
    """Longest a collective (``all_gather``, ``broadcast``) of a job's ranks waits for its
    peers before it fails the job (600 s by default; ``VIDMAAS_COLLECTIVE_TIMEOUT_S``): a
    rank that stopped or deadlocked ends the job within this, and the task is retried.
    Keep it above the longest one rank may wait for another (the slowest step, the skew of
    loading the model on different ranks)."""
    preview_interval_s: float = Field(default=2.0, ge=0)
    """Least seconds between two live preview images of a denoising task."""
    preview_max: int = Field(default=8, ge=0, le=1000)
    """Most live preview images per task; 0 turns previews off."""


class WebhookSettings(BaseModel):
    """Outgoing webhooks."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    global_urls: list[str] = Field(default_factory=list)
    """URLs that receive every task's events besides the task's own webhook."""
    signing_secret: SecretStr = SecretStr("change-me")
    """HMAC-SHA256 key for the ``webhook-signature`` header."""
    allow_hosts: list[str] = Field(default_factory=list)
    """Hosts or IPs allowed even though private, loopback or link-local."""
    max_attempts: int = 8
    """Deliveries tried per event before giving up."""
    backoff_initial_s: float = 1.0
    """First retry delay; doubles each attempt."""
    timeout_s: float = 10.0
    """Per-request timeout."""
    max_endpoints_per_user: int = Field(default=10, ge=0)
    """Webhook endpoints (``/v1/webhook-endpoints``) one user may register."""
    endpoint_progress_interval_s: float = Field(default=5.0, ge=0)
    """At most one ``progress`` delivery per endpoint and task in this many seconds."""


class RelaySettings(BaseModel):
    """The relay: consuming the global event stream in its consumer group."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    batch_entries: int = 100
    """Entries read per XREADGROUP or XAUTOCLAIM call."""
    block_ms: int = 1000
    """How long one read waits for new entries."""
    claim_idle_ms: int = 30_000
    """Entries pending this long on another consumer (a relay that died) are taken over."""
    claim_interval_s: float = 5.0
    """How often to look for entries abandoned by relays that died."""
    max_apply_failures: int = 5
    """Failures of one entry, for reasons other than a backing service being down,
    before it is dead-lettered."""
    retry_backoff_max_s: float = 10.0
    """Cap on the pause between retries while the database or Redis is down."""
    forget_consumers_idle_ms: int = 24 * 3600 * 1000
    """Consumers idle this long with nothing pending are removed from the group."""
    send_webhooks: bool = True
    """Run the webhook sender in the relay process (one sender per relay)."""
