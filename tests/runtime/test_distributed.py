"""Splitting one generation over ranks: CFG-parallel is exact, impossible shapes fail early."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.runtime.conftest import JOB_ARGS, TORCHRUN, VIDMAAS_JOB, job_env, registry_args
from vidmaas.runtime import distributed
from vidmaas.runtime.errors import ModelError


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "model"), [("t2v", "tiny-t2v"), ("a14b", "wan2.2-t2v-a14b")])
def test_two_rank_cfg_parallel_output_equals_single_process_output_exactly(
        tiny_models: dict[str, Path], tmp_path: Path, layout: str, model: str) -> None:
    import subprocess

    # The model's registry arguments (guidance 4/3, shift 12 for A14B), then the strategy
    # of each world size.
    args = ["generate", "--prompt", "a lighthouse at dusk", "--model", model, *JOB_ARGS,
            "--negative-prompt", "blurry", *registry_args(model)]
    frames = []
    for name, prefix, strategy in (
            ("one", [VIDMAAS_JOB], "single"),
            ("two", [TORCHRUN, "--standalone", "--nproc-per-node", "2", VIDMAAS_JOB],
             "cfg_parallel")):
        env = job_env(task_id="", redis_url="", storage=None, model_dir=tiny_models[layout],
                      work_dir=tmp_path / name)
        proc = subprocess.run([*prefix, *args, "--strategy", strategy], env=env,
                              capture_output=True, text=True, timeout=100, check=False,
                              start_new_session=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        frames.append(np.load(tmp_path / name / "output" / "frames.npy"))
    import json

    facts = json.loads((tmp_path / "two" / "output" / "result.json").read_text())
    assert (facts["world_size"], facts["strategy"]) == (2, "cfg_parallel")
    assert facts["transformer_evaluations"] == 3  # one branch per step on rank 0, not two
    assert frames[0].shape == (9, 64, 64, 3)
    assert np.array_equal(frames[0], frames[1])
    assert frames[0].std() > 0  # a real picture, not a constant


def test_one_rank_runs_plain_and_two_ranks_split_guidance() -> None:
    one = distributed.plan(world_size=1, rank=0, cuda=False, guidance=True, num_heads=2,
                           model="m")
    two = distributed.plan(world_size=2, rank=1, cuda=False, guidance=True, num_heads=2,
                           model="m")
    assert (one.strategy, two.strategy, two.rank) == ("single", "cfg_parallel", 1)


def test_more_ranks_use_ulysses_on_cuda_when_the_heads_divide_evenly() -> None:
    p = distributed.plan(world_size=8, rank=3, cuda=True, guidance=True, num_heads=40,
                         model="wan2.2-t2v-a14b")
    assert (p.strategy, p.world_size) == ("ulysses", 8)


@pytest.mark.parametrize(("world_size", "cuda", "guidance", "heads", "why"), [
    (3, False, True, 2, "without CUDA"),
    (2, False, False, 2, "no classifier-free guidance"),
    (3, True, True, 40, "attention heads"),
])
def test_a_world_size_the_model_cannot_use_is_a_model_error(
        world_size: int, cuda: bool, guidance: bool, heads: int, why: str) -> None:
    with pytest.raises(ModelError, match=why) as info:
        distributed.plan(world_size=world_size, rank=0, cuda=cuda, guidance=guidance,
                         num_heads=heads, model="m")
    assert info.value.code == "unsupported_world_size"
    assert not info.value.retryable


def test_a_declared_strategy_is_checked_against_the_world_size_before_any_collective() -> None:
    ok = distributed.plan(world_size=8, rank=0, cuda=True, guidance=True, num_heads=40,
                          model="wan2.2-t2v-a14b", strategy="ulysses")
    assert (ok.strategy, ok.world_size) == ("ulysses", 8)
    assert distributed.plan(world_size=2, rank=1, cuda=False, guidance=True, num_heads=2,
                            model="m", strategy="cfg_parallel").strategy == "cfg_parallel"
    for world_size, cuda, strategy, why in ((2, True, "single", "runs on one rank"),
                                            (4, True, "cfg_parallel", "exactly 2 ranks"),
                                            (2, False, "ulysses", "without CUDA"),
                                            (1, True, "ulysses", "2 or more ranks")):
        with pytest.raises(ModelError, match=why) as info:
            distributed.plan(world_size=world_size, rank=0, cuda=cuda, guidance=True,
                             num_heads=40, model="m", strategy=strategy)
        assert info.value.code == "unsupported_world_size" and not info.value.retryable


def test_a_cfg_splitter_is_installed_once_and_again_after_its_forward_was_replaced() -> None:
    class Module:
        def forward(self, *args: object, **kwargs: object) -> object:
            return ("original",)

    module = Module()
    p = distributed.Plan("cfg_parallel", 2, 1)
    splitter = distributed.prepare(p, module)
    assert splitter is not None and module.forward is splitter
    assert distributed.prepare(p, module) is splitter  # idempotent: no double wrapping
    module.forward = Module().forward  # as accelerate's offload hooks do when re-added
    assert distributed.prepare(p, module) is splitter and module.forward is splitter
    assert distributed.prepare(distributed.Plan("single", 1, 0), Module()) is None
