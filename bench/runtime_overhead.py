"""How much the job runtime adds around the bare diffusers call, for one tiny task.

Runs, in the same invocation and on the same tiny random-weight checkpoint:

1. the whole ``vidmaas-job run`` as a process (events to a private Redis when
   ``redis-server`` is on PATH, upload to a local object store), ``--repeat`` times;
2. a bare process: ``python -c`` that imports diffusers, loads the pipeline and calls
   it once (what any runtime must pay at least);
3. the bare pipeline call alone, in this process, after a warm-up.

Prints each stage's time from the runtime's own timings (process start and imports,
model load, prompt encoding, denoising, decoding, encoding/watermark, upload), the
medians, and the ratios whole-run / bare-call and whole-run / bare-process.

    .venv/bin/python bench/runtime_overhead.py [--size 64*64] [--frames 9] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis(tmp: Path) -> tuple[str | None, subprocess.Popen[bytes] | None]:
    binary = shutil.which("redis-server")
    if binary is None:
        return None, None
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return f"redis://127.0.0.1:{port}/0", proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None, None


def _bare_code(model_dir: Path, w: int, h: int, frames: int, steps: int) -> str:
    return (
        "import torch\nfrom diffusers import DiffusionPipeline\n"
        f"p = DiffusionPipeline.from_pretrained({str(model_dir)!r})\n"
        "p.set_progress_bar_config(disable=True)\n"
        f"p(prompt='a red fox', height={h}, width={w}, num_frames={frames}, "
        f"num_inference_steps={steps}, generator=torch.Generator().manual_seed(1), "
        "output_type='np')\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="64*64")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    width, height = (int(x) for x in opts.size.split("*"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from vidmaas.domain.ids import new_task_id
    from vidmaas.runtime.tiny import make_tiny

    with tempfile.TemporaryDirectory(prefix="vidmaas-bench-") as tmp_s:
        tmp = Path(tmp_s)
        model_dir = tmp / "tiny-t2v"
        make_tiny(model_dir, "t2v")
        redis_url, redis_proc = _start_redis(tmp)
        try:
            runs = []
            for i in range(opts.repeat):
                work = tmp / f"work{i}"
                env = {**os.environ, "VIDMAAS_TASK_ID": new_task_id(),
                       "VIDMAAS_MODEL_DIR": str(model_dir), "VIDMAAS_WORK_DIR": str(work),
                       "VIDMAAS_STORAGE_URL": (tmp / "objects").as_uri(),
                       "VIDMAAS_REDIS_URL": redis_url or ""}
                cmd = [str(BIN / "vidmaas-job"), "run", "--prompt", "a red fox", "--model",
                       "tiny-t2v", "--size", opts.size, "--frame-num", str(opts.frames),
                       "--sample-steps", str(opts.steps), "--seed", "1"]
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                wall_s = time.perf_counter() - t
                if proc.returncode != 0:
                    sys.exit(f"vidmaas-job run failed ({proc.returncode}):\n{proc.stderr}")
                timings = json.loads((work / ".vidmaas" / "timings.json").read_text())
                timings["whole_run_s"] = wall_s
                runs.append(timings)

            bare_process = []
            code = _bare_code(model_dir, width, height, opts.frames, opts.steps)
            for _ in range(opts.repeat):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], env=dict(os.environ),
                               capture_output=True, check=True)
                bare_process.append(time.perf_counter() - t)

            import torch
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(model_dir)
            pipe.set_progress_bar_config(disable=True)

            def call() -> float:
                t = time.perf_counter()
                pipe(prompt="a red fox", height=height, width=width, num_frames=opts.frames,
                     num_inference_steps=opts.steps,
                     generator=torch.Generator().manual_seed(1), output_type="np")
                return time.perf_counter() - t

            call()  # warm-up
            bare_call = [call() for _ in range(max(3, opts.repeat))]
        finally:
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait()

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in runs)

    stages = ["imports_s", "load_model_s", "encode_prompt_s", "denoise_s", "decode_s",
              "postprocess_s", "upload_s"]
    whole = med("whole_run_s")
    other = whole - sum(med(k) for k in stages)
    print(f"tiny t2v {opts.size}, {opts.frames} frames, {opts.steps} steps; "
          f"median of {opts.repeat}; events to Redis: {'yes' if redis_url else 'no'}")
    print(f"{'stage':38s} seconds")
    labels = {
        "imports_s": "imports (torch, diffusers)", "load_model_s": "model load",
        "encode_prompt_s": "prompt encoding", "denoise_s": "denoise",
        "decode_s": "VAE decode", "postprocess_s": "watermark + H.264 encode + poster",
        "upload_s": "upload"}
    print(f"{'process start, CLI, events, other':38s} {other:8.3f}")
    for key in stages:
        print(f"{labels[key]:38s} {med(key):8.3f}")
    print(f"{'whole vidmaas-job run':38s} {whole:8.3f}")
    bp = statistics.median(bare_process)
    bc = statistics.median(bare_call)
    print(f"{'bare process (import+load+call)':38s} {bp:8.3f}")
    print(f"{'bare pipeline call (in process)':38s} {bc:8.3f}")
    print(f"ratio whole run / bare call:    {whole / bc:8.1f}x")
    print(f"ratio whole run / bare process: {whole / bp:8.2f}x")


if __name__ == "__main__":
    main()
