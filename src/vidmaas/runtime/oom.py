"""The message of a generation that ran out of memory.

Guarantees: ``out_of_memory`` says what was asked (model, size, frames, steps), of what
(the device and its memory, the memory plan, the plan's estimated peak when it can be
computed) and what happens next (retried once under the memory-saving plan, or final
when already under it); it never raises while building that message.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vidmaas.runtime.errors import OutOfMemory
from vidmaas.runtime.job import JobArgs, JobEnv

if TYPE_CHECKING:
    from vidmaas.domain.models import Strategy
    from vidmaas.runtime.engine import Engine

log = logging.getLogger(__name__)


def out_of_memory(env: JobEnv, args: JobArgs, *, engine: Engine | None, world_size: int,
                  strategy: Strategy, cause: BaseException) -> OutOfMemory:
    """The failure of a generation that ran out of memory, saying what was asked of what."""
    from vidmaas.runtime import memory, plan

    where = _device_memory(env.dist.local_rank)
    if engine is not None:
        placement = engine.placement
    else:
        placement = plan.placement(strategy=strategy,
                                   world_size=world_size, memory_saving=args.memory_saving,
                                   cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling)
    estimate = ""
    try:
        from vidmaas.runtime.architectures import from_model_dir

        assert env.model_dir is not None
        est = memory.estimate(from_model_dir(env.model_dir), placement, width=args.width,
                            height=args.height, frames=args.frame_num,
                            image=bool(args.image),
                            nproc_per_node=env.dist.nproc_per_node)
        estimate = f"; the plan's estimated peak is {plan.gib(est.gpu_peak_bytes)} per GPU"
    except Exception as e:  # the estimate is a courtesy; the failure is the message
        log.debug("task_id=%s no memory estimate: %s", env.task_id, e)
    then = ("already under the memory-saving plan: the same model at this size fails the "
            "same way, so it is not retried" if args.memory_saving else
            "retried once with the memory-saving plan (--memory-saving)")
    return OutOfMemory(
        f"out of memory{where}: model {args.model or '?'} at {args.width}*{args.height}, "
        f"{args.frame_num} frames, {args.sample_steps} steps, plan {placement.describe()}"
        f"{estimate}; {then} ({str(cause)[:300]})", final=args.memory_saving)


def _device_memory(local_rank: int) -> str:
    import torch

    if not torch.cuda.is_available():
        return " (host)"
    total = torch.cuda.get_device_properties(local_rank).total_memory
    return f" on cuda:{local_rank} ({total / 2**30:.1f} GiB)"
