"""Names the rendered manifests (PyTorchJobs, pool LeaderWorkerSets) and the executor agree on.

Guarantees: one definition of the API group/version/kind, the main container's name,
and every label key vidmaas sets on a job or reads from its pods; the renderer, the
manifest checks, the status mapping and the executor all import them from here.
"""

from __future__ import annotations

from typing import Final

API_VERSION: Final = "kubeflow.org/v1"
KIND: Final = "PyTorchJob"
GROUP: Final = API_VERSION.split("/")[0]
VERSION: Final = API_VERSION.split("/")[1]
PLURAL: Final = "pytorchjobs"

MAIN_CONTAINER: Final = "pytorch"
"""The Training Operator requires the main container of every replica to have this name."""
FETCH_INPUT_CONTAINER: Final = "fetch-input"
"""The initContainer that downloads the input image into the work directory."""

LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "vidmaas"
LABEL_TASK_ID: Final = "vidmaas.io/task-id"
LABEL_JOB_NAME: Final = "vidmaas.io/job-name"
LABEL_MODEL: Final = "vidmaas.io/model"
LABEL_USER: Final = "vidmaas.io/user-id"
LABEL_ATTEMPT: Final = "vidmaas.io/attempt"
LABEL_KUEUE_QUEUE: Final = "kueue.x-k8s.io/queue-name"
OWNED_SELECTOR: Final = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
"""Label selector of every object vidmaas owns."""

POD_JOB_LABEL: Final = "training.kubeflow.org/job-name"
"""Set by the Training Operator on every pod of a job."""
POD_REPLICA_LABEL: Final = "training.kubeflow.org/replica-type"
"""Set by the Training Operator: ``master`` or ``worker``."""
POD_REPLICA_INDEX_LABEL: Final = "training.kubeflow.org/replica-index"
"""Set by the Training Operator: the pod's index among its replica type's pods (a
Worker's node rank is its index + 1)."""

# Warm pools (DESIGN §12): one LeaderWorkerSet per pool worker (see ``pools``).
LWS_API_VERSION: Final = "leaderworkerset.x-k8s.io/v1"
LWS_KIND: Final = "LeaderWorkerSet"
LWS_GROUP: Final = LWS_API_VERSION.split("/")[0]
LWS_VERSION: Final = LWS_API_VERSION.split("/")[1]
LWS_PLURAL: Final = "leaderworkersets"
SERVE_CONTAINER: Final = "serve"
"""The main container of a pool worker's pods (``vidmaas-job serve``)."""
LABEL_WORKER_ID: Final = "vidmaas.io/worker-id"
"""On a worker's LeaderWorkerSet and its pods: the dispatcher's worker id."""
LABEL_POOL: Final = "vidmaas.io/pool"
"""On a worker's LeaderWorkerSet and its pods: the pooled model."""
ANNOTATION_EXIT_CODE: Final = "vidmaas.io/exit-code"
"""Set, with ``spec.replicas: 0``, once a worker's process has ended."""
LWS_WORKER_INDEX_LABEL: Final = "leaderworkerset.sigs.k8s.io/worker-index"
"""Set by the LeaderWorkerSet controller: the pod's index in its group (0: the leader)."""
