"""Render one task's PyTorchJob manifest from the Jinja2 template, injection-proof.

Guarantees of ``render_pytorchjob``:
- Every ``{{ expression }}`` of the template is written out as a JSON literal (strings
  JSON-quoted with every YAML-significant character escaped, numbers, booleans,
  ``null``, flow lists and mappings). A value therefore stays one scalar, whatever
  quotes, newlines, ``{{ }}``, ``{% %}``, ``---`` or YAML it holds; user text is data,
  never template source (the template environment is sandboxed, autoescape is off).
- A quoted whole value in the template (``"{{ prompt_text }}"``, as plain-Jinja
  templates write it) is compiled as that value as a string, quoted like any other.
- The text is parsed back with ``yaml.safe_load_all``, must be exactly one document,
  and passes every check of ``checks.check_manifest`` (kind, name, namespace, labels,
  replicas, the ``pytorch`` containers' ``args`` read by the runtime's parser as it
  reads ``job_args(spec)`` so the prompt arrives exactly as typed and the local and
  Kubernetes executors run the same job, GPUs and vGPU memory, a Worker's node rank,
  secrets only by reference).
- Pods, GPUs per pod and memory follow ``placement.job_placement``: one pod per job
  unless multi-node is on and the model spans nodes; only such a job gets pod
  anti-affinity, the RDMA resource and the NCCL interface variables.
- When a CRD file is configured (or passed), the manifest is validated against its
  schema and each pod template against the core schema (``checks.validate_manifest``).
- Any failure raises ``ExecutorError`` (``InvalidRequest`` for a value no job can carry,
  such as a NUL character); nothing is half-rendered.

The template is loaded on first use and cached; nothing happens at import.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import jinja2
import jinja2.sandbox
import yaml

from vidmaas.config import Settings
from vidmaas.dispatcher.executors.kubernetes.checks import (
    check_labels,
    check_manifest,
    check_values,
    validate_manifest,
)
from vidmaas.dispatcher.executors.kubernetes.constants import (
    LABEL_ATTEMPT,
    LABEL_JOB_NAME,
    LABEL_KUEUE_QUEUE,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_TASK_ID,
    LABEL_USER,
    MANAGED_BY,
    POD_REPLICA_INDEX_LABEL,
)
from vidmaas.dispatcher.executors.kubernetes.placement import Placement, job_placement
from vidmaas.domain.ids import is_task_id, new_task_id
from vidmaas.domain.ids import job_name as job_name_of
from vidmaas.domain.jobs import JobSpec, job_args
from vidmaas.domain.models import ModelRegistry, ModelSpec
from vidmaas.errors import ExecutorError, InvalidRequest

WORK_DIR: Final = "/work"
"""The pod's ``emptyDir`` work directory (``VIDMAAS_WORK_DIR``)."""
ENTRYPOINTS: Final[Mapping[str, tuple[str, ...]]] = {
    "vidmaas-job": ("vidmaas-job", "run"),
    "run.sh": ("run.sh",),
}
"""The main container's command for each ``VIDMAAS_KUBE_ENTRYPOINT``."""
DEFAULT_COMMAND: Final = ENTRYPOINTS["vidmaas-job"]
FETCH_INPUT_COMMAND: Final = ("vidmaas-job", "fetch-input")
ENV_REPLICA_INDEX: Final = "REPLICA_INDEX"
"""A Worker's index (downward API, from the operator's pod label) in its initContainer."""
WORKER_FETCH_SCRIPT: Final = (
    ': "${REPLICA_INDEX:?}"; export PET_NODE_RANK=$((REPLICA_INDEX + 1)); '
    'exec vidmaas-job fetch-input "$@"')
"""A Worker's ``fetch-input``: node rank = replica index + 1, as the operator numbers
the Workers' ``PET_NODE_RANK`` (``sh -c SCRIPT NAME ARGS…``: the arguments pass as is)."""
GPU_PRODUCT_LABEL: Final = "nvidia.com/gpu.product"
"""Node label of the GPU model (NVIDIA GPU feature discovery)."""

# Characters a JSON string may hold raw but YAML treats specially: YAML line breaks
# (NEL, LS, PS), characters PyYAML refuses (DEL, C1 controls, U+FFFE/FFFF, surrogates),
# the BOM, and every flow/comment/quote indicator, so that a quoted value stays inert
# even where a template puts it in a flow collection or a single-quoted string.
_YAML_UNSAFE_RE = re.compile(
    "[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff'#:,{}\\[\\]&*!|>%@`?]")


# ---------------------------------------------------------------- quoting


class _Quoted(str):
    """Text that is already a JSON literal: written out as is."""

    __slots__ = ()


def _quote_string(value: str) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return _YAML_UNSAFE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return _quote_string(value)
    if value is None or isinstance(value, bool | int):
        return json.dumps(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ExecutorError(f"cannot render the number {value!r}")
        return json.dumps(value)
    if isinstance(value, Path):
        return _quote_string(str(value))
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise ExecutorError(f"cannot render a mapping key of type {type(k).__name__}")
            items.append(f"{_quote_string(k)}: {_literal(v)}")
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    raise ExecutorError(f"cannot render a value of type {type(value).__name__}")


def yaml_literal(value: Any) -> str:
    """``value`` as one JSON literal that YAML reads back as exactly ``value``."""
    return _literal(value)


def _finalize(value: Any) -> Any:
    if isinstance(value, _Quoted):
        return value
    if isinstance(value, jinja2.Undefined):
        return value  # StrictUndefined raises when it is written out
    return _Quoted(_literal(value))


def _quote_filter(value: Any) -> _Quoted:
    return value if isinstance(value, _Quoted) else _Quoted(_literal(value))


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        autoescape=False,  # YAML, not HTML: quoting is done by _finalize
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
    )
    env.filters["q"] = _quote_filter
    env.filters["tojson"] = _quote_filter  # Jinja's own escapes for HTML and returns Markup
    return env


# A whole-value expression inside YAML quotes, as templates written for plain Jinja have
# it ("{{ prompt_text }}"): it means the value as a string, so it is compiled as
# {{ (prompt_text) | string }} and quoted like every other value. Only a quoted scalar
# that is exactly one expression qualifies; "s3://{{ bucket }}" is left alone (and is
# refused after rendering).
_QUOTED_WHOLE_VALUE_RE = re.compile(
    r"""(?P<q>["'])\{\{(?P<l>-?)(?P<e>(?:(?!(?P=q))[^{}])*?)(?P<r>-?)\}\}(?P=q)""")


def _unquote_whole_values(source: str) -> str:
    return _QUOTED_WHOLE_VALUE_RE.sub(
        lambda m: "{{" + m["l"] + " (" + m["e"].strip() + ") | string " + m["r"] + "}}", source)


@functools.cache
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(_unquote_whole_values(source))
    except jinja2.TemplateSyntaxError as e:
        raise ExecutorError(
            f"PyTorchJob template syntax error, line {e.lineno}: {e.message}") from e


def _template_source(path: Path | None) -> str:
    try:
        if path is None:
            return (resources.files("vidmaas") / "templates" / "pytorchjob.yaml.j2").read_text(
                encoding="utf-8")
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ExecutorError(f"cannot read the PyTorchJob template {path}: {e}") from e



# ---------------------------------------------------------------- context


def _bucket_of(storage_url: str) -> str | None:
    parts = urlsplit(storage_url)
    return parts.netloc if parts.scheme == "s3" else None


def _model_dir(model_dir: str, mount_path: str) -> str:
    if model_dir.startswith("/"):
        return model_dir
    return mount_path.rstrip("/") + "/" + model_dir


def _labels(*, settings: Settings, spec: JobSpec) -> dict[str, str]:
    labels = dict(spec.labels)
    labels.update({
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_TASK_ID: spec.task_id,
        LABEL_JOB_NAME: spec.job_name,
        LABEL_MODEL: spec.model.id,
        LABEL_USER: spec.user_id,
        LABEL_ATTEMPT: str(spec.attempt),
    })
    if settings.kube.kueue_queue is not None:
        labels[LABEL_KUEUE_QUEUE] = settings.kube.kueue_queue
    check_labels(labels)
    return labels


def _replicas(place: Placement, args: list[str]) -> list[dict[str, Any]]:
    """Master and Workers, each with what its ``fetch-input`` initContainer needs to know
    its node rank (the operator injects ``PET_*`` into containers only, not into
    initContainers)."""
    static = [{"name": "PET_NNODES", "value": str(place.nnodes)},
              {"name": "PET_NPROC_PER_NODE", "value": str(place.nproc_per_node)}]
    replicas: list[dict[str, Any]] = [{
        "type": "Master", "count": 1,
        "node_env": [*static, {"name": "PET_NODE_RANK", "value": "0"}],
        "fetch_command": [*FETCH_INPUT_COMMAND, *args],
    }]
    if place.spans_nodes:
        index = {"name": ENV_REPLICA_INDEX, "valueFrom": {
            "fieldRef": {"fieldPath": f"metadata.labels['{POD_REPLICA_INDEX_LABEL}']"}}}
        replicas.append({
            "type": "Worker", "count": place.nnodes - 1,
            "node_env": [*static, index],
            "fetch_command": ["sh", "-c", WORKER_FETCH_SCRIPT, FETCH_INPUT_COMMAND[1], *args],
        })
    return replicas


def pod_context(settings: Settings, model: ModelSpec, place: Placement) -> dict[str, Any]:
    """What a task's job pods and a pool worker's pods share: the image, GPUs and memory
    of the placement, the model directory, the work directory, the store and Redis (by
    Secret), and the runtime's environment."""
    kube, storage, runtime = settings.kube, settings.storage, settings.runtime
    limits: dict[str, int | str] = {kube.gpu_resource_name: place.nproc_per_node,
                                    "memory": place.pod_memory}
    if kube.gpu_memory_resource_name is not None:
        limits[kube.gpu_memory_resource_name] = place.gpu_memory_mib
    if kube.rdma_resource_name is not None and place.spans_nodes:
        limits[kube.rdma_resource_name] = kube.rdma_per_pod
    return {
        "image": model.runtime_image or kube.image,
        "image_pull_policy": kube.image_pull_policy,
        "service_account": kube.service_account,
        "gpu_resource_name": kube.gpu_resource_name,
        "requests": {"cpu": kube.cpu_request, "memory": place.pod_memory},
        "limits": limits,
        "shm_size_limit": kube.shm_size_limit,
        "model_volume": kube.model_volume,
        "model_host_path": kube.model_host_path,
        "model_pvc_name": kube.model_pvc_name,
        "model_mount_path": kube.model_mount_path,
        "model_dir": _model_dir(model.model_dir, kube.model_mount_path),
        "work_dir": WORK_DIR,
        "storage_url": storage.url,
        "s3_endpoint_url": storage.s3_endpoint_url,
        "s3_region": storage.s3_region,
        "storage_retry_attempts": storage.retry_attempts,
        "storage_retry_total_s": storage.retry_total_s,
        "s3_secret_name": kube.s3_secret_name,
        "redis_secret_name": kube.redis_secret_name,
        "watermark_text": runtime.watermark_text,
        "heartbeat_interval_s": runtime.heartbeat_interval_s,
        "preview_interval_s": runtime.preview_interval_s,
        "preview_max": runtime.preview_max,
    }


def template_context(
    *, settings: Settings, spec: JobSpec, command: list[str] | None = None,
) -> dict[str, Any]:
    """The variables the template sees (docs/kubernetes.md lists them)."""
    kube, model, params = settings.kube, spec.model, spec.params
    place = job_placement(kube, model)
    labels = _labels(settings=settings, spec=spec)
    pod_labels = {k: labels[k] for k in (LABEL_MANAGED_BY, LABEL_TASK_ID, LABEL_JOB_NAME,
                                          LABEL_MODEL)}
    rdma = kube.rdma_resource_name if place.spans_nodes else None
    args = job_args(spec)
    replicas = _replicas(place, args)
    logo = settings.runtime.watermark_logo_path
    return {
        # the seed's placeholders
        "task_id": spec.task_id,
        "s3_bucket": _bucket_of(settings.storage.url),
        "user_image_key": spec.input_key,
        "prompt_text": spec.prompt,
        "resolution": str(params["size"]),
        # the job
        "job_name": spec.job_name,
        "namespace": kube.namespace,
        "labels": labels,
        "pod_labels": pod_labels,
        "anti_affinity_labels": {LABEL_TASK_ID: spec.task_id},
        "kueue_queue": kube.kueue_queue,
        "user_id": spec.user_id,
        "attempt": spec.attempt,
        "model_id": model.id,
        "num_frames": params["num_frames"],
        "steps": params["steps"],
        "seed": params["seed"],
        "args": args,
        "command": list(command) if command is not None else list(ENTRYPOINTS[kube.entrypoint]),
        # the Master's; each replica has its own (the Workers' sets their node rank)
        "fetch_command": replicas[0]["fetch_command"],
        # replicas, placement and resources
        "nnodes": place.nnodes,
        "nproc_per_node": place.nproc_per_node,
        "spans_nodes": place.spans_nodes,
        "replicas": replicas,
        **pod_context(settings, model, place),
        "node_selector": ({GPU_PRODUCT_LABEL: kube.gpu_product}
                          if kube.gpu_product is not None else {}),
        "rdma_resource_name": rdma,
        # NCCL and torch.distributed
        "nccl_socket_ifname": kube.nccl_socket_ifname if place.spans_nodes else None,
        "nccl_ib_hca": kube.nccl_ib_hca if place.spans_nodes else None,
        "hami_nccl_workaround": kube.hami_nccl_workaround,
        "collective_timeout_s": kube.collective_timeout_s,
        "watermark_logo": str(logo) if logo is not None else None,
        # runPolicy
        "clean_pod_policy": kube.clean_pod_policy,
        "ttl_seconds_after_finished": kube.ttl_seconds_after_finished,
        # a backstop behind the watchdog, which cancels at the task deadline
        "active_deadline_s": math.ceil(settings.dispatcher.task_deadline_s
                                       + settings.dispatcher.cancel_grace_s),
        "backoff_limit": kube.backoff_limit,
        "termination_grace_s": math.ceil(settings.dispatcher.cancel_grace_s),
    }



# ---------------------------------------------------------------- public API


def render_pytorchjob(
    *,
    settings: Settings,
    spec: JobSpec,
    crd_path: Path | None = None,
    template_path: Path | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """The checked PyTorchJob manifest of ``spec`` (see the module docstring).

    ``crd_path`` and ``template_path`` default to ``settings.kube.crd_schema_path`` and
    ``settings.kube.template_path``; without a CRD path the schema checks are skipped.
    ``command`` replaces the main container's command (default ``vidmaas-job run``;
    ``["run.sh"]`` for an image built around the seed's script).
    """
    check_values(spec)
    template = _compile(_template_source(template_path or settings.kube.template_path))
    context = template_context(settings=settings, spec=spec, command=command)
    manifest, text = render_one(template, context, kind="PyTorchJob")
    check_manifest(manifest, settings=settings, spec=spec, text=text)
    manifest.setdefault("metadata", {})["namespace"] = settings.kube.namespace
    crd = crd_path or settings.kube.crd_schema_path
    if crd is not None:
        validate_manifest(manifest, crd_path=crd)
    return manifest


def render_one(template: jinja2.Template, context: Mapping[str, Any], *, kind: str,
               ) -> tuple[dict[str, Any], str]:
    """Render ``template`` and parse it as exactly one YAML document: (manifest, text).
    Any failure is an ``ExecutorError`` naming ``kind``."""
    try:
        text = template.render(context)
    except jinja2.TemplateError as e:
        raise ExecutorError(f"cannot render the {kind} template: {e}") from e
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ExecutorError(f"the rendered {kind} is not valid YAML: {str(e)[:300]}") from e
    if len(documents) != 1:
        raise ExecutorError(f"the rendered template holds {len(documents)} documents, not one")
    manifest: dict[str, Any] = documents[0]
    return manifest, text


def manifest_yaml(manifest: Mapping[str, Any]) -> str:
    """A manifest as readable YAML (block style, Unicode kept, key order kept)."""
    return yaml.safe_dump(dict(manifest), sort_keys=False, allow_unicode=True, width=100)


def render_job_for_cli(
    *,
    settings: Settings,
    model_id: str,
    prompt: str,
    size: str,
    image_key: str | None = None,
    task_id: str | None = None,
    num_frames: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    user_id: str = "u-render-job",
    registry_loader: Callable[[Path | None], ModelRegistry] = ModelRegistry.load,
) -> str:
    """The YAML of the PyTorchJob the dispatcher would submit for such a request.

    Parameters are resolved through the model registry exactly as for a real request
    (``InvalidRequest`` names a bad one); a missing task id is a fresh one, a missing
    seed a random one, as the API would choose.
    """
    model = registry_loader(settings.models_path).get_or_raise(model_id)
    params = model.resolve(size=size, num_frames=num_frames, steps=steps, seed=seed,
                           has_image=image_key is not None)
    if task_id is not None and not is_task_id(task_id):
        raise InvalidRequest(f"{task_id[:40]!r} is not a task id", field="task_id")
    tid = task_id or new_task_id()
    spec = JobSpec(task_id=tid, job_name=job_name_of(tid), user_id=user_id, model=model,
                   prompt=prompt, params=params.as_dict(), attempt=1, input_key=image_key)
    return manifest_yaml(render_pytorchjob(settings=settings, spec=spec))
