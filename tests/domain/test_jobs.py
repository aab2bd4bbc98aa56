"""The job contract's retry rule and the arguments every executor passes."""

from __future__ import annotations

import itertools

from vidmaas.domain.jobs import (
    OUT_OF_MEMORY_CODE,
    ExitCode,
    JobSpec,
    exit_code_retryable,
    job_args,
    memory_saving_after,
    model_args,
)
from vidmaas.domain.models import ModelRegistry

REGISTRY = ModelRegistry.load()


def _spec(model_id: str, **kw: object) -> JobSpec:
    base: dict[str, object] = {
        "task_id": "t" * 26, "job_name": "j", "user_id": "u", "model": REGISTRY[model_id],
        "prompt": "a fox", "attempt": 1,
        "params": {"size": "1280*720", "num_frames": 81, "steps": 40, "seed": 1, "fps": 16}}
    return JobSpec(**(base | kw))  # type: ignore[arg-type]


def test_an_out_of_memory_is_retried_once_with_the_memory_saving_plan_then_final() -> None:
    assert exit_code_retryable(ExitCode.OUT_OF_MEMORY)
    assert not exit_code_retryable(ExitCode.OUT_OF_MEMORY_FINAL)
    assert memory_saving_after(OUT_OF_MEMORY_CODE)
    assert not memory_saving_after("heartbeat_lost") and not memory_saving_after(None)
    assert "--memory-saving" in job_args(_spec("wan2.2-t2v-a14b", memory_saving=True))
    assert "--memory-saving" not in job_args(_spec("wan2.2-t2v-a14b"))


def test_job_args_carry_every_registry_value_that_shapes_the_generation() -> None:
    model = REGISTRY["wan2.2-t2v-a14b"]
    args = job_args(_spec("wan2.2-t2v-a14b"))
    assert args[-len(model_args(model)):] == model_args(model)
    pairs = dict(itertools.pairwise(args))
    assert (pairs["--guidance-scale"], pairs["--guidance-scale-2"], pairs["--flow-shift"],
            pairs["--strategy"]) == ("4", "3", "12", "ulysses")
    assert f"--negative-prompt={model.negative_prompt}" in args  # the model's default
    tiled = model.model_copy(update={"vae_tiling": True, "attention_backend": "flash",
                                     "compile": True, "tf32": True})
    extra = model_args(tiled)
    assert {"--vae-tiling", "--compile", "--tf32"} <= set(extra)
    assert extra[extra.index("--attention-backend") + 1] == "flash"
    assert "--guidance-scale-2" not in model_args(REGISTRY["wan2.2-ti2v-5b"])


def test_a_tasks_own_negative_prompt_wins_over_the_models_default() -> None:
    args = job_args(_spec("wan2.2-t2v-a14b", negative_prompt="--blurry"))
    assert [a for a in args if a.startswith("--negative-prompt")] == ["--negative-prompt=--blurry"]
    assert not [a for a in job_args(_spec("tiny-t2v")) if a.startswith("--negative-prompt")]
