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


@pytest.mark.parametrize("bad", [
    "models: [{id: x}]",
    "models:\n - {id: m, display_name: M, pipeline: t2v, layout: t2v, sizes: ['65*64'],"
    " default_size: '65*64', frame_counts: [9], default_frames: 9, default_steps: 4,"
    " max_steps: 8, fps: 8, nproc_per_node: 1, nnodes: 1, model_dir: m}",
    "models:\n - {id: m, display_name: M, pipeline: t2v, layout: t2v, sizes: ['64*64'],"
    " default_size: '64*64', frame_counts: [8], default_frames: 8, default_steps: 4,"
    " max_steps: 8, fps: 8, nproc_per_node: 1, nnodes: 1, model_dir: m}",
    "not: [valid",
])
def test_a_malformed_registry_is_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        ModelRegistry.parse(bad)
