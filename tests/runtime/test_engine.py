"""The engine follows its memory plan and Wan's quality defaults, on tiny models in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vidmaas.runtime import distributed
from vidmaas.runtime.engine import Engine, Options, Request
from vidmaas.runtime.errors import ModelError

SINGLE = distributed.Plan("single", 1, 0)


def _request(**kw: Any) -> Request:
    base: dict[str, Any] = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64,
                            "num_frames": 5, "steps": 4, "seed": 5, "negative_prompt": "blurry",
                            "guidance_scale": 4.0, "guidance_scale_2": 3.0}
    return Request(**(base | kw))


def _watch_transformers(engine: Engine) -> list[tuple[str, bool, bool]]:
    """Record, at every transformer forward, which expert ran and which were loaded."""
    seen: list[tuple[str, bool, bool]] = []
    pipe = engine.pipe
    original = engine.components.ensure

    def hook(name: str) -> Any:
        def pre(_module: Any, _args: Any) -> None:
            seen.append((name, pipe.transformer is not None, pipe.transformer_2 is not None))
        return pre

    def ensure(name: str) -> Any:
        module = original(name)
        if name.startswith("transformer") and not getattr(module, "_watched", False):
            module.register_forward_pre_hook(hook(name))
            module._watched = True
        return module

    engine.components.ensure = ensure  # type: ignore[method-assign]
    for name in ("transformer", "transformer_2"):
        if engine.components.get(name) is not None:
            ensure(name)
    return seen


def test_only_the_active_a14b_expert_is_loaded_and_the_swap_changes_nothing(
        tiny_models: dict[str, Path]) -> None:
    swapping = Engine.load(tiny_models["a14b"], plan=SINGLE, local_rank=0,
                           options=Options(flow_shift=12.0))
    assert swapping.components.get("transformer_2") is None  # not loaded before it is needed
    experts = swapping.experts_by_step(swapping.pipe, 4)
    boundary = experts.index("transformer_2")
    assert 0 < boundary < 4, experts  # both experts denoise some steps
    seen = _watch_transformers(swapping)
    out = swapping.generate(_request())

    # At every forward exactly the active expert was loaded.
    assert [name for name, _, _ in seen] == [e for e in experts for _ in (0, 1)]
    assert all((t1, t2) == (name == "transformer", name == "transformer_2")
               for name, t1, t2 in seen), seen
    assert out.moves == [
        ("encode_prompt", "release", "text_encoder"),
        (f"step {boundary}", "release", "transformer"),
        (f"step {boundary}", "load", "transformer_2"),
        ("step 4", "release", "transformer_2"),  # before decode
    ]

    resident = Engine.load(tiny_models["a14b"], plan=SINGLE, local_rank=0,
                           options=Options(flow_shift=12.0, expert_swap=False))
    both = resident.generate(_request())
    assert ("step 4", "release", "transformer") in both.moves
    assert not [m for m in both.moves if m[0].startswith("step") and m[2] == "transformer"
                and m[0] != "step 4"]
    assert np.array_equal(out.frames, both.frames)
    assert out.frames.std() > 0


def test_the_text_encoder_is_gone_before_denoising_and_the_transformer_before_decoding(
        tiny_models: dict[str, Path]) -> None:
    engine = Engine.load(tiny_models["t2v"], plan=SINGLE, local_rank=0)
    seen_at_decode: list[tuple[Any, Any]] = []
    vae = engine.pipe.vae
    decode = vae.decode

    def watched_decode(*args: Any, **kwargs: Any) -> Any:
        seen_at_decode.append((engine.pipe.text_encoder, engine.pipe.transformer))
        return decode(*args, **kwargs)

    vae.decode = watched_decode
    seen = _watch_transformers(engine)
    encoders_at_forward: list[Any] = []
    engine.pipe.transformer.register_forward_pre_hook(
        lambda *_: encoders_at_forward.append(engine.pipe.text_encoder))
    out = engine.generate(_request(steps=2))
    assert len(seen) == 4 and encoders_at_forward == [None] * 4
    assert seen_at_decode == [(None, None)]
    # The next generation loads what it needs again, and gives the same video.
    again = engine.generate(_request(steps=2))
    assert ("encode_prompt", "load", "text_encoder") in again.moves
    assert np.array_equal(out.frames, again.frames)


def test_kept_loaded_components_wait_in_host_memory_instead_of_being_released(
        tiny_models: dict[str, Path]) -> None:
    engine = Engine.load(tiny_models["a14b"], plan=SINGLE, local_rank=0,
                         options=Options(keep_loaded=True))
    out = engine.generate(_request(steps=4))
    assert {action for _, action, _ in out.moves} <= {"to_host", "to_device", "load"}
    assert engine.components.get("text_encoder") is not None


def test_the_memory_saving_plan_loads_the_transformer_after_the_text_encoder_is_gone(
        tiny_models: dict[str, Path]) -> None:
    engine = Engine.load(tiny_models["t2v"], plan=SINGLE, local_rank=0,
                         options=Options(memory_saving=True))
    assert engine.components.get("transformer") is None
    assert engine.placement.vae_tiling and engine.placement.sequential_load
    assert not engine.placement.cpu_offload  # nothing to offload to on a CPU
    out = engine.generate(_request(steps=2))
    assert out.moves[:2] == [("encode_prompt", "release", "text_encoder"),
                             ("encode_prompt", "load", "transformer")]
    assert out.frames.shape == (5, 64, 64, 3)


def test_the_flow_shift_is_set_on_the_scheduler_and_changes_the_video(
        tiny_models: dict[str, Path]) -> None:
    plain = Engine.load(tiny_models["t2v"], plan=SINGLE, local_rank=0)
    shifted = Engine.load(tiny_models["t2v"], plan=SINGLE, local_rank=0,
                          options=Options(flow_shift=12.0))
    assert plain.pipe.scheduler.config.flow_shift == 3.0  # the checkpoint's own
    assert shifted.pipe.scheduler.config.flow_shift == 12.0
    assert type(shifted.pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    a = plain.generate(_request(steps=3)).frames
    b = shifted.generate(_request(steps=3)).frames
    assert not np.array_equal(a, b)


def test_the_negative_prompt_of_the_request_is_what_gets_encoded(
        tiny_models: dict[str, Path]) -> None:
    engine = Engine.load(tiny_models["t2v"], plan=SINGLE, local_rank=0)
    calls: list[dict[str, Any]] = []
    encode = engine.pipe.encode_prompt

    def recording(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return encode(**kwargs)

    engine.pipe.encode_prompt = recording
    wan = "色调艳丽，过曝，静态"
    engine.generate(_request(steps=1, negative_prompt=wan))
    assert calls[0]["negative_prompt"] == wan and calls[0]["do_classifier_free_guidance"]


@pytest.mark.parametrize(("layout", "image_size", "request_size", "expected"), [
    # A 3:2 picture asked for at a portrait 64*96 area comes out 3:2 landscape.
    ("a14b-i2v", (300, 200), (64, 96), (96, 64)),
    ("ti2v", (300, 200), (64, 96), (96, 64)),  # TI2V: multiples of 32
    ("a14b-i2v", (80, 48), (64, 64), (80, 48)),
])
def test_image_to_video_follows_the_image_aspect_ratio_at_the_requested_area(
        tiny_models: dict[str, Path], tmp_path: Path, layout: str,
        image_size: tuple[int, int], request_size: tuple[int, int],
        expected: tuple[int, int]) -> None:
    path = tmp_path / "in.png"
    picture = Image.new("RGB", image_size, (200, 30, 30))
    picture.paste((10, 10, 240), (0, 0, image_size[0] // 2, image_size[1]))
    picture.save(path)
    engine = Engine.load(tiny_models[layout], plan=SINGLE, local_rank=0)
    out = engine.generate(_request(steps=2, image=path, width=request_size[0],
                                   height=request_size[1]))
    assert (out.width, out.height) == expected
    assert out.frames.shape == (5, expected[1], expected[0], 3)


def test_an_unknown_attention_backend_is_refused_before_loading(
        tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="unknown attention backend") as info:
        Engine.load(tiny_models["t2v"], plan=SINGLE, local_rank=0,
                    options=Options(attention_backend="warp_drive"))
    assert "native" in info.value.message and not info.value.retryable


@pytest.fixture
def restore_attention_backend() -> Any:
    """``set_attention_backend`` also sets diffusers' process-wide default: put it back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(before)


@pytest.mark.usefixtures("restore_attention_backend")
def test_the_attention_backend_reaches_every_attention_processor_of_every_expert_loaded(
        tiny_models: dict[str, Path]) -> None:
    engine = Engine.load(tiny_models["a14b"], plan=SINGLE, local_rank=0,
                         options=Options(attention_backend="_native_math", flow_shift=12.0))
    backends: dict[str, set[str]] = {}
    original = engine.components.ensure

    def ensure(name: str) -> Any:
        module = original(name)
        if name.startswith("transformer"):
            def pre(m: Any, _args: Any) -> None:
                backends.setdefault(name, set()).update(
                    str(getattr(getattr(x.processor, "_attention_backend", None), "value",
                                None)) for x in m.modules() if hasattr(x, "processor"))
            module.register_forward_pre_hook(pre)
        return module

    engine.components.ensure = ensure  # type: ignore[method-assign]
    out = engine.generate(_request(steps=4))
    assert out.frames.shape == (5, 64, 64, 3)
    # transformer_2 was read at the boundary: it got the backend too.
    assert backends == {"transformer": {"_native_math"}, "transformer_2": {"_native_math"}}


def test_compiling_the_transformer_compiles_each_repeated_block_and_still_runs(
        tiny_models: dict[str, Path]) -> None:
    from vidmaas.runtime import speed

    engine = Engine.load(tiny_models["t2v"], plan=SINGLE, local_rank=0,
                         options=Options(expert_swap=False))
    module = engine.components.get("transformer")
    # The "eager" dynamo backend traces every block as the real one does, without a C++
    # compiler (on a GPU the engine uses the default, inductor).
    speed.prepare_transformer(module, attention_backend=None, compile=True, backend="eager")
    module._vidmaas_prepared = True
    assert speed.compiled_blocks(module) == module.config.num_layers
    out = engine.generate(_request(steps=1))
    assert out.frames.shape == (5, 64, 64, 3)


def test_tf32_turns_on_fp32_matmuls_and_convolutions_in_tf32() -> None:
    import torch

    from vidmaas.runtime import speed

    before = (torch.backends.cuda.matmul.fp32_precision,
              torch.backends.cudnn.conv.fp32_precision)
    try:
        speed.enable_tf32()
        assert speed.tf32_enabled()
    finally:
        torch.backends.cuda.matmul.fp32_precision = before[0]
        torch.backends.cudnn.conv.fp32_precision = before[1]


def test_decoding_follows_the_vaes_execution_device_not_where_its_weights_wait(
        tiny_models: dict[str, Path]) -> None:
    import torch

    from vidmaas.runtime.engine import execution_device

    engine = Engine.load(tiny_models["t2v"], plan=SINGLE, local_rank=0)
    vae = engine.pipe.vae
    assert execution_device(vae) == torch.device("cpu")

    class Hook:  # what accelerate's offload hook carries
        execution_device = torch.device("cuda", 3)

    vae._hf_hook = Hook()
    try:
        assert execution_device(vae) == torch.device("cuda", 3)
        assert next(vae.parameters()).device == torch.device("cpu")
        # decode sends the latents there (which this CPU-only torch cannot do).
        with pytest.raises((RuntimeError, AssertionError), match=r"(?i)cuda"):
            engine.decode(torch.zeros(1, 16, 3, 8, 8))
    finally:
        del vae._hf_hook
