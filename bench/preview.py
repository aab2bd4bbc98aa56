"""What live previews cost the denoising loop, on a tiny random-weight model.

In one process, on one tiny checkpoint loaded once (``Engine.load``, the job's code
path), the same generation runs alternately with previews off and on, ``--repeat`` times
each, and the engine's own ``denoise_s`` is compared (medians, and minima: the least disturbed
run of each mode on a busy machine). With previews on, the
job's ``Previewer`` takes a preview after each step the throttle allows: the denoising
thread copies the middle latent frame; the preview thread projects it, encodes a JPEG and
writes it to a local object store (as the job uploads it; no Redis event, which is one
small ``MULTI``). Two throttles are measured: the defaults (one every 2 s, at most 8) and
the most a task can be asked for (every step, at most 8).

    .venv/bin/python bench/preview.py [--size 128*128] [--frames 9] [--steps 16]
        [--repeat 9] [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="128*128")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--short", action="store_true", help="5 repetitions")
    opts = parser.parse_args()
    repeat = 5 if opts.short else opts.repeat
    width, height = (int(x) for x in opts.size.split("*"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    from vidmaas.runtime import distributed, preview
    from vidmaas.runtime.engine import Engine, Request
    from vidmaas.runtime.tiny import make_tiny
    from vidmaas.storage.base import LocalStore, preview_key

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tmp = Path(tempfile.mkdtemp(prefix="vidmaas-bench-preview-"))
    model_dir = tmp / "tiny-t2v"
    make_tiny(model_dir, "t2v")
    engine = Engine.load(model_dir, plan=distributed.Plan("single", 1, 0), local_rank=0)
    store = LocalStore(tmp / "store")
    req = Request(prompt="a red fox in the snow", width=width, height=height,
                  num_frames=opts.frames, steps=opts.steps, seed=7)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"tiny-t2v {width}*{height}, {opts.frames} frames, {opts.steps} steps, "
          f"{repeat} repetitions per mode, interleaved")

    def sink(p: preview.Preview) -> None:
        asyncio.run(store.put_bytes(preview_key("t" + "0" * 25), p.data,
                                    content_type=preview.PREVIEW_CONTENT_TYPE))

    def run(throttle: preview.Throttle | None) -> tuple[float, int]:
        if throttle is None:
            return float(engine.generate(req).timings["denoise_s"]), 0
        with preview.Previewer(throttle=throttle, sink=sink) as previewer:
            out = engine.generate(req, on_latents=previewer.offer)
        return float(out.timings["denoise_s"]), previewer.sent

    modes: dict[str, Any] = {
        "off": lambda: None,
        "defaults (2 s, 8)": preview.Throttle,
        "every step (0 s, 8)": lambda: preview.Throttle(interval_s=0.0, max_count=8),
    }
    run(None)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    sent: dict[str, list[int]] = {m: [] for m in modes}
    started = time.monotonic()
    for _ in range(repeat):
        for name, throttle in modes.items():
            took, n = run(throttle())
            times[name].append(took)
            sent[name].append(n)
    off = statistics.median(times["off"])
    best_off = min(times["off"])
    print(f"{'mode':<22}{'median':>9}{'min':>9}{'previews':>10}{'median/off':>12}"
          f"{'min/off':>9}")
    for name in modes:
        med, best = statistics.median(times[name]), min(times[name])
        print(f"{name:<22}{med:>8.3f}s{best:>8.3f}s{statistics.median(sent[name]):>10.0f}"
              f"{med / off:>11.3f}×{best / best_off:>8.3f}×")
    print("all runs (s): " + "; ".join(f"{name}: " + " ".join(f"{x:.3f}" for x in values)
                                        for name, values in times.items()))
    print(f"measured in {time.monotonic() - started:.1f} s")

    # One preview's parts on their own, on a latent frame of this generation's shape.
    h, w = height // 8, width // 8
    frame = torch.randn(1, 16, (opts.frames - 1) // 4 + 1, h, w)
    parts: dict[str, list[float]] = {"host copy (denoising thread)": [], "projection": [],
                                     "JPEG": [], "store write": []}
    for _ in range(50):
        t = time.perf_counter()
        host, _ = preview._host_copy(frame[0, :, frame.shape[2] // 2])
        parts["host copy (denoising thread)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        pixels = preview.project(host)
        parts["projection"].append(time.perf_counter() - t)
        t = time.perf_counter()
        data = preview.encode_jpeg(pixels)
        parts["JPEG"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sink(preview.Preview(data=data, step=1, total=1, width=pixels.shape[1],
                             height=pixels.shape[0]))
        parts["store write"].append(time.perf_counter() - t)
    print(f"one preview's parts, median of 50 ({h}×{w} latent → "
          f"{pixels.shape[1]}×{pixels.shape[0]} JPEG of {len(data)} B):")
    for name, values in parts.items():
        print(f"  {name:<30}{statistics.median(values) * 1000:>9.3f} ms")


if __name__ == "__main__":
    main()
