"""The GPU check (``scripts/gpu-check.sh``): the runtime on a real accelerator, in minutes.

Sections, in order, each printing its figures and a PASS / FAIL / SKIP line:

- ``environment``: torch, CUDA, the GPUs, diffusers and transformers versions.
- ``plan``: ``vidmaas models plan`` for the shipped registry.
- ``tiny``: every tiny layout through ``Engine`` (bf16 on CUDA).
- ``ti2v_full``: the full-size TI2V-5B architecture (written-down configs, random
  weights) at 1280*704, 121 frames, 2 steps: the bare diffusers pipeline, then the
  engine, on the same checkpoint: seconds per step, peak GPU memory, the plan's
  estimate beside the measured peak, whether the frames are identical. PASS needs the
  engine's step within 1.05× the bare pipeline's.
- ``a14b_swap``: a two-expert A14B checkpoint at full width with fewer blocks (said in
  the output; 4 of 40 on a GPU), generated with the expert swap and with both experts
  resident: the frames must be identical; the peaks and moves are printed.
- ``cfg_parallel``: 2 ranks against 1 with ``vidmaas-job generate`` under torchrun: the
  frames must be identical. NCCL on 2 GPUs; with one GPU (NCCL cannot put two ranks on
  one device) over gloo on the CPU, which the output says.
- ``ulysses``: 2 ranks with Ulysses against 1 (needs 2 GPUs): the difference printed.

``--smoke`` runs the same code on the CPU at toy sizes (tiny architectures instead of
the full-size ones; the multi-rank sections, which the test suite covers, skipped), so
the test suite checks this module in seconds. Sections past ``--budget-s`` are skipped.
A JSON report is written to ``--out``. The exit code is 1 if any section failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vidmaas.runtime import architectures, distributed, memory
from vidmaas.runtime.engine import Engine, Options, Request, pick_device
from vidmaas.runtime.plan import gib
from vidmaas.runtime.random_checkpoint import reduced, write_random_checkpoint
from vidmaas.runtime.residency import dtype_keyword

STEP_RATIO_GOAL = 1.05
PROMPT = "a red fox running through fresh snow, golden hour, cinematic"


@dataclass
class Check:
    smoke: bool
    work: Path
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> Any:
        return pick_device(0)[0]

    @property
    def gpus(self) -> int:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0


def say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the check's output is its report


def compare(a: Any, b: Any) -> dict[str, Any]:
    """How two uint8 videos differ: identical, max and mean absolute difference, PSNR."""
    if a.shape != b.shape:
        return {"identical": False, "shape": [list(a.shape), list(b.shape)]}
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mse = float((diff.astype(np.float64) ** 2).mean())
    return {"identical": bool(not diff.any()), "max_abs": int(diff.max()),
            "mean_abs": round(float(diff.mean()), 4),
            "psnr_db": None if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)}


def step_ratio(ours_s: list[float], bare_s: list[float]) -> float:
    """Our seconds per step over the bare pipeline's: the faster step of each (the first
    pays one-off costs: kernel selection, caches)."""
    return min(ours_s) / min(bare_s)


class _Timer:
    def __init__(self, device: Any) -> None:
        self.device = device
        self.marks: list[float] = []

    def start(self) -> None:
        self._sync()
        self.marks = [time.perf_counter()]

    def mark(self) -> None:
        self._sync()
        self.marks.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [round(b - a, 4) for a, b in zip(self.marks, self.marks[1:], strict=False)]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def _peak(device: Any, *, reset: bool = False) -> int | None:
    if device.type != "cuda":
        return None
    import torch

    if reset:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return None
    return int(torch.cuda.max_memory_allocated(device))


# ---------------------------------------------------------------- sections

def environment(c: Check) -> dict[str, Any]:
    import importlib

    import torch

    diffusers: Any = importlib.import_module("diffusers")
    transformers: Any = importlib.import_module("transformers")
    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "diffusers": diffusers.__version__,
                           "transformers": transformers.__version__, "gpus": c.gpus}
    for i in range(c.gpus):
        p = torch.cuda.get_device_properties(i)
        out[f"gpu{i}"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB"
    return out


def plan(c: Check) -> dict[str, Any]:
    from vidmaas.domain.models import ModelRegistry
    from vidmaas.runtime.plan import format_plans, plan_registry

    plans = plan_registry(ModelRegistry.load().values())
    say(format_plans(plans).rstrip())
    unfit = [d.model for d, _ in plans if not d.fits]
    return {"ok": not unfit, "unfit": unfit}


def tiny(c: Check) -> dict[str, Any]:
    from PIL import Image

    from vidmaas.runtime.tiny import make_tiny

    image = c.work / "input.png"
    Image.new("RGB", (96, 64), (200, 40, 30)).save(image)
    out: dict[str, Any] = {"ok": True}
    for layout in ("t2v", "a14b") if c.smoke else ("t2v", "ti2v", "a14b", "a14b-i2v"):
        directory = c.work / f"tiny-{layout}"
        if not directory.exists():
            make_tiny(directory, layout)
        t = time.perf_counter()
        engine = Engine.load(directory, plan=distributed.Plan("single", 1, 0), local_rank=0,
                             options=Options(flow_shift=5.0))
        result = engine.generate(Request(
            prompt=PROMPT, width=64, height=64, num_frames=9, steps=4, seed=1,
            negative_prompt="blurry", guidance_scale=4.0, guidance_scale_2=3.0,
            image=image if layout in ("ti2v", "a14b-i2v") else None))
        good = bool(result.frames.std() > 0)
        out[layout] = {"shape": list(result.frames.shape), "dtype": str(engine.dtype),
                       "seconds": round(time.perf_counter() - t, 2), "varied": good,
                       "moves": len(result.moves)}
        out["ok"] = out["ok"] and good
    return out


def _generate(engine: Engine, req: Request, device: Any) -> tuple[Any, list[float]]:
    from vidmaas.domain.events import Stage

    timer = _Timer(device)
    timer.start()

    def on_stage(stage: Stage) -> None:
        if stage is Stage.DENOISE:  # the steps alone (the bare pipeline's first step
            timer.start()           # also holds its prompt encoding: ``step_ratio``)

    def on_step(_step: int, _total: int) -> None:
        timer.mark()

    frames = engine.generate(req, on_step=on_step, on_stage=on_stage).frames
    return frames, timer.steps()


def _bare(directory: Path, req: Request, device: Any) -> tuple[Any, list[float], int | None]:
    """The plain diffusers way: the pipeline from the directory, on the device, called."""
    import importlib

    import torch

    diffusers: Any = importlib.import_module("diffusers")
    key = dtype_keyword("diffusers")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = diffusers.AutoencoderKLWan.from_pretrained(directory, subfolder="vae",
                                                     **{key: torch.float32})
    pipe = diffusers.DiffusionPipeline.from_pretrained(directory, vae=vae, **{key: dtype})
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    timer = _Timer(device)

    def step_end(_p: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        timer.mark()
        return kwargs

    timer.start()
    video = pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, height=req.height,
                 width=req.width, num_frames=req.num_frames, num_inference_steps=req.steps,
                 guidance_scale=req.guidance_scale,
                 generator=torch.Generator(device="cpu").manual_seed(req.seed),
                 output_type="np", callback_on_step_end=step_end).frames[0]
    peak = _peak(device)
    frames = (np.asarray(video, dtype=np.float32) * 255.0).round().clip(0, 255).astype(np.uint8)
    del pipe, vae
    return frames, timer.steps(), peak


def ti2v_full(c: Check) -> dict[str, Any]:
    device = c.device
    if c.smoke:
        arch, note, size, frames = architectures.ARCHITECTURES["tiny-ti2v"], "tiny", (64, 64), 9
    else:
        arch, note = architectures.ARCHITECTURES["wan2.2-ti2v-5b"], "full size"
        size, frames = (1280, 704), 121
    directory = c.work / "ti2v-random"
    t = time.perf_counter()
    write_random_checkpoint(arch, directory, device=device, flow_shift=5.0)
    written_s = time.perf_counter() - t
    req = Request(prompt=PROMPT, width=size[0], height=size[1], num_frames=frames, steps=2,
                  seed=3, negative_prompt="blurry", guidance_scale=5.0)
    _peak(device, reset=True)
    bare_frames, bare_steps, bare_peak = _bare(directory, req, device)
    _peak(device, reset=True)
    t = time.perf_counter()
    engine = Engine.load(directory, plan=distributed.Plan("single", 1, 0), local_rank=0,
                         options=Options(flow_shift=5.0))
    load_s = time.perf_counter() - t
    ours_frames, ours_steps = _generate(engine, req, device)
    ours_peak = _peak(device)
    est = memory.estimate(arch, engine.placement, width=size[0], height=size[1],
                          frames=frames, image=False, nproc_per_node=1)
    ratio = step_ratio(ours_steps, bare_steps)
    same = compare(ours_frames, bare_frames)
    say(f"  {arch.name} ({note}) at {size[0]}*{size[1]}, {frames} frames, 2 steps: "
        f"bare diffusers {bare_steps} s/step, peak {gib(bare_peak)}; vidmaas {ours_steps} "
        f"s/step, peak {gib(ours_peak)}; step ratio {ratio:.3f} (goal <= {STEP_RATIO_GOAL})")
    say(f"  plan estimate: peak {gib(est.gpu_peak_bytes)} incl. overhead; largest phase "
        f"{gib(max(p.total_bytes for p in est.phases))} vs measured {gib(ours_peak)}; "
        f"frames identical to the bare pipeline's: {same['identical']}")
    ok = same["identical"] and (c.smoke or ratio <= STEP_RATIO_GOAL)
    return {"ok": ok, "architecture": arch.name, "size": list(size), "frames": frames,
            "bare_step_s": bare_steps, "ours_step_s": ours_steps, "step_ratio": round(ratio, 4),
            "bare_peak_bytes": bare_peak, "ours_peak_bytes": ours_peak,
            "estimate_peak_bytes": est.gpu_peak_bytes, "write_s": round(written_s, 1),
            "load_s": round(load_s, 1), "compare": same}


def a14b_swap(c: Check) -> dict[str, Any]:
    device = c.device
    if c.smoke:
        arch, note = architectures.ARCHITECTURES["tiny-a14b"], "tiny"
        size, frames = (64, 64), 9
    else:
        arch, note = reduced(architectures.ARCHITECTURES["wan2.2-t2v-a14b"], layers=4,
                             text_layers=2)
        size, frames = (832, 480), 81
    directory = c.work / "a14b-random"
    write_random_checkpoint(arch, directory, device=device, flow_shift=12.0)
    req = Request(prompt=PROMPT, width=size[0], height=size[1], num_frames=frames, steps=4,
                  seed=4, negative_prompt="blurry", guidance_scale=4.0, guidance_scale_2=3.0)
    runs: dict[str, Any] = {}
    for name, swap in (("swap", True), ("resident", False)):
        _peak(device, reset=True)
        engine = Engine.load(directory, plan=distributed.Plan("single", 1, 0), local_rank=0,
                             options=Options(flow_shift=12.0, expert_swap=swap))
        experts = engine.experts_by_step(engine.pipe, req.steps)
        t = time.perf_counter()
        out = engine.generate(req)
        runs[name] = {"frames": out.frames, "peak": _peak(device),
                      "seconds": round(time.perf_counter() - t, 2),
                      "moves": [" ".join(m) for m in out.moves], "experts": experts}
        del engine
    same = compare(runs["swap"]["frames"], runs["resident"]["frames"])
    for name in ("swap", "resident"):
        say(f"  {name}: peak {gib(runs[name]['peak'])}, {runs[name]['seconds']} s; moves: "
            f"{'; '.join(runs[name]['moves'])}")
    say(f"  {arch.name} ({note}) at {size[0]}*{size[1]}, {frames} frames; experts by step "
        f"{runs['swap']['experts']}; frames identical: {same['identical']}")
    lower = c.smoke or (runs["swap"]["peak"] or 0) < (runs["resident"]["peak"] or 0)
    return {"ok": same["identical"] and lower, "architecture": arch.name, "compare": same,
            **{f"{n}_{k}": runs[n][k] for n in runs for k in ("peak", "seconds", "moves")}}


def _job(c: Check, directory: Path, *, name: str, ranks: int, strategy: str,
         env_extra: dict[str, str]) -> Any:
    work = c.work / f"job-{name}"
    env = {**os.environ, "VIDMAAS_MODEL_DIR": str(directory), "VIDMAAS_WORK_DIR": str(work),
           "VIDMAAS_HEARTBEAT_INTERVAL_S": "0", "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("VIDMAAS_REDIS_URL", None)
    args = ["-m", "vidmaas.runtime.cli", "generate", f"--prompt={PROMPT}", "--size", "64*64",
            "--frame-num", "9", "--sample-steps", "4", "--seed", "2", "--model", "gpu-check",
            "--negative-prompt=blurry", "--guidance-scale", "4", "--strategy", strategy]
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                     str(ranks)]
    proc = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return np.load(work / "output" / "frames.npy")


def _ranks(c: Check, strategy: str) -> dict[str, Any]:
    from vidmaas.runtime.tiny import make_tiny

    directory = c.work / "tiny-t2v"
    if not directory.exists():
        make_tiny(directory, "t2v")
    env: dict[str, str] = {}
    note = f"NCCL on {min(c.gpus, 2)} GPUs"
    if c.gpus < 2:
        env["CUDA_VISIBLE_DEVICES"] = ""
        note = "one GPU: NCCL cannot put 2 ranks on one device, so gloo on the CPU"
    one = _job(c, directory, name=f"{strategy}-1", ranks=1, strategy="single", env_extra=env)
    two = _job(c, directory, name=f"{strategy}-2", ranks=2, strategy=strategy, env_extra=env)
    result = compare(one, two)
    say(f"  {strategy} over 2 ranks ({note}) vs 1 rank: {result}")
    return {"note": note, "compare": result, "ok": result["identical"] if strategy ==
            "cfg_parallel" else (result.get("mean_abs", 255) <= 4)}


def cfg_parallel(c: Check) -> dict[str, Any]:
    if c.smoke:
        return {"skipped": "smoke: tests/runtime/test_distributed.py runs it on the CPU"}
    return _ranks(c, "cfg_parallel")


def ulysses(c: Check) -> dict[str, Any]:
    if c.gpus < 2:
        return {"skipped": f"Ulysses needs 2 GPUs; this machine has {c.gpus}"}
    return _ranks(c, "ulysses")


SECTIONS: list[tuple[str, Callable[[Check], dict[str, Any]]]] = [
    ("environment", environment), ("plan", plan), ("tiny", tiny), ("ti2v_full", ti2v_full),
    ("a14b_swap", a14b_swap), ("cfg_parallel", cfg_parallel), ("ulysses", ulysses)]


def run(c: Check, only: list[str] | None = None) -> bool:
    ok = True
    for name, section in SECTIONS:
        if only and name not in only:
            continue
        say(f"== {name}")
        if time.monotonic() - c.started > c.budget_s:
            result: dict[str, Any] = {"skipped": f"past the {c.budget_s:.0f} s budget"}
        else:
            t = time.monotonic()
            try:
                result = section(c)
            except Exception as e:  # a section's failure is reported, the others still run
                result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}",
                          "traceback": traceback.format_exc()[-3000:]}
            result["seconds"] = round(time.monotonic() - t, 1)
        verdict = "SKIP" if "skipped" in result else "PASS" if result.get("ok", True) else \
            "FAIL"
        ok = ok and verdict != "FAIL"
        shown = {k: v for k, v in result.items() if k not in ("traceback", "frames")}
        say(f"{verdict} {name}: {json.dumps(shown, default=str)[:1500]}")
        c.report[name] = result
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidmaas.runtime.gpucheck",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="write gpu-check.json here")
    parser.add_argument("--work", type=Path, default=None, help="scratch (default: a temp dir)")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--only", nargs="*", default=None, help="run only these sections")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vidmaas-gpucheck-") as tmp:
        c = Check(smoke=args.smoke, work=args.work or Path(tmp), budget_s=args.budget_s)
        c.work.mkdir(parents=True, exist_ok=True)
        ok = run(c, args.only)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu-check.json").write_text(json.dumps(
                {k: {kk: vv for kk, vv in v.items() if kk != "frames"}
                 for k, v in c.report.items()}, indent=2, default=str))
    say(f"gpu-check: {'PASS' if ok else 'FAIL'} in {time.monotonic() - c.started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
