"""The Kubernetes executor: one Kubeflow PyTorchJob per task (DESIGN §7), one
LeaderWorkerSet per warm-pool worker (DESIGN §12).

The parts: ``constants`` (the API names and label keys every part shares),
``render`` (the manifest from the Jinja2 template, injection-proof), ``checks`` (what
a rendered manifest must satisfy, schema validation included), ``status`` (the pure
mapping of a job and its pods to a ``JobStatus``), ``pool_render`` and ``pools`` (a pool
worker's LeaderWorkerSet: rendered and checked; created, scaled, deleted, watched),
``api`` (the calls' timeout and error wrapping) and ``executor`` (the
``KubernetesExecutor``: API calls and the watch). Each module's docstring states its
guarantees; this package re-exports what the dispatcher, the CLI and the tests use.
"""

from vidmaas.dispatcher.executors.kubernetes.constants import (
    LABEL_KUEUE_QUEUE,
    LABEL_MANAGED_BY,
    LABEL_TASK_ID,
    POD_JOB_LABEL,
)
from vidmaas.dispatcher.executors.kubernetes.executor import KUBE_API_CALLS, KubernetesExecutor
from vidmaas.dispatcher.executors.kubernetes.pool_render import (
    render_pool,
    render_pool_for_cli,
    worker_lws_name,
)
from vidmaas.dispatcher.executors.kubernetes.pools import POOL_API_CALLS
from vidmaas.dispatcher.executors.kubernetes.render import (
    manifest_yaml,
    render_job_for_cli,
    render_pytorchjob,
    yaml_literal,
)

__all__ = [
    "KUBE_API_CALLS",
    "LABEL_KUEUE_QUEUE",
    "LABEL_MANAGED_BY",
    "LABEL_TASK_ID",
    "POD_JOB_LABEL",
    "POOL_API_CALLS",
    "KubernetesExecutor",
    "manifest_yaml",
    "render_job_for_cli",
    "render_pool",
    "render_pool_for_cli",
    "render_pytorchjob",
    "worker_lws_name",
    "yaml_literal",
]
