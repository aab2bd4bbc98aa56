"""The model registry."""

from __future__ import annotations

import pytest

from vidmaas.domain.models import ModelRegistry
from vidmaas.errors import InvalidRequest


def test_the_shipped_registry_has_the_wan22_models_with_their_real_limits() -> None:
    reg = ModelRegistry.load()
    ti2v = reg["wan2.2-ti2v-5b"]
    assert ti2v.sizes == ["1280*704", "704*1280"]
    assert (ti2v.default_frames, ti2v.default_steps, ti2v.fps) == (121, 50, 24)
    a14b = reg["wan2.2-t2v-a14b"]
    assert set(a14b.sizes) == {"1280*720", "720*1280", "832*480", "480*832"}
    assert (a14b.default_frames, a14b.default_steps, a14b.fps) == (81, 40, 16)
    assert reg["wan2.2-i2v-a14b"].image == "required"
    assert {"tiny-t2v", "tiny-ti2v"} <= set(reg)
    assert all((n - 1) % 4 == 0 for m in reg.values() for n in m.frame_counts)


def test_resolving_fills_defaults_and_refuses_what_the_model_cannot_do() -> None:
    m = ModelRegistry.load()["wan2.2-t2v-a14b"]
    p = m.resolve(size=None, num_frames=None, steps=None, seed=7, has_image=False)
    assert (p.size, p.num_frames, p.steps, p.seed, p.width, p.height) == \
        ("1280*720", 81, 40, 7, 1280, 720)
    assert m.resolve(size="832x480", num_frames=None, steps=None, seed=None,
                     has_image=False).size == "832*480"
    for kwargs, field in (({"size": "1280*704"}, "size"), ({"num_frames": 80}, "num_frames"),
                          ({"steps": 0}, "steps"), ({"seed": 2**40}, "seed")):
        args = {"size": None, "num_frames": None, "steps": None, "seed": None,
                "has_image": False} | kwargs
        with pytest.raises(InvalidRequest) as info:
            m.resolve(**args)  # type: ignore[arg-type]
        assert info.value.field == field
    with pytest.raises(InvalidRequest, match="takes no image"):
        m.resolve(size=None, num_frames=None, steps=None, seed=None, has_image=True)


@pytest.mark.parametrize(("bad", "why"), [
    ("models: [{id: x}]", "display_name"),
    ("models:\n - {id: m, display_name: M, pipeline: t2v, layout: t2v, sizes: ['65*64'],"
    " default_size: '65*64', frame_counts: [9], default_frames: 9, default_steps: 4,"
    " max_steps: 8, fps: 8, nproc_per_node: 1, nnodes: 1, model_dir: m, strategy: single,"
    " flow_shift: 3, gpu_memory_gib: 2, pod_memory_gib: 4}", "even sides"),
    ("models:\n - {id: m, display_name: M, pipeline: t2v, layout: t2v, sizes: ['64*64'],"
    " default_size: '64*64', frame_counts: [8], default_frames: 8, default_steps: 4,"
    " max_steps: 8, fps: 8, nproc_per_node: 1, nnodes: 1, model_dir: m, strategy: single,"
    " flow_shift: 3, gpu_memory_gib: 2, pod_memory_gib: 4}", "4k\\+1"),
    ("not: [valid", "invalid model registry"),
])
def test_a_malformed_registry_is_refused(bad: str, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        ModelRegistry.parse(bad)


WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def test_the_shipped_registry_carries_wan22s_quality_defaults() -> None:
    reg = ModelRegistry.load()
    t2v, i2v, ti2v = reg["wan2.2-t2v-a14b"], reg["wan2.2-i2v-a14b"], reg["wan2.2-ti2v-5b"]
    # wan/configs: sample_shift, sample_guide_scale (high-noise, then low-noise expert).
    assert (t2v.flow_shift, t2v.guidance_scale, t2v.guidance_scale_2) == (12.0, 4.0, 3.0)
    assert (i2v.flow_shift, i2v.guidance_scale, i2v.guidance_scale_2) == (5.0, 3.5, 3.5)
    assert (ti2v.flow_shift, ti2v.guidance_scale, ti2v.guidance_scale_2) == (5.0, 5.0, None)
    for m in (t2v, i2v, ti2v):
        assert m.negative_prompt == WAN_NEGATIVE_PROMPT  # shared_config.sample_neg_prompt
    assert all(m.negative_prompt == "" for m in reg.values() if m.tiny)


def test_a14b_runs_on_the_eight_gpus_of_one_node_and_each_model_declares_its_memory() -> None:
    reg = ModelRegistry.load()
    for model_id in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        m = reg[model_id]
        assert (m.nproc_per_node, m.nnodes, m.strategy) == (8, 1, "ulysses")
    assert (reg["wan2.2-ti2v-5b"].strategy, reg["wan2.2-ti2v-5b"].gpus_per_job) == \
        ("cfg_parallel", 2)
    assert all(m.strategy == "single" for m in reg.values() if m.tiny)
    for m in reg.values():
        assert m.gpu_memory_gib > 0 and m.pod_memory_gib > 0


_VALID = {"id": "m", "display_name": "M", "pipeline": "t2v", "layout": "t2v",
          "sizes": ["64*64"], "default_size": "64*64", "frame_counts": [9],
          "default_frames": 9, "default_steps": 4, "max_steps": 8, "fps": 8,
          "nproc_per_node": 1, "nnodes": 1, "model_dir": "m", "strategy": "single",
          "flow_shift": 3.0, "gpu_memory_gib": 2, "pod_memory_gib": 4}


def _registry(**changes: object) -> str:
    import yaml

    model = {k: v for k, v in (_VALID | changes).items() if v is not None}
    return yaml.safe_dump({"models": [model]}, allow_unicode=True)


def test_a_registry_entry_with_the_new_fields_parses() -> None:
    m = ModelRegistry.parse(_registry(attention_backend="_native_cudnn", compile=True,
                                      tf32=True, negative_prompt="模糊"))["m"]
    assert (m.attention_backend, m.compile, m.tf32, m.negative_prompt) == \
        ("_native_cudnn", True, True, "模糊")


@pytest.mark.parametrize(("changes", "why"), [
    ({"strategy": None}, "strategy"),
    ({"flow_shift": None}, "flow_shift"),
    ({"gpu_memory_gib": None}, "gpu_memory_gib"),
    ({"pod_memory_gib": None}, "pod_memory_gib"),
    ({"gpu_memory_gib": 0}, "gpu_memory_gib"),
    ({"strategy": "tensor_parallel"}, "strategy"),
    ({"strategy": "single", "nproc_per_node": 2}, "strategy single runs on 1 GPU"),
    ({"strategy": "cfg_parallel"}, "exactly 2 GPUs"),
    ({"strategy": "cfg_parallel", "nproc_per_node": 2, "guidance_scale": 1.0},
     "needs guidance_scale above 1"),
    ({"strategy": "ulysses"}, "2 or more GPUs"),
    ({"strategy": "ulysses", "nproc_per_node": 8, "cpu_offload": True}, "cpu_offload"),
    ({"attention_backend": "Flash Attention!"}, "attention_backend"),
    ({"negative_prompt": "x" * 2001}, "negative_prompt"),
    ({"max_memory": 3}, "max_memory"),
])
def test_a_new_field_that_is_missing_or_inconsistent_is_refused(changes: dict[str, object],
                                                                 why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        ModelRegistry.parse(_registry(**changes))


def test_a_registry_gives_each_model_its_name_and_description_per_language() -> None:
    display = {"en": {"name": "Fox", "description": "Runs in snow."},
               "zh": {"name": "狐狸", "description": "在雪中奔跑。"}}
    m = ModelRegistry.parse(_registry(display_name=None, display=display))["m"]
    assert (m.display["en"].name, m.display["zh"].name, m.display["zh"].description) == \
        ("Fox", "狐狸", "在雪中奔跑。")
    # The English texts are also the fields API clients have always read.
    assert (m.display_name, m.description) == ("Fox", "Runs in snow.")
    assert m.public()["display"] == display


def test_a_registry_of_the_older_shape_loads_its_texts_as_english() -> None:
    m = ModelRegistry.parse(_registry(description="Runs in snow."))["m"]
    assert (m.display_name, m.description) == ("M", "Runs in snow.")
    assert m.public()["display"] == {"en": {"name": "M", "description": "Runs in snow."}}
    bare = ModelRegistry.parse(_registry())["m"]
    assert bare.display["en"].description == ""


@pytest.mark.parametrize(("changes", "why"), [
    ({"display": {"en": {"name": "Fox"}}}, "not both"),
    ({"display_name": None, "display": {"zh": {"name": "狐狸"}}}, "display needs en"),
    ({"display_name": None, "display": {"en": {"name": ""}}}, "name"),
    ({"display_name": None, "display": {"en": {"name": "Fox"}, "fr": {"name": "Renard"}}},
     "display.fr"),
    ({"display_name": None, "display": {"en": {"name": "Fox", "title": "x"}}}, "title"),
])
def test_display_texts_without_english_or_in_both_shapes_are_refused(
        changes: dict[str, object], why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        ModelRegistry.parse(_registry(**changes))


def test_every_shipped_model_has_its_own_chinese_name_and_description() -> None:
    for m in ModelRegistry.load().values():
        zh = m.display["zh"]
        assert zh.name != m.display_name and zh.description != m.description, m.id
        assert any("\u4e00" <= ch <= "\u9fff" for ch in zh.name + zh.description), m.id
