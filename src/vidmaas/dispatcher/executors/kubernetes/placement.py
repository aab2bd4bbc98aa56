"""Where a task's job runs: how many pods, GPUs per pod, and the memory each asks for.

Guarantees of ``job_placement``:
- By default a job runs in one pod on one node holding all its GPUs
  (``nnodes × nproc_per_node`` of the registry), so its collectives (Ulysses'
  all-to-all above all) never leave the node; only with ``VIDMAAS_KUBE_MULTI_NODE``
  does a job of a model with ``nnodes > 1`` get one pod per node (``spans_nodes``).
- The GPU count of a job (``gpus``) is the model's ``gpus_per_job`` either way, so the
  dispatcher's capacity accounting holds whatever the topology.
- Memory comes from the registry unless a setting overrides it for every model: the
  vGPU memory per GPU (``gpu_memory_gib`` in MiB) and the pod memory (``pod_memory_gib``
  per node's ranks; a pod that holds several nodes' ranks asks for their sum).

The renderer and the manifest checks both read it, so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vidmaas.config import KubeSettings
from vidmaas.domain.models import ModelSpec


@dataclass(frozen=True, slots=True)
class Placement:
    """One job's shape on the cluster."""

    nnodes: int
    """Pods of the job (one Master, ``nnodes - 1`` Workers), one per node."""
    nproc_per_node: int
    """GPUs (torchrun processes) per pod."""
    gpu_memory_mib: int
    """vGPU memory per GPU, in MiB (HAMI's ``nvidia.com/gpumem`` unit)."""
    pod_memory: str
    """Memory request and limit of each pod's main container (a quantity)."""

    @property
    def spans_nodes(self) -> bool:
        return self.nnodes > 1

    @property
    def gpus(self) -> int:
        return self.nnodes * self.nproc_per_node


def memory_quantity(gib: float) -> str:
    """``24`` → ``"24Gi"``; ``1.5`` → ``"1536Mi"`` (rounded up to a whole MiB)."""
    if float(gib).is_integer():
        return f"{int(gib)}Gi"
    return f"{math.ceil(gib * 1024)}Mi"


def job_placement(kube: KubeSettings, model: ModelSpec) -> Placement:
    """The placement of a job of ``model`` under ``kube`` (see the module docstring)."""
    if kube.multi_node:
        nnodes, nproc, nodes_per_pod = model.nnodes, model.nproc_per_node, 1
    else:
        nnodes, nproc, nodes_per_pod = 1, model.gpus_per_job, model.nnodes
    gpu_mib = kube.gpu_memory_mib or math.ceil(model.gpu_memory_gib * 1024)
    pod_memory = kube.memory_request or memory_quantity(model.pod_memory_gib * nodes_per_pod)
    return Placement(nnodes=nnodes, nproc_per_node=nproc, gpu_memory_mib=gpu_mib,
                     pod_memory=pod_memory)
