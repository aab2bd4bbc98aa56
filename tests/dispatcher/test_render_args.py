"""The manifest checks read container arguments as the runtime's own parser does, and
every registry value that shapes a generation reaches the job through them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dispatcher.render_support import (
    REGISTRY,
    SHIPPED_TEMPLATE,
    main_of,
    operator_template,
    pod_of,
    replicas_of,
    settings_with,
    spec_of,
)
from vidmaas.dispatcher.executors.kubernetes import render_job_for_cli, render_pytorchjob
from vidmaas.domain.jobs import job_args
from vidmaas.errors import ExecutorError
from vidmaas.runtime.cli import build_parser

ARGS_LOOP = "{%- for arg in args %}\n                - {{ arg }}\n{%- endfor %}"
SEED_STYLE_ARGS = ("                - \"--prompt\"\n                - \"{{ prompt_text }}\"\n"
                   "                - \"--size\"\n                - \"{{ resolution }}\"\n"
                   "{%- for arg in args[3:] %}\n                - {{ arg }}\n{%- endfor %}")
"""How the seed's template wrote the arguments: option and value apart, each value in
quotes; the rest from ``args`` (``args[:3]`` is ``--prompt=…``, ``--size``, the size)."""


def _seed_style(tmp_path: Path, args: str = SEED_STYLE_ARGS) -> Path:
    return operator_template(tmp_path, ARGS_LOOP, args)


def _run_args(manifest: dict[str, Any]) -> Any:
    return build_parser().parse_args(["run", *main_of(replicas_of(manifest)["Master"])["args"]])


@pytest.mark.parametrize("prompt", ["a cat", 'a "quoted" cat: {{ x }} # not a comment', "猫",
                                    "--model evil"])
def test_a_seed_style_template_with_option_and_value_apart_passes_the_checks(
        tmp_path: Path, prompt: str) -> None:
    spec = spec_of(REGISTRY["wan2.2-i2v-a14b"], prompt)

    manifest = render_pytorchjob(settings=settings_with(template_path=_seed_style(tmp_path)),
                                 spec=spec)

    args = main_of(replicas_of(manifest)["Master"])["args"]
    assert args[:4] == ["--prompt", prompt, "--size", spec.params["size"]]
    assert args != job_args(spec)
    ns = _run_args(manifest)
    assert (ns.prompt, ns.size, ns.image) == (prompt, spec.params["size"], spec.input_key)


def test_the_projects_name_equals_value_form_passes_the_checks(tmp_path: Path) -> None:
    template = _seed_style(tmp_path, "                - {{ \"--size=\" ~ resolution }}\n"
                                     "{%- for arg in [args[0]] + args[3:] %}\n"
                                     "                - {{ arg }}\n{%- endfor %}")
    spec = spec_of(REGISTRY["tiny-t2v"], "--help")

    default = render_pytorchjob(settings=settings_with(), spec=spec)
    equals = render_pytorchjob(settings=settings_with(template_path=template), spec=spec)

    assert main_of(replicas_of(default)["Master"])["args"][0] == "--prompt=--help"
    assert main_of(replicas_of(equals)["Master"])["args"][0] == f"--size={spec.params['size']}"
    assert vars(_run_args(equals)) == vars(_run_args(default))


@pytest.mark.parametrize(("old", "new", "field"), [
    ('"{{ resolution }}"', '"1280*720"', "--size"),
    ('"{{ prompt_text }}"', '"{{ prompt_text ~ \' \' }}"', "--prompt"),
    ("{%- for arg in args[3:] %}", "{%- for arg in args[3:] | reverse %}", "would refuse"),
])
def test_a_seed_style_template_that_changes_a_value_is_rejected(
        tmp_path: Path, old: str, new: str, field: str) -> None:
    template = _seed_style(tmp_path, SEED_STYLE_ARGS.replace(old, new))

    with pytest.raises(ExecutorError, match=f"Master container's args differ.*{field}"):
        render_pytorchjob(settings=settings_with(template_path=template),
                          spec=spec_of(REGISTRY["wan2.2-ti2v-5b"]))


def test_a_template_that_drops_a_registry_argument_is_rejected(tmp_path: Path) -> None:
    template = _seed_style(tmp_path, SEED_STYLE_ARGS.replace(
        "args[3:]", "args[3:] | reject('equalto', '--vae-tiling') | list"))
    model = REGISTRY["wan2.2-ti2v-5b"].model_copy(update={"vae_tiling": True})

    with pytest.raises(ExecutorError, match=r"args differ.*--vae-tiling"):
        render_pytorchjob(settings=settings_with(template_path=template), spec=spec_of(model))


@pytest.mark.parametrize("prompt", ["--help", "-v", "--seed"])
def test_a_prompt_that_looks_like_an_option_is_refused_not_misread_by_a_seed_style_template(
        tmp_path: Path, prompt: str) -> None:
    with pytest.raises(ExecutorError, match="args differ"):
        render_pytorchjob(settings=settings_with(template_path=_seed_style(tmp_path)),
                          spec=spec_of(REGISTRY["tiny-t2v"], prompt))


def test_the_fetch_input_arguments_are_read_by_the_runtimes_parser_too(tmp_path: Path) -> None:
    template = operator_template(tmp_path, "command: {{ replica.fetch_command }}",
                                 "command: {{ replica.fetch_command[:2] }}\n"
                                 "              args: {{ replica.fetch_command[2:] | reverse "
                                 "| list }}")

    with pytest.raises(ExecutorError, match="fetch-input container's args differ"):
        render_pytorchjob(settings=settings_with(template_path=template),
                          spec=spec_of(REGISTRY["wan2.2-i2v-a14b"]))


# ---------------------------------------------------------------- registry values


REGISTRY_EDITS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("wan2.2-ti2v-5b", {"guidance_scale": 6.5}, {"guidance_scale": 6.5}),
    ("wan2.2-t2v-a14b", {"guidance_scale_2": 2.25}, {"guidance_scale_2": 2.25}),
    ("wan2.2-ti2v-5b", {"flow_shift": 7.0}, {"flow_shift": 7.0}),
    ("wan2.2-ti2v-5b", {"negative_prompt": "blurry, 静止"}, {"negative_prompt": "blurry, 静止"}),
    ("wan2.2-ti2v-5b", {"vae_tiling": False}, {"vae_tiling": False}),
    ("wan2.2-t2v-a14b", {"vae_tiling": True}, {"vae_tiling": True}),
    ("wan2.2-ti2v-5b", {"cpu_offload": True}, {"cpu_offload": True}),
    ("wan2.2-ti2v-5b", {"strategy": "ulysses"}, {"strategy": "ulysses"}),
    ("wan2.2-t2v-a14b", {"attention_backend": "flash", "compile": True, "tf32": True},
     {"attention_backend": "flash", "compile": True, "tf32": True}),
]


@pytest.mark.parametrize(("model_id", "edit", "parsed"), REGISTRY_EDITS,
                         ids=[f"{m}-{next(iter(e))}" for m, e, _ in REGISTRY_EDITS])
def test_an_operators_registry_edit_changes_the_rendered_arguments(
        tmp_path: Path, model_id: str, edit: dict[str, Any], parsed: dict[str, Any]) -> None:
    shipped = yaml.safe_load((SHIPPED_TEMPLATE.parents[1] / "models.yaml").read_text())
    edited = tmp_path / "models.yaml"
    for model in shipped["models"]:
        if model["id"] == model_id:
            assert all(model.get(k) != v for k, v in edit.items()), "not an edit"
            model.update(edit)
    edited.write_text(yaml.safe_dump(shipped, allow_unicode=True), encoding="utf-8")

    def job_run_args(models_path: Path | None) -> Any:
        settings = settings_with()
        settings.models_path = models_path
        text = render_job_for_cli(settings=settings, model_id=model_id, prompt="a cat",
                                  size=REGISTRY[model_id].default_size, seed=1)
        manifest = yaml.safe_load(text)
        return build_parser().parse_args(["run", *main_of(replicas_of(manifest)["Master"])
                                          ["args"]])

    before, after = job_run_args(None), job_run_args(edited)

    for dest, value in parsed.items():
        assert getattr(after, dest) == value
        assert getattr(before, dest) != value
    unchanged = {k for k in vars(after) if k not in parsed}
    assert {k: getattr(after, k) for k in unchanged} == {k: getattr(before, k) for k in unchanged}


def test_no_registry_copy_is_mounted_into_the_job() -> None:
    manifest = render_pytorchjob(settings=settings_with(), spec=spec_of(REGISTRY["tiny-t2v"]))

    master = replicas_of(manifest)["Master"]
    assert "VIDMAAS_MODELS_PATH" not in {e["name"] for e in main_of(master)["env"]}
    assert {v["name"] for v in pod_of(master)["volumes"]} == {"work", "dshm", "models"}
