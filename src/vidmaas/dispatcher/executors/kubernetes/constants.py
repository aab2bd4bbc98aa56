"""Names the rendered PyTorchJobs and the executor that watches them must agree on.

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
