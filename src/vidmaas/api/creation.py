"""Creating a task, shared by the native and the OpenAI-compatible APIs.

Guarantees (DESIGN §2 step 1):
- The request body is read by ``api.body`` (one reader for both APIs: size limit,
  content type, form fields); this module starts from the fields it produced.
- Parameters are resolved against the model registry before anything is written;
  an input image is sniffed, bounded and re-encoded (``api.uploads``). A model whose
  GPUs per job exceed ``gpu_capacity`` is refused (422 ``model_unavailable`` on field
  ``model``, saying how many GPUs it needs and how many there are): its task would wait
  at the head of the queue forever.
- Write order: the input image under ``inputs/{task_id}/``, then the task row
  (``queued``), then the queue entry. A store that fails the put leaves no row (503
  ``storage_error``); if the row cannot be written the stored image is deleted
  (nothing half-written; a store that also fails the delete leaves an orphan object,
  never a row pointing at nothing). If the enqueue fails after the insert, the task
  stays ``queued`` and the reconciler enqueues it (nothing accepted is lost).
- A ``webhook_url`` is always checked against the SSRF policy
  (``domain.webhooks.check_target`` with ``webhooks.allow_hosts``) before anything is
  written: a private, loopback, link-local, multicast, reserved or metadata target is
  422 on field ``webhook_url`` with the policy's code (``webhook_target_not_allowed``,
  ``invalid_webhook_url`` or ``webhook_host_unresolvable``). The relay applies the same
  policy again before every delivery.
- Text fields are refused (422 ``invalid_text``, naming the field) when the prompt or
  negative prompt holds a NUL character or a lone surrogate, or a one-line field
  (``model``, ``size``, ``webhook_url``) holds any control character.
- With an ``Idempotency-Key`` (per user), a retried create of the same request returns
  the first task and writes nothing new; the same key with a different request is
  ``InvalidRequest`` ``idempotency_key_reused`` (field ``Idempotency-Key``), also when
  the two race (the unique constraint picks the first; the loser's image is deleted).
  "The same request" is ``request_fingerprint``: the fields as the client sent them
  (an omitted seed stays omitted, not the random one it resolved to), JSON and form
  alike, the SHA-256 of the image's bytes, and the source task of a rerun or remix. A
  task stored before fingerprints existed matches any request with its key.
- A user with ``max_queued_per_user`` tasks waiting gets 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import socket
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from vidmaas.api import quota
from vidmaas.api.deps import Caller
from vidmaas.api.uploads import clean_image
from vidmaas.db import tasks as repo
from vidmaas.db.models import Task
from vidmaas.domain import webhooks as policy
from vidmaas.domain.ids import new_task_id
from vidmaas.domain.models import MODEL_UNAVAILABLE
from vidmaas.errors import InvalidRequest
from vidmaas.logs import TaskLog
from vidmaas.services import Services
from vidmaas.storage.base import input_key

log = logging.getLogger(__name__)
tlog = TaskLog(log)

IDEMPOTENCY_KEY_MAX = 128
_FREE_TEXT_BAD = re.compile(r"[\x00\ud800-\udfff]")
_ONE_LINE_BAD = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class CreateRequest:
    prompt: str
    model: str | None = None
    size: str | None = None
    num_frames: int | None = None
    steps: int | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    image: bytes | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    priority: str | None = None
    """A priority class (``low``, ``normal``, ``high``) up to the caller's maximum."""
    source: str = "native"
    rerun_of: str | None = None
    """The task this one is made from (a rerun or a remix), stored on the new task."""


def request_fingerprint(req: CreateRequest) -> str:
    """A digest of the request as the client sent it (what an Idempotency-Key binds)."""
    doc = {
        "v": 1, "source": req.source, "prompt": req.prompt, "model": req.model,
        "size": req.size, "num_frames": req.num_frames, "steps": req.steps, "seed": req.seed,
        "negative_prompt": req.negative_prompt, "webhook_url": req.webhook_url,
        "webhook_events": sorted(set(req.webhook_events)) if req.webhook_events else None,
        "priority": req.priority,
        "image_sha256": None if req.image is None else hashlib.sha256(req.image).hexdigest(),
    }
    if req.rerun_of is not None:  # absent otherwise: older fingerprints stay valid
        doc["rerun_of"] = req.rerun_of
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def check_text(req: CreateRequest) -> None:
    """``invalid_text`` for a NUL or surrogate in free text, a control in one-line text."""
    for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if text is not None and _FREE_TEXT_BAD.search(text):
            raise InvalidRequest(f"the {name} contains a NUL character or a lone surrogate",
                                 field=name, code="invalid_text")
    for name, text in (("model", req.model), ("size", req.size),
                       ("webhook_url", req.webhook_url)):
        if text is not None and _ONE_LINE_BAD.search(text):
            raise InvalidRequest(f"{name} must be one line of printable text", field=name,
                                 code="invalid_text")


def _replayed(existing: Task, fingerprint: str) -> Task:
    """The task a retried create returns, unless the key came with another request."""
    if existing.idempotency_fingerprint not in (None, fingerprint):
        raise InvalidRequest(
            "this Idempotency-Key was already used for a different request; send a new key "
            "for a new request", field="Idempotency-Key", code="idempotency_key_reused")
    return existing


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    key = key.strip(" ")  # what an HTTP server strips anyway; a blank key is no key
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1–{IDEMPOTENCY_KEY_MAX} printable characters",
            field="Idempotency-Key")
    return key


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses of a host name (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def check_webhook_url(url: str, *, allow_hosts: Collection[str],
                            resolve: policy.Resolver = resolve_host,
                            field: str = "webhook_url") -> None:
    """``InvalidRequest`` (on ``field``) unless the SSRF policy allows ``url``."""
    try:
        await policy.check_target(url, allow_hosts=allow_hosts, resolve=resolve)
    except policy.TargetRefused as e:
        raise InvalidRequest(str(e), field=field, code=e.code) from e


async def create_task(*, svc: Services, caller: Caller, req: CreateRequest,
                      idempotency_key: str | None) -> tuple[Task, bool, int | None]:
    """Validate, store, insert, enqueue. Returns (task, created, queue position)."""
    cfg = svc.settings.api
    key = check_idempotency_key(idempotency_key)
    fingerprint = request_fingerprint(req) if key is not None else None
    async with svc.sessions() as s:
        if key is not None and fingerprint is not None:
            existing = await repo.find_by_idempotency_key(session=s, user_id=caller.id, key=key)
            if existing is not None:
                task = _replayed(existing, fingerprint)
                return task, False, await position_of(svc, task)
        if len(req.prompt) > cfg.max_prompt_chars:
            raise InvalidRequest(f"the prompt is over {cfg.max_prompt_chars} characters",
                                 field="prompt")
        if not req.prompt.strip():
            raise InvalidRequest("the prompt is empty", field="prompt")
        check_text(req)
        spec = svc.registry.get_or_raise(req.model or default_model_id(svc))
        unavailable = spec.unavailable_reason(gpu_capacity=svc.settings.gpu_capacity)
        if unavailable is not None:
            raise InvalidRequest(unavailable, field="model", code=MODEL_UNAVAILABLE)
        params = spec.resolve(size=req.size, num_frames=req.num_frames, steps=req.steps,
                              seed=req.seed, has_image=req.image is not None)
        if req.webhook_url is not None:
            await check_webhook_url(req.webhook_url,
                                    allow_hosts=svc.settings.webhooks.allow_hosts)
        task_id = new_task_id()
        stored_key: str | None = None
        extra: dict[str, Any] = {}
        if req.image is not None:
            img = clean_image(req.image, max_pixels=cfg.max_image_pixels,
                              max_side_px=cfg.max_image_side_px)
            stored_key = input_key(task_id, "image.png")
            # The image is stored before the caller's row is locked, and with no
            # transaction open: no lock or connection is held across the upload.
            await s.rollback()
            await svc.store.put_bytes(stored_key, img.png, content_type="image/png")
            extra["image_width"], extra["image_height"] = img.width, img.height
        try:
            # The caller's row, quotas and usage in one statement; the row stays locked
            # until the insert commits, which re-checks the queued count (no race
            # exceeds it).
            adm = await quota.admit(s, settings=svc.settings, user_id=caller.id,
                                    priority=req.priority)
            new = repo.NewTask(
                id=task_id, user_id=caller.id, model=spec.id, prompt=req.prompt,
                negative_prompt=req.negative_prompt, params=params.as_dict() | extra,
                gpus=spec.gpus_per_job, input_key=stored_key, idempotency_key=key,
                idempotency_fingerprint=fingerprint, webhook_url=req.webhook_url,
                webhook_events=req.webhook_events, source=req.source,
                priority=adm.priority.value, rerun_of=req.rerun_of)
            task, created = await repo.create_task(session=s, new=new,
                                                   queued_limit=adm.queued_limit)
        except BaseException:
            if stored_key is not None:
                await _delete_quietly(svc, stored_key, task_id=task_id)
            raise
        if not created:
            if stored_key is not None:
                await _delete_quietly(svc, stored_key, task_id=task_id)
            assert fingerprint is not None  # only an idempotent create finds another task
            task = _replayed(task, fingerprint)
            return task, False, await position_of(svc, task)
    tlog.info(task.id, "created by %s (model %s)", caller.name, spec.id)
    position = await svc.lifecycle.admit_new(task, share=adm.share)
    return task, True, position


async def _delete_quietly(svc: Services, key: str, *, task_id: str) -> None:
    """Delete an input no row points at; a failing store only leaves an orphan object."""
    try:
        await svc.store.delete(key)
    except Exception:
        tlog.warning(task_id, "could not delete the unused input %s", key)


def default_model_id(svc: Services) -> str:
    return svc.settings.default_model or svc.registry.default.id


async def position_of(svc: Services, task: Task) -> int | None:
    if task.status != "queued":
        return None
    try:
        return await svc.lifecycle.queue.position(user_id=task.user_id, task_id=task.id)
    except Exception:
        tlog.warning(task.id, "queue position unavailable")
        return None


async def positions_of(svc: Services, tasks: list[Task]) -> dict[str, int | None]:
    """Queue positions of the queued tasks among ``tasks`` (one Redis round trip)."""
    queued = [(t.user_id, t.id) for t in tasks if t.status == "queued"]
    if not queued:
        return {}
    try:
        return await svc.lifecycle.queue.positions(queued)
    except Exception:
        log.warning("queue positions unavailable for a page of %d tasks", len(queued))
        return {}
