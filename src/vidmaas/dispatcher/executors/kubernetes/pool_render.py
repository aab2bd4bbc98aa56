"""Render one warm-pool worker's LeaderWorkerSet from the Jinja2 template, checked.

Guarantees of ``render_pool`` (the PyTorchJob renderer's, for a worker):
- The template runs in the same sandboxed, quoting environment as the PyTorchJob
  template (``render``): every ``{{ expression }}`` is one JSON literal, so no value can
  open a key, a line or a document.
- The same pieces as the worker's jobs would get: the image (the model's own or
  ``kube.image``), pull policy, service account, the GPU resource and its count per
  pod, the HAMI memory resource, CPU and memory requests, the model directory by the
  same ``model_volume`` choice, the work directory and ``/dev/shm``, the S3 and Redis
  Secrets by reference, the Kueue queue label, anti-affinity between the pods.
- The text is parsed back, must be one document, and ``check_pool_manifest`` holds:
  kind ``LeaderWorkerSet`` named ``worker_lws_name(worker_id)`` in the configured
  namespace, the vidmaas labels (the worker id among them), one replica of
  ``nnodes`` pods, every pod template's ``serve`` container running ``worker_args``
  exactly, with ``nproc_per_node`` GPUs, ``VIDMAAS_WORKER_ID`` equal to the worker
  id, the runtime's variables, and secrets only by reference (no configured secret
  value anywhere in the text).
- When a CRD file is configured (or passed), the manifest is validated against its
  schema and each pod template against the strict core schema.
- Any failure raises ``ExecutorError``; nothing is half-rendered.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Final

import jinja2
import jsonschema

from vidmaas.config import Settings
from vidmaas.dispatcher.executors.base import WorkerSpec
from vidmaas.dispatcher.executors.kubernetes.checks import (
    SECRET_ENV_NAMES,
    _crd_validator_for,
    _pod_template_validator,
    _schema_error,
    _secret_values,
    check_labels,
)
from vidmaas.dispatcher.executors.kubernetes.constants import (
    LABEL_KUEUE_QUEUE,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_POOL,
    LABEL_WORKER_ID,
    LWS_API_VERSION,
    LWS_KIND,
    LWS_WORKER_INDEX_LABEL,
    MANAGED_BY,
    SERVE_CONTAINER,
)
from vidmaas.dispatcher.executors.kubernetes.placement import job_placement
from vidmaas.dispatcher.executors.kubernetes.render import (
    _environment,
    manifest_yaml,
    pod_context,
    render_one,
)
from vidmaas.domain import jobs
from vidmaas.domain.ids import WORKER_ID_PREFIX, is_worker_id, new_worker_id, worker_model_slug
from vidmaas.domain.models import ModelRegistry
from vidmaas.domain.workers import ENV_WORKER_ID, WorkerLimits, worker_args
from vidmaas.errors import ExecutorError, InvalidRequest

DEFAULT_SERVE_COMMAND: Final = ("vidmaas-job", "serve")
MASTER_PORT: Final = 29500
NAME_SLUG_CHARS: Final = 20
"""Of the model slug kept in the object name: the LeaderWorkerSet controller names
StatefulSets and pods after it, and their revision label must stay within 63 characters."""
REQUIRED_POOL_ENV: Final = frozenset({ENV_WORKER_ID, jobs.ENV_STORAGE_URL, jobs.ENV_MODEL_DIR,
                                      jobs.ENV_WORK_DIR, jobs.ENV_REDIS_URL})


def worker_lws_name(worker_id: str) -> str:
    """The LeaderWorkerSet of a worker: its id, with the model part cut to fit."""
    if not is_worker_id(worker_id):
        raise ExecutorError(f"not a pool worker id: {worker_id[:80]!r}")
    middle, suffix = worker_model_slug(worker_id), worker_id.rsplit("-", 1)[1]
    return f"{WORKER_ID_PREFIX}{middle[:NAME_SLUG_CHARS].rstrip('-')}-{suffix}"


@functools.cache
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ExecutorError(
            f"LeaderWorkerSet template syntax error, line {e.lineno}: {e.message}") from e


def _template_source(path: Path | None) -> str:
    try:
        if path is None:
            return (resources.files("vidmaas") / "templates" / "leaderworkerset.yaml.j2"
                    ).read_text(encoding="utf-8")
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ExecutorError(f"cannot read the LeaderWorkerSet template {path}: {e}") from e


def pool_labels(*, settings: Settings, spec: WorkerSpec) -> dict[str, str]:
    """The labels of a worker's LeaderWorkerSet (its pods carry the first four)."""
    labels = dict(spec.labels)
    labels.update({LABEL_MANAGED_BY: MANAGED_BY, LABEL_WORKER_ID: spec.worker_id,
                   LABEL_POOL: spec.model.id, LABEL_MODEL: spec.model.id})
    if settings.kube.kueue_queue is not None:
        labels[LABEL_KUEUE_QUEUE] = settings.kube.kueue_queue
    check_labels(labels)
    return labels


def pool_template_context(*, settings: Settings, spec: WorkerSpec,
                          command: list[str] | None = None) -> dict[str, Any]:
    """The variables the LeaderWorkerSet template sees (docs/kubernetes.md lists them)."""
    kube, model = settings.kube, spec.model
    name = worker_lws_name(spec.worker_id)
    labels = pool_labels(settings=settings, spec=spec)
    # The same pods, GPUs per pod and memory as the model's jobs (one node by default).
    place = job_placement(kube, model)
    return {
        "name": name,
        "worker_id": spec.worker_id,
        "namespace": kube.namespace,
        "labels": labels,
        "pod_labels": {k: labels[k] for k in (LABEL_MANAGED_BY, LABEL_WORKER_ID, LABEL_POOL,
                                              LABEL_MODEL)},
        "anti_affinity_labels": {LABEL_WORKER_ID: spec.worker_id},
        "kueue_queue": kube.kueue_queue,
        "model_id": model.id,
        "args": list(spec.args),
        "command": list(command) if command is not None else list(DEFAULT_SERVE_COMMAND),
        "spans_nodes": place.spans_nodes,
        "nnodes": place.nnodes,
        "nproc_per_node": place.nproc_per_node,
        "node_rank_field": f"metadata.labels['{LWS_WORKER_INDEX_LABEL}']",
        # The leader's stable address (the controller's headless Service, one group):
        # what the LeaderWorkerSet controller also injects as LWS_LEADER_ADDRESS.
        "master_addr": f"{name}-0.{name}.{kube.namespace}" if place.spans_nodes else None,
        "master_port": MASTER_PORT,
        **pod_context(settings, model, place),
        "termination_grace_s": math.ceil(settings.pools.stop_grace_s),
    }


# ---------------------------------------------------------------- checks


def _pod_templates(manifest: Mapping[str, Any]) -> dict[str, Any]:
    lwt = (manifest.get("spec") or {}).get("leaderWorkerTemplate") or {}
    return {k: lwt[k] for k in ("leaderTemplate", "workerTemplate") if isinstance(lwt.get(k),
                                                                                 dict)}


def check_pool_manifest(manifest: Any, *, settings: Settings, spec: WorkerSpec,
                        text: str) -> None:
    """Refuse a rendered manifest that breaks a guarantee of the module docstring."""
    if not isinstance(manifest, dict):
        raise ExecutorError("the rendered LeaderWorkerSet is not a mapping")
    if manifest.get("apiVersion") != LWS_API_VERSION or manifest.get("kind") != LWS_KIND:
        raise ExecutorError(f"the rendered manifest is not a {LWS_API_VERSION} {LWS_KIND}")
    meta = manifest.get("metadata") or {}
    name = worker_lws_name(spec.worker_id)
    if meta.get("name") != name:
        raise ExecutorError(f"the rendered LeaderWorkerSet is named "
                            f"{str(meta.get('name'))[:80]!r}, not {name!r}")
    if meta.get("namespace", settings.kube.namespace) != settings.kube.namespace:
        raise ExecutorError("the rendered LeaderWorkerSet is not in the configured namespace")
    labels = meta.get("labels") or {}
    if labels.get(LABEL_MANAGED_BY) != MANAGED_BY or \
            labels.get(LABEL_WORKER_ID) != spec.worker_id:
        raise ExecutorError(f"the rendered LeaderWorkerSet lacks the labels "
                            f"{LABEL_MANAGED_BY}={MANAGED_BY} and "
                            f"{LABEL_WORKER_ID}={spec.worker_id}")
    body = manifest.get("spec") or {}
    size = (body.get("leaderWorkerTemplate") or {}).get("size", 1)
    place = job_placement(settings.kube, spec.model)
    if body.get("replicas", 1) != 1 or size != place.nnodes:
        raise ExecutorError(f"the rendered LeaderWorkerSet must have one group of "
                            f"{place.nnodes} pods (model {spec.model.id}); it has "
                            f"{body.get('replicas', 1)} of {size}")
    templates = _pod_templates(manifest)
    if "workerTemplate" not in templates:
        raise ExecutorError("the rendered LeaderWorkerSet has no workerTemplate")
    gpu = settings.kube.gpu_resource_name
    for which, template in templates.items():
        pod = template.get("spec") or {}
        containers = pod.get("containers") or []
        main = [c for c in containers if c.get("name") == SERVE_CONTAINER]
        if len(main) != 1:
            raise ExecutorError(f"the {which} needs one container named {SERVE_CONTAINER}")
        if main[0].get("args") != list(spec.args):
            raise ExecutorError(f"the {which} container's args differ from the worker's")
        limit = ((main[0].get("resources") or {}).get("limits") or {}).get(gpu)
        if str(limit) != str(place.nproc_per_node):
            raise ExecutorError(f"the {which} container asks for {limit} {gpu}; model "
                                f"{spec.model.id} needs {place.nproc_per_node}")
        env = {e.get("name"): e for e in main[0].get("env") or []}
        missing = REQUIRED_POOL_ENV - set(env)
        if missing:
            raise ExecutorError(f"the {which} container lacks {', '.join(sorted(missing))}")
        if env[ENV_WORKER_ID].get("value") != spec.worker_id:
            raise ExecutorError(f"the {which} container's {ENV_WORKER_ID} is not the worker id")
        for container in [*containers, *(pod.get("initContainers") or [])]:
            for e in container.get("env") or []:
                if e.get("name") in SECRET_ENV_NAMES and (
                        "value" in e or "secretKeyRef" not in (e.get("valueFrom") or {})):
                    raise ExecutorError(f"{e.get('name')} must come from a Secret (secretKeyRef)")
    for secret in _secret_values(settings):
        if secret in text:
            raise ExecutorError("a configured secret value appears in the rendered manifest")


def validate_pool_manifest(manifest: Mapping[str, Any], *, crd_path: Path) -> None:
    """Validate against the LeaderWorkerSet CRD schema, each pod template against the
    strict core schema."""
    crd = _crd_validator_for(crd_path)
    error = jsonschema.exceptions.best_match(crd.iter_errors(manifest))
    if error is not None:
        raise _schema_error("the LeaderWorkerSet", error)
    pod = _pod_template_validator()
    if pod is None:
        return
    for which, template in _pod_templates(manifest).items():
        error = jsonschema.exceptions.best_match(pod.iter_errors(template))
        if error is not None:
            raise _schema_error(f"the {which}", error)


# ---------------------------------------------------------------- public API


def render_pool(*, settings: Settings, spec: WorkerSpec, crd_path: Path | None = None,
                template_path: Path | None = None,
                command: list[str] | None = None) -> dict[str, Any]:
    """The checked LeaderWorkerSet of worker ``spec`` (see the module docstring).

    ``crd_path`` and ``template_path`` default to ``kube.pool_crd_schema_path`` and
    ``kube.pool_template_path``; ``command`` replaces ``vidmaas-job serve``.
    """
    template = _compile(_template_source(template_path or settings.kube.pool_template_path))
    context = pool_template_context(settings=settings, spec=spec, command=command)
    manifest, text = render_one(template, context, kind="LeaderWorkerSet")
    check_pool_manifest(manifest, settings=settings, spec=spec, text=text)
    manifest.setdefault("metadata", {})["namespace"] = settings.kube.namespace
    crd = crd_path or settings.kube.pool_crd_schema_path
    if crd is not None:
        validate_pool_manifest(manifest, crd_path=crd)
    return manifest


def worker_spec(*, settings: Settings, model_id: str, worker_id: str | None = None,
                registry_loader: Callable[[Path | None], ModelRegistry] = ModelRegistry.load,
                ) -> WorkerSpec:
    """The worker the dispatcher would start for ``model_id`` (a fresh id if none)."""
    model = registry_loader(settings.models_path).get_or_raise(model_id)
    if worker_id is not None and not is_worker_id(worker_id):
        raise InvalidRequest(f"{worker_id[:60]!r} is not a pool worker id", field="worker_id")
    pools = settings.pools
    limits = WorkerLimits(lease_s=pools.worker_lease_s, max_tasks=pools.max_tasks_per_worker,
                          max_failures=pools.max_failures, max_rss_mib=pools.max_rss_mib)
    return WorkerSpec(worker_id=worker_id or new_worker_id(model.id), model=model,
                      args=worker_args(model, limits), labels={})


def render_pool_for_cli(*, settings: Settings, model_id: str,
                        worker_id: str | None = None) -> str:
    """The YAML of the LeaderWorkerSet the dispatcher would create for a new worker."""
    spec = worker_spec(settings=settings, model_id=model_id, worker_id=worker_id)
    return manifest_yaml(render_pool(settings=settings, spec=spec))
