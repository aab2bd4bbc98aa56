"""Tiny checkpoints and the command line's promises (fast help, exact job arguments)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.conftest import VIDMAAS_JOB
from vidmaas.domain.jobs import JobSpec, job_args
from vidmaas.domain.models import ModelRegistry
from vidmaas.runtime.cli import build_parser
from vidmaas.runtime.job import JobArgs, JobEnv, WorkDir, cli_args
from vidmaas.runtime.tiny import make_tiny


def test_make_tiny_is_deterministic(tmp_path: Path) -> None:
    make_tiny(tmp_path / "a", "t2v")
    make_tiny(tmp_path / "b", "t2v")
    for name in ("transformer", "vae", "text_encoder"):
        (wa,) = (tmp_path / "a" / name).glob("*.safetensors")
        (wb,) = (tmp_path / "b" / name).glob("*.safetensors")
        assert wa.read_bytes() == wb.read_bytes()


def test_tiny_layouts_have_the_components_of_the_real_checkpoints(
        tiny_models: dict[str, Path]) -> None:
    t2v = json.loads((tiny_models["t2v"] / "model_index.json").read_text())
    ti2v = json.loads((tiny_models["ti2v"] / "model_index.json").read_text())
    a14b = json.loads((tiny_models["a14b"] / "model_index.json").read_text())
    assert t2v["_class_name"] == "WanPipeline" and t2v["transformer_2"] == [None, None]
    assert ti2v["expand_timesteps"] is True
    vae = json.loads((tiny_models["ti2v"] / "vae" / "config.json").read_text())
    assert (vae["z_dim"], vae["patch_size"]) == (48, 2)
    assert a14b["boundary_ratio"] == 0.875 and a14b["transformer_2"][1] == "WanTransformer3DModel"


def test_make_tiny_refuses_an_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown layout"):
        make_tiny(tmp_path, "sdxl")


def test_help_imports_neither_torch_nor_diffusers() -> None:
    code = ("import sys, vidmaas.runtime.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "fetch-input" in proc.stdout and "postprocess" in proc.stdout


def test_the_console_script_is_installed() -> None:
    proc = subprocess.run([VIDMAAS_JOB, "run", "--help"], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0 and "--sample-steps" in proc.stdout


def test_the_executors_arguments_parse_and_round_trip() -> None:
    prompt = 'say "hi"\n--seed 3'
    spec = ModelRegistry.load()["tiny-ti2v"]
    job = JobSpec(task_id="t" * 26, job_name="j", user_id="u", model=spec,
                  prompt=prompt, attempt=1, input_key="inputs/x/image.png",
                  negative_prompt="blur",
                  params={"size": "96*64", "num_frames": 9, "steps": 4, "seed": 11, "fps": 8})
    ns = build_parser().parse_args(["generate", *job_args(job)])
    args = JobArgs.from_namespace(ns)
    assert (args.prompt, args.width, args.height, args.frame_num, args.sample_steps,
            args.seed, args.model, args.fps, args.image, args.negative_prompt) == \
        (prompt, 96, 64, 9, 4, 11, "tiny-ti2v", 8, "inputs/x/image.png", "blur")
    again = JobArgs.from_namespace(build_parser().parse_args(["run", *cli_args(args)]))
    assert again == args


def test_the_registry_values_reach_the_runtime_through_the_arguments_alone() -> None:
    spec = ModelRegistry.load()["wan2.2-t2v-a14b"].model_copy(update={
        "vae_tiling": True, "attention_backend": "_native_cudnn", "tf32": True})
    job = JobSpec(task_id="t" * 26, job_name="j", user_id="u", model=spec, prompt="--",
                  attempt=2, memory_saving=True,
                  params={"size": "832*480", "num_frames": 17, "steps": 4, "seed": 1})
    args = JobArgs.from_namespace(build_parser().parse_args(["generate", *job_args(job)]))
    assert (args.prompt, args.guidance_scale, args.guidance_scale_2, args.flow_shift,
            args.strategy, args.negative_prompt) == \
        ("--", 4.0, 3.0, 12.0, "ulysses", spec.negative_prompt)
    assert (args.vae_tiling, args.cpu_offload, args.memory_saving, args.attention_backend,
            args.compile, args.tf32, args.fps) == \
        (True, False, True, "_native_cudnn", False, True, 16)
    again = JobArgs.from_namespace(build_parser().parse_args(["run", *cli_args(args)]))
    assert again == args
    # A later flag overrides an earlier one (how a test or an operator pins one value).
    off = JobArgs.from_namespace(build_parser().parse_args(
        ["generate", *job_args(job), "--no-vae-tiling", "--strategy", "auto"]))
    assert (off.vae_tiling, off.strategy) == (False, "auto")


def test_the_environment_is_read_only_when_asked() -> None:
    env = JobEnv.from_environ({
        "VIDMAAS_TASK_ID": "t1", "VIDMAAS_WORK_DIR": "/w", "VIDMAAS_HEARTBEAT_INTERVAL_S": "2",
        "PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",
        "VIDMAAS_TEST_FAULT": "oom_at_step=3,step_delay_s=0.1"})
    assert (env.task_id, env.heartbeat_interval_s, env.dist.job_world_size) == ("t1", 2.0, 8)
    assert not env.dist.is_reporter and not env.dist.under_torchrun
    assert env.fault == {"oom_at_step": "3", "step_delay_s": "0.1"}
    ranked = JobEnv.from_environ({"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"})
    assert ranked.dist.under_torchrun and ranked.dist.rank == 1 and not ranked.dist.is_reporter


def test_the_input_image_path_keeps_only_a_safe_extension() -> None:
    work = WorkDir(Path("w"))
    assert work.input_image("inputs/t/image.PNG") == Path("w/input/image.png")
    assert work.input_image("inputs/t/noext") == Path("w/input/image.img")
    assert work.input_image("inputs/t/x.../../../etc") == Path("w/input/image.img")


@pytest.mark.parametrize("prompt", ["--help", "-1 apples", "--seed 3"])
def test_a_prompt_that_looks_like_an_option_reaches_generate_as_typed(prompt: str) -> None:
    first = JobArgs.from_namespace(build_parser().parse_args(
        ["run", f"--prompt={prompt}", f"--negative-prompt={prompt}"]))
    again = JobArgs.from_namespace(build_parser().parse_args(["generate", *cli_args(first)]))
    assert (again.prompt, again.negative_prompt) == (prompt, prompt)
