"""The Kubernetes executor: one Kubeflow PyTorchJob per task (DESIGN §7).

The parts: ``constants`` (the API names and label keys every part shares),
``render`` (the manifest from the Jinja2 template, injection-proof), ``checks`` (what
a rendered manifest must satisfy, schema validation included), ``status`` (the pure
mapping of a job and its pods to a ``JobStatus``) and ``executor`` (the
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
    "KubernetesExecutor",
    "manifest_yaml",
    "render_job_for_cli",
    "render_pytorchjob",
    "yaml_literal",
]
