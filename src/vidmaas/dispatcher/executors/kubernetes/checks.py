"""Checks of a rendered PyTorchJob: its shape, its arguments, its secrets, its schema.

Guarantees:
- ``check_values`` refuses a value no job can carry (a NUL character in the prompt,
  the negative prompt or the image key) with ``InvalidRequest``.
- ``check_labels`` refuses a label key or value Kubernetes would reject.
- ``check_manifest`` accepts only one mapping of kind ``PyTorchJob`` named
  ``spec.job_name`` in the configured namespace, carrying the vidmaas labels, with
  replicas summing to the job's nodes (``placement.job_placement``), every
  ``pytorch`` container's ``args`` read by the runtime's own parser
  (``runtime.job.add_job_args``) exactly as it reads ``job_args(spec)`` (and so the
  ``fetch-input`` initContainer's arguments after ``fetch-input``), asking for the
  placement's GPUs per pod (and vGPU memory, when its resource is named), a Worker's
  ``fetch-input`` told a node rank other than 0, the runtime's required variables,
  and secrets passed only by reference: the credential variables come from
  ``secretKeyRef`` and no configured secret value appears anywhere in the rendered
  text.
- ``validate_manifest`` validates against the CRD's ``openAPIV3Schema``, and each pod
  template against the Kubernetes core schema that ``kubernetes-validate`` ships
  (strict: unknown fields are errors).
- Every refusal is an ``ExecutorError`` (``InvalidRequest`` for user values).

Schemas are loaded on first use and cached (the CRD by path and modification time);
nothing happens at import.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

import jsonschema
import yaml

from vidmaas.config import Settings
from vidmaas.dispatcher.executors.kubernetes.constants import (
    API_VERSION,
    FETCH_INPUT_CONTAINER,
    KIND,
    LABEL_MANAGED_BY,
    LABEL_TASK_ID,
    MAIN_CONTAINER,
    MANAGED_BY,
    VERSION,
)
from vidmaas.dispatcher.executors.kubernetes.placement import job_placement
from vidmaas.domain.jobs import (
    ENV_AWS_ACCESS_KEY_ID,
    ENV_AWS_SECRET_ACCESS_KEY,
    ENV_MODEL_DIR,
    ENV_REDIS_URL,
    ENV_STORAGE_URL,
    ENV_TASK_ID,
    ENV_WORK_DIR,
    JobSpec,
    job_args,
)
from vidmaas.errors import ExecutorError, InvalidRequest
from vidmaas.runtime.job import JobArgParser, add_job_args

log = logging.getLogger(__name__)

SECRET_ENV_NAMES: Final = frozenset({ENV_AWS_ACCESS_KEY_ID, ENV_AWS_SECRET_ACCESS_KEY,
                                     ENV_REDIS_URL})
"""Environment variables that must come from a Secret, never inline."""
REQUIRED_ENV_NAMES: Final = frozenset({ENV_TASK_ID, ENV_STORAGE_URL, ENV_MODEL_DIR, ENV_WORK_DIR,
                                       ENV_REDIS_URL})
"""Environment variables the runtime cannot start without."""

_LABEL_KEY_RE = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


# ---------------------------------------------------------------- values


def check_values(spec: JobSpec) -> None:
    """Refuse user values no manifest can carry."""
    for name, value in (("prompt", spec.prompt), ("negative_prompt", spec.negative_prompt or ""),
                        ("image", spec.input_key or "")):
        if "\x00" in value:
            raise InvalidRequest(f"{name} contains a NUL character", field=name)


def check_labels(labels: Mapping[str, str]) -> None:
    """Refuse label keys and values the API server would reject."""
    for key, value in labels.items():
        if not _LABEL_KEY_RE.match(key) or len(key) > 253 or not _LABEL_VALUE_RE.match(value):
            raise ExecutorError(f"invalid Kubernetes label {key[:80]!r}={value[:80]!r}")


# ---------------------------------------------------------------- arguments


class _ArgumentsRefused(Exception):
    pass


class _CheckingParser(JobArgParser):
    """The runtime's job arguments, refusing (never exiting) where the runtime would
    fail; no ``--help``, which would make the runtime print help and exit 0."""

    def error(self, message: str) -> NoReturn:
        raise _ArgumentsRefused(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _ArgumentsRefused(message or f"exit {status}")


def _job_arg_parser() -> argparse.ArgumentParser:
    parser = _CheckingParser(prog="vidmaas-job", add_help=False, exit_on_error=False)
    add_job_args(parser)
    return parser


def parsed_job_args(argv: Sequence[Any]) -> dict[str, Any]:
    """``argv`` as the runtime's parser reads it (``ExecutorError`` if it would refuse)."""
    if not all(isinstance(a, str) for a in argv):
        raise ExecutorError("a job argument is not a string")
    try:
        return vars(_job_arg_parser().parse_args(list(argv)))
    except (_ArgumentsRefused, argparse.ArgumentError) as e:
        raise ExecutorError(f"the runtime would refuse the arguments: {str(e)[:200]}") from e


def _check_args(what: str, argv: Sequence[Any], expected: Mapping[str, Any]) -> None:
    try:
        got = parsed_job_args(argv)
    except ExecutorError as e:
        raise ExecutorError(f"{what} args differ from the runtime arguments: {e}") from e
    differ = sorted(k for k in expected if got.get(k) != expected[k])
    if differ:
        raise ExecutorError(f"{what} args differ from the runtime arguments in "
                            f"{', '.join('--' + k.replace('_', '-') for k in differ)}")


def _fetch_input_argv(init: Mapping[str, Any]) -> list[Any]:
    line = [*(init.get("command") or []), *(init.get("args") or [])]
    if "fetch-input" not in line:
        raise ExecutorError(f"the {FETCH_INPUT_CONTAINER} container does not run fetch-input")
    return line[line.index("fetch-input") + 1:]


def _check_node_rank(rtype: str, init: Mapping[str, Any]) -> None:
    """A Worker's fetch-input must not believe it runs on node 0 (it would report)."""
    env = {e.get("name"): e for e in init.get("env") or []}
    rank = env.get("PET_NODE_RANK")
    line = " ".join(str(a) for a in [*(init.get("command") or []), *(init.get("args") or [])])
    told = (rank is not None and rank.get("value") != "0") or (
        rank is None and "PET_NODE_RANK=" in line)
    if rtype != "Master" and not told:
        raise ExecutorError(f"the {rtype} {FETCH_INPUT_CONTAINER} container is not told its "
                            "node rank (PET_NODE_RANK), so it would act as node 0")


# ---------------------------------------------------------------- the manifest


def _secret_values(settings: Settings) -> list[str]:
    values = []
    for secret in (settings.storage.s3_access_key_id, settings.storage.s3_secret_access_key):
        if secret is not None and len(secret.get_secret_value()) >= 4:
            values.append(secret.get_secret_value())
    password = urlsplit(settings.redis.url).password
    if password and len(password) >= 4:
        values.append(password)
    return values


def check_manifest(manifest: Any, *, settings: Settings, spec: JobSpec, text: str) -> None:
    """Refuse a rendered manifest that breaks a guarantee of the module docstring."""
    if not isinstance(manifest, dict):
        raise ExecutorError("the rendered PyTorchJob is not a mapping")
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
        raise ExecutorError(f"the rendered manifest is not a {API_VERSION} {KIND}")
    meta = manifest.get("metadata") or {}
    if meta.get("name") != spec.job_name:
        raise ExecutorError(f"the rendered job is named {str(meta.get('name'))[:80]!r}, "
                            f"not {spec.job_name!r}")
    if meta.get("namespace", settings.kube.namespace) != settings.kube.namespace:
        raise ExecutorError("the rendered job is not in the configured namespace")
    labels = meta.get("labels") or {}
    if labels.get(LABEL_MANAGED_BY) != MANAGED_BY or labels.get(LABEL_TASK_ID) != spec.task_id:
        raise ExecutorError(f"the rendered job lacks the labels {LABEL_MANAGED_BY}={MANAGED_BY} "
                            f"and {LABEL_TASK_ID}={spec.task_id}")
    replica_specs = (manifest.get("spec") or {}).get("pytorchReplicaSpecs")
    if not isinstance(replica_specs, dict) or "Master" not in replica_specs:
        raise ExecutorError("the rendered job has no Master replica")
    place = job_placement(settings.kube, spec.model)
    total = sum(int(r.get("replicas", 1)) for r in replica_specs.values())
    if total != place.nnodes:
        raise ExecutorError(f"the rendered job has {total} replicas; model {spec.model.id} "
                            f"needs {place.nnodes} nodes")
    expected = parsed_job_args(job_args(spec))
    gpu, gpumem = settings.kube.gpu_resource_name, settings.kube.gpu_memory_resource_name
    for rtype, replica in replica_specs.items():
        pod = ((replica.get("template") or {}).get("spec")) or {}
        containers = pod.get("containers") or []
        main = [c for c in containers if c.get("name") == MAIN_CONTAINER]
        if len(main) != 1:
            raise ExecutorError(f"the {rtype} replica needs one container named {MAIN_CONTAINER}")
        _check_args(f"the {rtype} container's", main[0].get("args") or [], expected)
        limits = (main[0].get("resources") or {}).get("limits") or {}
        if str(limits.get(gpu)) != str(place.nproc_per_node):
            raise ExecutorError(f"the {rtype} container asks for {limits.get(gpu)} {gpu}; "
                                f"model {spec.model.id} needs {place.nproc_per_node}")
        if gpumem is not None and str(limits.get(gpumem)) != str(place.gpu_memory_mib):
            raise ExecutorError(f"the {rtype} container asks for {limits.get(gpumem)} {gpumem}; "
                                f"model {spec.model.id} needs {place.gpu_memory_mib}")
        for init in pod.get("initContainers") or []:
            if init.get("name") == FETCH_INPUT_CONTAINER:
                _check_args(f"the {rtype} {FETCH_INPUT_CONTAINER} container's",
                            _fetch_input_argv(init), expected)
                _check_node_rank(rtype, init)
        env_names = {e.get("name") for e in main[0].get("env") or []}
        missing = REQUIRED_ENV_NAMES - env_names
        if missing:
            raise ExecutorError(f"the {rtype} container lacks {', '.join(sorted(missing))}")
        for container in [*containers, *(pod.get("initContainers") or [])]:
            for env in container.get("env") or []:
                if env.get("name") in SECRET_ENV_NAMES and (
                        "value" in env or "secretKeyRef" not in (env.get("valueFrom") or {})):
                    raise ExecutorError(f"{env.get('name')} must come from a Secret (secretKeyRef)")
    for secret in _secret_values(settings):
        if secret in text:
            raise ExecutorError("a configured secret value appears in the rendered manifest")



# ---------------------------------------------------------------- schemas


def _crd_version_schema(crd: Any, version: str) -> dict[str, Any]:
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise ExecutorError("the CRD file does not hold a CustomResourceDefinition")
    for v in crd.get("spec", {}).get("versions", []):
        if v.get("name") == version:
            schema = v.get("schema", {}).get("openAPIV3Schema")
            if isinstance(schema, dict):
                return schema
    raise ExecutorError(f"the CRD has no openAPIV3Schema for version {version}")


@functools.cache
def _crd_validator(path: Path, mtime_ns: int) -> jsonschema.protocols.Validator:
    try:
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ExecutorError(f"cannot load the PyTorchJob CRD {path}: {e}") from e
    schema = _crd_version_schema(crd, VERSION)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


def _crd_validator_for(path: Path) -> jsonschema.protocols.Validator:
    try:
        mtime_ns = path.stat().st_mtime_ns
    except OSError as e:
        raise ExecutorError(f"cannot read the PyTorchJob CRD {path}: {e}") from e
    return _crd_validator(path, mtime_ns)


@functools.cache
def _pod_template_validator() -> jsonschema.protocols.Validator | None:
    """The strict core-v1 PodTemplateSpec schema of kubernetes-validate, if installed."""
    try:
        import referencing
        from kubernetes_validate import utils as kv
    except ImportError:
        log.warning("kubernetes-validate is not installed: pod templates are checked against "
                    "the CRD schema only, not the strict core schema")
        return None
    version = kv.latest_version()
    schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv.schema_contents(f"{schema_dir}/podtemplatespec-v1.json", version)
    definitions = kv.schema_contents(f"{schema_dir}/_definitions.json", version)
    registry: referencing.Registry[Any] = referencing.Registry()
    registry = referencing.Resource.from_contents(schema) @ registry
    registry = referencing.Resource.from_contents(definitions) @ registry
    validator: jsonschema.protocols.Validator = jsonschema.Draft202012Validator(
        schema, registry=registry)
    return validator


def _schema_error(what: str, error: jsonschema.ValidationError) -> ExecutorError:
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return ExecutorError(f"{what} fails schema validation at {where}: {error.message[:300]}")


def validate_manifest(manifest: Mapping[str, Any], *, crd_path: Path) -> None:
    """Validate against the CRD schema and each pod template against the core schema."""
    crd = _crd_validator_for(crd_path)
    error = jsonschema.exceptions.best_match(crd.iter_errors(manifest))
    if error is not None:
        raise _schema_error("the PyTorchJob", error)
    pod = _pod_template_validator()
    if pod is None:
        return
    for rtype, replica in manifest["spec"]["pytorchReplicaSpecs"].items():
        error = jsonschema.exceptions.best_match(pod.iter_errors(replica.get("template", {})))
        if error is not None:
            raise _schema_error(f"the {rtype} pod template", error)

