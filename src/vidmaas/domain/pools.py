"""Warm pools: how many workers each pooled model should have (DESIGN §12).

Guarantees (``plan_pools`` is pure; the dispatcher carries its decisions out):
- A pool grows by one worker at a time per pass, while it has fewer than
  ``max_workers`` and more tasks waiting than idle or starting workers, and only
  into GPUs that are free now; it is kept at ``min_workers`` when GPUs allow.
- A worker idle for ``idle_s`` is drained while its pool has more than
  ``min_workers`` (to zero when the minimum is zero).
- Idle workers of other models give their GPUs back (down to their minimum) when a
  waiting task cannot start for lack of GPUs: the task at the head of the fair
  order, or a pooled model that needs a worker. The oldest idle goes first.
- Workers whose lease ran out, and draining ones, count for nothing: they are being
  replaced or retired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PoolConfig:
    gpus: int
    """GPUs of one worker (the model's ``gpus_per_job``)."""
    min_workers: int = 0
    max_workers: int = 1
    idle_s: float = 300.0


@dataclass(frozen=True, slots=True)
class WorkerView:
    id: str
    model: str
    state: str
    """``starting``, ``idle``, ``busy`` or ``draining``."""
    idle_since_s: float | None
    """Seconds ago it became idle (None unless idle)."""
    alive: bool = True


@dataclass(frozen=True, slots=True)
class Need:
    """A waiting task that cannot start for lack of free GPUs."""

    model: str
    gpus: int


@dataclass(slots=True)
class PoolPlan:
    start: list[str] = field(default_factory=list)
    """Models to start one new worker of (each already fits the free GPUs)."""
    drain: list[str] = field(default_factory=list)
    """Worker ids to drain (idle ones)."""
    reasons: dict[str, str] = field(default_factory=dict)
    """Why, per model started or worker drained (for the log)."""


def plan_pools(*, pools: Mapping[str, PoolConfig], workers: Sequence[WorkerView],
               queued: Mapping[str, int], free_gpus: int, blocked: Need | None,
               ) -> PoolPlan:
    """What to start and drain now (see the module docstring)."""
    plan = PoolPlan()
    live = [w for w in workers if w.alive and w.state != "draining"]
    by_model: dict[str, list[WorkerView]] = {m: [] for m in pools}
    for w in live:
        by_model.setdefault(w.model, []).append(w)
    free = free_gpus

    def idle_oldest_first(model: str) -> list[WorkerView]:
        return sorted((w for w in by_model.get(model, []) if w.state == "idle"),
                      key=lambda w: -(w.idle_since_s or 0.0))

    # Scale down what has been idle too long.
    for model, cfg in pools.items():
        count = len(by_model[model])
        for w in idle_oldest_first(model):
            if count <= cfg.min_workers or (w.idle_since_s or 0.0) < cfg.idle_s:
                break
            plan.drain.append(w.id)
            plan.reasons[w.id] = f"idle for {w.idle_since_s or 0:.0f}s"
            count -= 1
            free += cfg.gpus
        by_model[model] = [w for w in by_model[model] if w.id not in plan.drain]

    # Scale up where tasks wait, or below the minimum.
    wanting: list[tuple[str, PoolConfig, str]] = []
    for model, cfg in pools.items():
        mine = by_model[model]
        ready = sum(1 for w in mine if w.state in ("idle", "starting"))
        if len(mine) < cfg.min_workers:
            wanting.append((model, cfg, f"below its minimum of {cfg.min_workers}"))
        elif len(mine) < cfg.max_workers and queued.get(model, 0) > ready:
            wanting.append((model, cfg, f"{queued.get(model, 0)} waiting, {ready} ready"))
    needs = [Need(m, c.gpus) for m, c, _ in wanting]
    if blocked is not None:
        needs.insert(0, blocked)
    for model, cfg, why in wanting:
        if cfg.gpus <= free:
            plan.start.append(model)
            plan.reasons[model] = why
            free -= cfg.gpus
            needs = [n for n in needs if n.model != model]

    # Give idle GPUs of other models back to what still cannot start.
    for need in needs:
        if need.gpus <= free:
            continue
        for model, cfg in pools.items():
            if model == need.model:
                continue
            count = len(by_model[model])
            for w in idle_oldest_first(model):
                if free >= need.gpus or count <= cfg.min_workers:
                    break
                if w.id in plan.drain:
                    continue
                plan.drain.append(w.id)
                plan.reasons[w.id] = f"its GPUs go to waiting {need.model} tasks"
                count -= 1
                free += cfg.gpus
            by_model[model] = [w for w in by_model[model] if w.id not in plan.drain]
    return plan
