"""The job's steps: fetch-input, generate, postprocess, and run (all of them in order).

Guarantees:
- ``fetch_input`` leaves the input image at ``WorkDir.input_image(key)`` only if it
  is a readable image (written atomically, so concurrent ranks may all fetch); a
  missing or unreadable object is ``BadInput``; it does nothing when the file is
  already there (the initContainer fetched it). A store outage is retried within the
  store's retry policy, then is a retryable ``InfraError`` (``storage_unavailable``);
  a full disk is ``DiskFull``.
- ``generate`` checks the model directory and the world size (against ``--strategy``)
  before joining any process group, stops at once if the task was cancelled before it
  started, and leaves the frames and their facts (the real width and height, the plan)
  in the work directory (rank 0). Everything that shapes the generation comes from the
  job's arguments; no model registry is read.
- Out of memory during generate is an ``OutOfMemory`` whose message names the model,
  the size, the frames, the plan and its estimated peak, and which is final (never
  retried) when the memory-saving plan was already in use. A collective that waited past
  the collective timeout (a peer stopped) is a ``CollectiveTimeout`` (retried).
- Rank 0 publishes live previews while it denoises (``previews``, ``runtime.preview``):
  throttled, off the denoising thread, finished before the frames are saved.
- ``postprocess`` (rank 0's node only) uploads nothing if the task is cancelled,
  sends ``progress`` 100 only after every upload succeeded, then ``completed``.
- ``run`` chains the steps: in-process when it is itself under ``torchrun`` or the
  job has one process; otherwise ``torchrun … generate`` as a child, whose exit code
  it passes on (publishing ``failed`` only if the child could not).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vidmaas.domain.events import Stage
from vidmaas.domain.jobs import ENV_HEARTBEAT_INTERVAL_S, ExitCode
from vidmaas.runtime import distributed, faults, postprocess, preview
from vidmaas.runtime.engine import (
    Engine,
    Options,
    Request,
    check_image_use,
    import_libraries,
    num_attention_heads,
    read_model_index,
)
from vidmaas.runtime.errors import (
    BadInput,
    Cancelled,
    CollectiveTimeout,
    DiskFull,
    InfraError,
    JobError,
    ModelError,
    is_collective_timeout,
    is_disk_full,
    is_out_of_memory,
)
from vidmaas.runtime.job import JobArgs, JobEnv, WorkDir
from vidmaas.runtime.oom import out_of_memory
from vidmaas.runtime.reporter import Reporter

log = logging.getLogger(__name__)

DEFAULT_FPS = 16


class StepExited(Exception):
    """A child step ended with ``code`` and has reported its own outcome."""

    def __init__(self, code: int) -> None:
        super().__init__(f"step exited with {code}")
        self.code = code


@dataclass(slots=True)
class Context:
    env: JobEnv
    args: JobArgs
    reporter: Reporter

    @property
    def work(self) -> WorkDir:
        return WorkDir(self.env.work_dir)

    def store(self) -> postprocess.StoreConfig:
        if not self.env.storage_url:
            raise InfraError("VIDMAAS_STORAGE_URL is not set", code="config_error")
        return postprocess.StoreConfig(
            url=self.env.storage_url, endpoint_url=self.env.s3_endpoint_url,
            region=self.env.s3_region, access_key_id=self.env.access_key_id,
            secret_access_key=self.env.secret_access_key,
            retry_attempts=self.env.storage_retry_attempts,
            retry_total_s=self.env.storage_retry_total_s)

    def add_timings(self, timings: dict[str, float]) -> None:
        path = self.work.marker("timings.json")
        try:
            merged = self.work.read_json(path) if path.exists() else {}
        except (OSError, ValueError):
            merged = {}
        merged.update({k: round(v, 4) for k, v in timings.items()})
        self.work.write_json(path, merged)

    def timings(self) -> dict[str, float]:
        path = self.work.marker("timings.json")
        try:
            return {k: float(v) for k, v in self.work.read_json(path).items()}
        except (OSError, ValueError):
            return {}

    def check_cancel(self) -> None:
        by = self.reporter.cancel_requested()
        if by is not None:
            raise Cancelled(by)


# ---------------------------------------------------------------- fetch-input

def fetch_input(ctx: Context) -> None:
    key = ctx.args.image
    if not key:
        return
    path = ctx.work.input_image(key)
    if path.exists():
        log.info("task_id=%s input already fetched: %s", ctx.env.task_id, path)
        return
    ctx.reporter.stage(Stage.FETCH_INPUT)
    t = time.perf_counter()
    store = ctx.store()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download(store, key, tmp, task_id=ctx.env.task_id)
        _check_image(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    ctx.add_timings({"fetch_input_s": time.perf_counter() - t})
    ctx.reporter.progress(Stage.FETCH_INPUT, 1, 1)


def _download(store: postprocess.StoreConfig, key: str, path: Any, *, task_id: str) -> None:
    import asyncio

    from vidmaas.errors import InvalidRequest, NotFound, StorageUnavailable, VidmaasError
    from vidmaas.storage.retry import retrying

    policy = store.policy()

    async def fetch() -> None:
        s = store.open()
        await retrying(f"download of {key[:200]}", lambda: s.download(key, path),
                       policy=policy, context=f"task_id={task_id}")

    try:
        asyncio.run(fetch())
    except (NotFound, InvalidRequest) as e:
        raise BadInput(f"the input image {key[:200]} is not in the store",
                       code="input_missing") from e
    except (VidmaasError, OSError) as e:
        if is_disk_full(e):
            raise DiskFull(f"no space left to fetch the input image: {e}") from e
        if isinstance(e, StorageUnavailable):
            raise InfraError(f"the object store stayed unavailable ({policy.attempts} "
                             f"attempts, {policy.total_s:g} s at most): {e}",
                             code="storage_unavailable") from e
        raise InfraError(f"cannot fetch the input image: {e}", code="storage_error") from e


def _check_image(path: Any) -> None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # Pillow raises many kinds for bad bytes
        raise BadInput(f"the input image cannot be read: {e}", code="bad_image") from e


# ---------------------------------------------------------------- generate

def generate(ctx: Context) -> None:
    env, args, reporter = ctx.env, ctx.args, ctx.reporter
    if env.model_dir is None:
        raise ModelError("VIDMAAS_MODEL_DIR is not set", code="model_missing")
    check_image_use(read_model_index(env.model_dir), has_image=bool(args.image))
    reporter.started(world_size=env.dist.world_size, host=env.host)
    ctx.check_cancel()
    reporter.stage(Stage.LOAD_MODEL)  # importing torch and diffusers is part of it
    t = time.perf_counter()
    import torch

    cuda = torch.cuda.is_available()
    p = plan_for(env, args, cuda=cuda)
    import_libraries()
    imports_s = time.perf_counter() - t
    distributed.init_process_group(p, cuda=cuda, local_rank=env.dist.local_rank,
                                   timeout_s=env.collective_timeout_s)
    engine: Engine | None = None
    try:
        t = time.perf_counter()
        try:
            engine = Engine.load(env.model_dir, plan=p, local_rank=env.dist.local_rank,
                                 options=options_of(args))
        except Exception as e:
            if is_out_of_memory(e):
                raise out_of_memory(ctx.env, ctx.args, engine=None, world_size=p.world_size,
                                    strategy=p.strategy, cause=e) from e
            raise
        load_model_s = time.perf_counter() - t
        reporter.progress(Stage.LOAD_MODEL, 1, 1)
        generate_with(ctx, engine, timings={"imports_s": imports_s,
                                            "load_model_s": load_model_s})
    finally:
        distributed.destroy_process_group()


def plan_for(env: JobEnv, args: JobArgs, *, cuda: bool) -> distributed.Plan:
    """How this job's ranks share the work (``distributed.plan``), from its arguments."""
    assert env.model_dir is not None
    guidance = max(args.guidance_scale, args.guidance_scale_2 or 0.0) > 1.0
    return distributed.plan(world_size=env.dist.world_size, rank=env.dist.rank, cuda=cuda,
                            guidance=guidance, num_heads=num_attention_heads(env.model_dir),
                            model=args.model, strategy=args.strategy)


def generate_with(ctx: Context, engine: Engine, *, timings: dict[str, float]) -> None:
    """One generation on a loaded ``engine`` (every rank); rank 0 leaves the frames and
    their facts in the work directory. Used by ``generate`` and by a pool worker."""
    args, reporter = ctx.args, ctx.reporter
    p = engine.plan
    try:
        fault = faults.step_hook(ctx.env)

        def on_step(step: int, total: int) -> str | None:
            fault(step)
            reporter.progress(Stage.DENOISE, step, total)
            # Rank 0 decides for all (distributed.agree_on_cancel): no need to ask Redis.
            return reporter.cancel_requested() if p.rank == 0 else None

        req = Request(prompt=args.prompt, width=args.width, height=args.height,
                      num_frames=args.frame_num, steps=args.sample_steps, seed=args.seed,
                      negative_prompt=args.negative_prompt,
                      image=ctx.work.input_image(args.image) if args.image else None,
                      guidance_scale=args.guidance_scale,
                      guidance_scale_2=args.guidance_scale_2)
        with previews(ctx, rank=p.rank) as previewer:
            out = engine.generate(req, on_step=on_step, on_stage=reporter.stage,
                                  on_latents=previewer.offer if previewer else None)
        if p.rank == 0:
            reporter.progress(Stage.DECODE, 1, 1)
            save_frames(ctx.work.frames, out.frames)
            ctx.work.write_json(ctx.work.result, {
                "width": int(out.frames.shape[2]), "height": int(out.frames.shape[1]),
                "num_frames": int(out.frames.shape[0]), "seed": args.seed,
                "world_size": p.world_size, "strategy": p.strategy,
                "plan": engine.placement.describe(),
                "transformer_evaluations": out.transformer_evaluations,
                "moves": [list(m) for m in out.moves]})
            ctx.add_timings({**timings, **out.timings})
    except Exception as e:
        if is_out_of_memory(e):
            raise out_of_memory(ctx.env, ctx.args, engine=engine, world_size=p.world_size,
                                strategy=p.strategy, cause=e) from e
        if is_collective_timeout(e):
            raise CollectiveTimeout.of(e, rank=p.rank, world_size=p.world_size,
                                       timeout_s=ctx.env.collective_timeout_s) from e
        raise


class _Stream:
    """A file numpy cannot see through: ``np.save`` then writes it in chunks through
    Python (a failed write keeps its ``errno``, so a full disk reads as one) instead of
    C's ``fwrite``, which reports only "problem writing element N"."""

    def __init__(self, f: Any) -> None:
        self.write = f.write


def save_frames(path: Any, frames: Any) -> None:
    """``frames`` as ``.npy`` at ``path``, atomically."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".frames.tmp.npy")
    with tmp.open("wb") as f:
        np.save(_Stream(f), frames)
    os.replace(tmp, path)


@contextlib.contextmanager
def previews(ctx: Context, *, rank: int) -> Iterator[preview.Previewer | None]:
    """Live previews of this generation (``runtime.preview``), or None where there are
    none: not rank 0, none wanted (``VIDMAAS_PREVIEW_MAX=0``), or nowhere to put or
    announce them. The previews' thread is finished when the block ends."""
    env, reporter = ctx.env, ctx.reporter
    if rank != 0 or env.preview_max <= 0 or not env.storage_url or not env.task_id \
            or not reporter.reports:
        yield None
        return
    try:
        projection = preview.parse_projection(ctx.args.preview_rgb)
    except ValueError as e:
        log.warning("task_id=%s bad --preview-rgb, using the default projection: %s",
                    env.task_id, e)
        projection = None
    previewer = preview.Previewer(
        throttle=preview.Throttle(interval_s=env.preview_interval_s,
                                  max_count=env.preview_max),
        sink=preview.store_sink(task_id=env.task_id, store=ctx.store(), announcer=reporter),
        projection=projection, name=f"preview-{env.task_id}")
    try:
        yield previewer
    finally:
        previewer.close()


def options_of(args: JobArgs) -> Options:
    return Options(cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling,
                   flow_shift=args.flow_shift, memory_saving=args.memory_saving,
                   attention_backend=args.attention_backend, compile=args.compile,
                   tf32=args.tf32)


# ---------------------------------------------------------------- postprocess

def postprocess_step(ctx: Context) -> None:
    import numpy as np

    env, args, reporter = ctx.env, ctx.args, ctx.reporter
    ctx.check_cancel()
    reporter.stage(Stage.POSTPROCESS)
    t = time.perf_counter()
    try:
        facts = ctx.work.read_json(ctx.work.result)
        frames = np.load(ctx.work.frames)
    except (OSError, ValueError) as e:
        raise InfraError(f"generate left no frames in the work directory: {e}",
                         code="no_frames") from e
    fps = args.fps or DEFAULT_FPS
    marked = postprocess.watermark(frames, text=env.watermark_text, logo=env.watermark_logo)
    postprocess.encode_mp4(marked, ctx.work.video, fps=fps)
    postprocess.write_poster(marked, ctx.work.poster)
    sprite = postprocess.write_spritesheet(marked, ctx.work.spritesheet)
    postprocess_s = time.perf_counter() - t
    reporter.progress(Stage.POSTPROCESS, 1, 1)

    ctx.check_cancel()
    if not env.storage_url:
        log.info("task_id=%s no VIDMAAS_STORAGE_URL: the video stays at %s",
                 env.task_id, ctx.work.video)
        ctx.add_timings({"postprocess_s": postprocess_s})
        return
    if not env.task_id:
        raise InfraError("VIDMAAS_TASK_ID is not set", code="config_error")
    reporter.stage(Stage.UPLOAD)
    t = time.perf_counter()
    keys = postprocess.upload(ctx.store(), task_id=env.task_id, video=ctx.work.video,
                              poster=ctx.work.poster, spritesheet=ctx.work.spritesheet)
    ctx.add_timings({"postprocess_s": postprocess_s, "upload_s": time.perf_counter() - t})
    reporter.progress(Stage.UPLOAD, 1, 1)
    height, width = postprocess.even_crop(marked).shape[1:3]
    reporter.completed({
        **keys, "spritesheet": sprite, "width": width, "height": height,
        "num_frames": int(marked.shape[0]), "fps": fps,
        "duration_s": round(int(marked.shape[0]) / fps, 3), "seed": int(facts["seed"]),
        "timings": ctx.timings()})


# ---------------------------------------------------------------- run

def run(ctx: Context) -> None:
    env = ctx.env
    ctx.reporter.started(world_size=env.dist.job_world_size, host=env.host)
    fetch_input(ctx)
    if env.dist.under_torchrun or env.dist.job_world_size == 1:
        generate(ctx)
        if env.dist.rank != 0:
            return
    else:
        _torchrun_generate(ctx)
        ctx.reporter.reload_state()
    if env.dist.node_rank == 0:
        postprocess_step(ctx)


def torchrun_command(env: JobEnv, args: JobArgs) -> list[str]:
    """``torchrun … vidmaas.runtime.cli generate ARGS`` for this node."""
    from vidmaas.runtime.job import cli_args

    return [*torchrun_prefix(env), "-m", "vidmaas.runtime.cli", "generate", *cli_args(args)]


def torchrun_prefix(env: JobEnv) -> list[str]:
    """``torchrun`` with this node's share of the job (then the program to run)."""
    d = env.dist
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(d.nnodes),
           "--nproc-per-node", str(d.nproc_per_node)]
    master_addr = os.environ.get("MASTER_ADDR")
    if d.nnodes > 1 or master_addr:
        cmd += ["--node-rank", str(d.node_rank), "--master-addr", master_addr or "127.0.0.1",
                "--master-port", os.environ.get("MASTER_PORT", "29500")]
    else:
        cmd += ["--standalone"]
    return cmd


def _torchrun_generate(ctx: Context) -> None:
    cmd = torchrun_command(ctx.env, ctx.args)
    child_env = {**os.environ, ENV_HEARTBEAT_INTERVAL_S: "0"}  # this process keeps beating
    log.info("task_id=%s starting %s", ctx.env.task_id, " ".join(cmd[:12]))
    proc = subprocess.Popen(cmd, env=child_env)
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if code == 0:
        return
    if ctx.reporter.already_terminal():
        # torchrun answers 1 whatever its worker's code was: pass the worker's on.
        raise StepExited(ctx.work.recorded_exit_code() or code)
    known = code if code in {c.value for c in ExitCode} else ExitCode.INFRA_ERROR
    raise JobError(f"generate exited with {code} without reporting why",
                   code="generate_failed", exit_code=ExitCode(known))
