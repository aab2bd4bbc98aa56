"""Memory plans: real-size configs counted on the meta device, every shipped model fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vidmaas.cli import main as vidmaas_main
from vidmaas.domain.models import ModelRegistry
from vidmaas.runtime import architectures, memory
from vidmaas.runtime.plan import format_plans, placement, plan_model, plan_registry

GB = 10**9
REGISTRY = ModelRegistry.load()


def test_the_written_down_configs_have_the_sizes_of_the_real_releases() -> None:
    a14b = memory.weight_bytes(architectures.ARCHITECTURES["wan2.2-t2v-a14b"])
    ti2v = memory.weight_bytes(architectures.ARCHITECTURES["wan2.2-ti2v-5b"])
    # One A14B expert is 14.3 B parameters (~28.6 GB in bf16, DESIGN §6), UMT5-XXL's
    # encoder 5.7 B (~11.4 GB), the Wan2.1 VAE 127 M and the Wan2.2 VAE 705 M in fp32.
    assert 28.5 * GB < a14b.expert_bytes < 28.7 * GB and a14b.experts == 2
    assert 11.3 * GB < a14b.text_encoder_bytes < 11.4 * GB
    assert 0.50 * GB < a14b.vae_bytes < 0.52 * GB
    assert 9.9 * GB < ti2v.expert_bytes < 10.1 * GB and ti2v.experts == 1
    assert 2.8 * GB < ti2v.vae_bytes < 2.85 * GB
    # The A14B total is DESIGN §12's ~69 GB.
    assert 68 * GB < a14b.total_bytes < 70 * GB


def test_the_tiny_architectures_are_those_of_the_tiny_checkpoints(
        tiny_models: dict[str, Path]) -> None:
    for layout, directory in tiny_models.items():
        written = memory.weight_bytes(architectures.ARCHITECTURES[f"tiny-{layout}"])
        on_disk = architectures.from_model_dir(directory)
        assert memory.weight_bytes(on_disk) == written, layout
        assert on_disk.experts == (2 if layout.startswith("a14b") else 1)


def test_every_shipped_model_fits_what_it_declares() -> None:
    for default, saving in plan_registry(REGISTRY.values()):
        assert default.estimate is not None, default.note
        assert default.fits, default.as_dict()
        # A retry after an out-of-memory runs the memory-saving plan in the same pod.
        assert saving.fits and saving.fits_pod, saving.as_dict()
        assert saving.estimate is not None
        assert saving.estimate.gpu_peak_bytes <= default.estimate.gpu_peak_bytes


def test_a_model_declared_too_small_is_reported_as_not_fitting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    small = REGISTRY["wan2.2-t2v-a14b"].model_copy(update={"gpu_memory_gib": 24.0,
                                                           "pod_memory_gib": 8.0})
    p = plan_model(small)
    assert (p.fits_gpu, p.fits_pod, p.fits) == (False, False, False)
    assert "NO" in format_plans([(p, plan_model(small, memory_saving=True))])

    text = (Path(__file__).parents[2] / "src/vidmaas/models.yaml").read_text()
    registry = tmp_path / "models.yaml"
    registry.write_text(text.replace("gpu_memory_gib: 48", "gpu_memory_gib: 24", 1))
    assert vidmaas_main(["models", "plan"]) == 0
    monkeypatch.setenv("VIDMAAS_MODELS_PATH", str(registry))
    capsys.readouterr()
    assert vidmaas_main(["models", "plan"]) == 1
    out, err = capsys.readouterr()
    assert "wan2.2-t2v-a14b" in err and "plan_does_not_fit" in err
    row = next(line for line in out.splitlines() if line.startswith("wan2.2-t2v-a14b"))
    assert " NO " in row


def test_the_a14b_plan_holds_one_expert_and_no_text_encoder_while_denoising() -> None:
    p = plan_model(REGISTRY["wan2.2-t2v-a14b"])
    assert p.estimate is not None
    phases = {ph.name: ph for ph in p.estimate.phases}
    assert phases["denoise:transformer"].on_device == ("vae", "transformer")
    assert phases["denoise:transformer_2"].on_device == ("vae", "transformer_2")
    assert phases["decode"].on_device == ("vae",)
    assert p.placement.strategy == "ulysses" and p.placement.world_size == 8
    assert "split over 8 ranks" in p.placement.sharding
    # Ulysses splits the sequence: 8 ranks hold an eighth of the activations of one.
    arch = architectures.ARCHITECTURES["wan2.2-t2v-a14b"]
    one = memory.dit_activation_bytes(arch, width=1280, height=720, frames=81)
    eight = memory.dit_activation_bytes(arch, width=1280, height=720, frames=81,
                                        sequence_ranks=8)
    assert 7 < one / eight < 8.5
    # Weights straight onto the device: host RAM per rank is far below one expert.
    assert p.estimate.host_rank_bytes < p.estimate.weights.expert_bytes / 2


def test_the_memory_saving_plan_tiles_loads_late_and_offloads_a_single_rank() -> None:
    single = placement(strategy="single", world_size=1, memory_saving=True)
    assert single.cpu_offload and single.vae_tiling and not single.sequential_load
    ulysses = placement(strategy="ulysses", world_size=8, memory_saving=True, experts=2)
    assert not ulysses.cpu_offload and ulysses.vae_tiling and ulysses.sequential_load
    assert "memory-saving plan" in ulysses.describe()
    cpu = placement(strategy="single", world_size=1, memory_saving=True, cuda=False)
    assert not cpu.cpu_offload  # a CPU has nothing to offload to
    assert placement(strategy="cfg_parallel", world_size=2).evict == "release"
    assert placement(strategy="cfg_parallel", world_size=2, keep_loaded=True).evict == "host"


def test_models_plan_json_lists_every_model_with_both_plans(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert vidmaas_main(["models", "plan", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["model"] for d in data] == list(REGISTRY)
    a14b = next(d for d in data if d["model"] == "wan2.2-t2v-a14b")
    assert a14b["default"]["fits_gpu"] is True
    assert a14b["default"]["gpu_peak_bytes"] <= a14b["default"]["gpu_declared_bytes"]
    assert a14b["default"]["source"] == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert a14b["memory_saving"]["placement"]["memory_saving"] is True
    assert {ph["name"] for ph in a14b["default"]["phases"]} >= {
        "encode_prompt", "denoise:transformer", "denoise:transformer_2", "decode"}
