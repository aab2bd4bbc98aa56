"""How a job's ranks share one generation (DESIGN §6 "Distribution").

Guarantees:
- ``plan`` checks the declared strategy (the registry's, passed as ``--strategy``)
  against the world size, the device and the model, or decides it from them
  (``auto``), the same way on every rank and before any collective, so a world size
  the model cannot use fails at once on every rank with a ``ModelError``, never a hang.
- ``single``: one rank. ``cfg_parallel``: two ranks with classifier-free guidance
  (rank 0 computes the conditional branch, rank 1 the unconditional one, ``all_gather``
  each step); its output equals the single-process output exactly, because each rank
  runs the very computation the single process runs for its branch. ``ulysses``: on
  CUDA, diffusers' Ulysses context parallelism, which needs the attention heads to
  divide evenly among the ranks. ``auto`` picks single for one rank, cfg_parallel for
  two with guidance, ulysses otherwise.
- ``prepare`` makes one transformer run under the plan, once per module however often
  it is called (an expert loaded at the boundary is prepared when it arrives).
- ``agree_on_cancel`` makes every rank stop at the same step (a rank that stopped
  alone would leave the others waiting in a collective forever).
- No collective waits longer than the job's collective timeout
  (``VIDMAAS_COLLECTIVE_TIMEOUT_S``, ``init_process_group``): a peer that never joins
  makes the waiting ranks fail instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

from vidmaas.domain.jobs import DEFAULT_COLLECTIVE_TIMEOUT_S
from vidmaas.domain.models import Strategy
from vidmaas.runtime.errors import ModelError

log = logging.getLogger(__name__)

NCCL_ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
NCCL_TEAR_DOWN = "3"
"""PyTorch's default since 2.2, made explicit: when a collective times out or fails, the
NCCL watchdog tears the process down (without aborting the communicator first, which can
itself hang), so a stuck rank becomes an exit that torchrun and the executor see."""


@dataclass(frozen=True, slots=True)
class Plan:
    strategy: Strategy
    world_size: int
    rank: int


def plan(*, world_size: int, rank: int, cuda: bool, guidance: bool, num_heads: int,
         model: str, strategy: str = "auto") -> Plan:
    """The strategy for this job, or ``ModelError`` if the model cannot use ``world_size``."""
    name = model or "?"

    def refuse(why: str) -> ModelError:
        return ModelError(f"world size {world_size} cannot run model {name}: {why}",
                          code="unsupported_world_size")

    if strategy == "auto":
        if world_size <= 1:
            return Plan("single", 1, 0)
        if world_size == 2 and guidance:
            return Plan("cfg_parallel", 2, rank)
        if not cuda:
            raise refuse("it has no classifier-free guidance to split" if world_size == 2 else
                         "only 1 or 2 ranks (CFG-parallel) run without CUDA")
        strategy = "ulysses"
    if strategy == "single":
        if world_size != 1:
            raise refuse("its strategy single runs on one rank")
        return Plan("single", 1, 0)
    if strategy == "cfg_parallel":
        if world_size != 2:
            raise refuse("its strategy cfg_parallel runs on exactly 2 ranks")
        if not guidance:
            raise refuse("it has no classifier-free guidance to split")
        return Plan("cfg_parallel", 2, rank)
    if strategy != "ulysses":
        raise ModelError(f"unknown strategy {strategy[:40]!r}", code="unsupported_world_size")
    if world_size < 2:
        raise refuse("its strategy ulysses needs 2 or more ranks")
    if not cuda:
        raise refuse("Ulysses context parallelism runs only with CUDA, not without CUDA")
    if num_heads % world_size:
        raise refuse(f"Ulysses context parallelism splits its {num_heads} attention heads "
                     "evenly among the ranks")
    return Plan("ulysses", world_size, rank)


def init_process_group(p: Plan, *, cuda: bool, local_rank: int,
                       timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> None:
    """Join the job's process group (``env://``: MASTER_ADDR/PORT, RANK, WORLD_SIZE).

    ``timeout_s`` (``VIDMAAS_COLLECTIVE_TIMEOUT_S``) bounds every collective: one whose
    peers do not all join within it fails on the ranks waiting in it (gloo raises, and
    the rank fails with ``collective_timeout``; NCCL's watchdog tears the process down,
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` unless the environment says otherwise), so a
    rank that stopped never leaves the others waiting forever."""
    if p.strategy == "single":
        return
    import torch
    import torch.distributed as dist

    if cuda:
        os.environ.setdefault(NCCL_ASYNC_ERROR_HANDLING, NCCL_TEAR_DOWN)
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("joined process group rank=%d world_size=%d strategy=%s collective_timeout=%.0fs",
             p.rank, p.world_size, p.strategy, timeout_s)


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def prepare(p: Plan, module: Any) -> CfgParallel | None:
    """Make ``module`` (one transformer) run under ``p``; its CFG splitter, if any.

    Idempotent: a module already prepared keeps its splitter or parallel hooks."""
    existing = getattr(module, "_vidmaas_cfg_parallel", None)
    if isinstance(existing, CfgParallel):
        existing.install()  # offload hooks, re-added after a call, replace ``forward``
        return existing
    if getattr(module, "_vidmaas_parallel", False):
        return None
    if p.strategy == "cfg_parallel":
        splitter = CfgParallel(module, rank=p.rank)
        module._vidmaas_cfg_parallel = splitter
        return splitter
    if p.strategy == "ulysses":
        import importlib

        diffusers: Any = importlib.import_module("diffusers")
        module.enable_parallelism(
            config=diffusers.ContextParallelConfig(ulysses_degree=p.world_size))
        module._vidmaas_parallel = True
    return None


class CfgParallel:
    """Splits each step's two transformer calls (conditional, then unconditional) over 2 ranks.

    The first call of a step computes this rank's branch (rank 1 swaps in the negative
    prompt), gathers both branches and answers the conditional one; the second call
    answers the gathered unconditional one without computing anything.
    """

    def __init__(self, module: Any, *, rank: int) -> None:
        self._module = module
        self._forward: Any = None
        self._rank = rank
        self._negative: Any = None
        self._pending: Any = None
        self.evaluations = 0
        """Transformer forward passes this rank computed (one per step: its branch)."""
        self.install()

    def install(self) -> None:
        """Be the module's ``forward`` (again, if something replaced it since)."""
        if self._module.forward is not self:
            self._forward = self._module.forward
            self._module.forward = self

    def start(self, negative_embeds: Any) -> None:
        """A new generation: its negative prompt's embeddings; the count starts again."""
        self._negative = negative_embeds.to(self._module.dtype)
        self._pending = None
        self.evaluations = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch
        import torch.distributed as dist

        if self._pending is not None:
            out, self._pending = self._pending, None
            return (out,)
        if self._rank == 1:
            kwargs["encoder_hidden_states"] = self._negative
        kwargs["return_dict"] = False
        mine = self._forward(*args, **kwargs)[0].contiguous()
        self.evaluations += 1
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine)
        self._pending = both[1]
        return (both[0],)


def agree_on_cancel(p: Plan, cancel: bool, *, device: Any) -> bool:
    """Rank 0's decision, the same on every rank."""
    if p.strategy == "single":
        return cancel
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if cancel else 0], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())
