"""PyTorchJob rendering: injection-proof, checked, valid against the real CRD schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from tests.dispatcher.render_support import (
    CRD_PATH,
    REGISTRY,
    SHIPPED_TEMPLATE,
    env_of,
    main_of,
    operator_template,
    replicas_of,
    settings_with,
    spec_of,
)
from vidmaas.dispatcher.executors.kubernetes import (
    LABEL_KUEUE_QUEUE,
    LABEL_MANAGED_BY,
    LABEL_TASK_ID,
    render_job_for_cli,
    render_pytorchjob,
    yaml_literal,
)
from vidmaas.domain.ids import job_name, new_task_id
from vidmaas.domain.jobs import job_args
from vidmaas.errors import ExecutorError, InvalidRequest

NASTY_PROMPTS: dict[str, str] = {
    "double-and-single-quotes": 'a "quoted" \'single\' prompt with "\'mixed\'" quotes',
    "newlines-and-tabs": "line one\nline two\r\nline three\ttabbed\n\n",
    "jinja-expressions": "{{ 7*7 }} {{ config }} {{ self.__init__.__globals__ }} {{",
    "jinja-statements": "{% for x in range(3) %}boom{% endfor %} {# comment #} {%",
    "yaml-document": "---\nkind: Pod\nmetadata:\n  name: evil\nspec: {}\n",
    "yaml-document-end-and-secret": "...\n---\napiVersion: v1\nkind: Secret\ndata: {x: eQ==}",
    "yaml-indicators": "key: value\n- item\n? complex\n&anchor *alias !!python/object:os.system"
                       " ['ls'] | > #comment %YAML 1.2 @ ` [a, b] {c: d}",
    "yaml-typed-scalars": "null",
    "yaml-bool": "yes",
    "yaml-number": "0x1F",
    "flags": "--model evil --size 1*1 --image s3://other/x --",
    "double-dash": "--",
    "lone-option": "-v",
    "help-flag": "--help",
    "shell": "$(rm -rf /); `id`; echo $HOME && true || false | cat > /etc/passwd; ${IFS}",
    "backslashes": "\\ backslash \\n not a newline \\u0041 \\\\ \\x00 \\",
    "ten-thousand-chars": ("长a\"\n{{" * 2500)[:10_000],
    "cjk-and-emoji": "一只猫在雨中跳舞 🐱🌧️ 😀 👩‍👩‍👧‍👦 日本語 한국어 🏳️‍🌈",
    "control-characters": "".join(chr(c) for c in range(1, 32)) + "\x7f\x85\x9f",
    "unicode-line-breaks": "a\u2028b\u2029c\x85d\ufeffe\u200bf",
    "padded-whitespace": "   padded   ",
    "empty": "",
}


def test_the_crd_file_is_where_the_tests_expect_it() -> None:
    assert CRD_PATH.is_file(), f"lay shared/ beside the repository: {CRD_PATH} is missing"


@pytest.mark.parametrize("prompt_name", list(NASTY_PROMPTS))
@pytest.mark.parametrize("model_id", list(REGISTRY))
def test_every_model_renders_a_nasty_prompt_into_a_valid_job_that_carries_it_unchanged(
        model_id: str, prompt_name: str) -> None:
    prompt = NASTY_PROMPTS[prompt_name]
    spec = spec_of(REGISTRY[model_id], prompt, negative_prompt=prompt[::-1] or None)

    manifest = render_pytorchjob(settings=settings_with(), spec=spec)

    assert manifest["kind"] == "PyTorchJob"
    assert manifest["metadata"]["name"] == spec.job_name
    for replica in replicas_of(manifest).values():
        args = main_of(replica)["args"]
        assert args == job_args(spec)
        assert f"--prompt={prompt}" in args
        if prompt:
            assert f"--negative-prompt={prompt[::-1]}" in args
        for init in replica["template"]["spec"].get("initContainers", []):
            assert init["command"][2:] == job_args(spec)


@pytest.mark.parametrize("prompt_name", list(NASTY_PROMPTS))
def test_the_runtime_reads_back_the_exact_prompt_from_the_rendered_job(prompt_name: str) -> None:
    from vidmaas.runtime.cli import build_parser

    prompt = NASTY_PROMPTS[prompt_name]
    spec = spec_of(REGISTRY["wan2.2-i2v-a14b"], prompt, negative_prompt=prompt or None)
    manifest = render_pytorchjob(settings=settings_with(), spec=spec)
    master = replicas_of(manifest)["Master"]["template"]["spec"]

    run = build_parser().parse_args(["run", *master["containers"][0]["args"]])
    fetch = build_parser().parse_args(master["initContainers"][0]["command"][1:])

    for ns in (run, fetch):
        assert ns.prompt == prompt
        assert ns.image == spec.input_key
        # A task without a negative prompt gets the model's default (Wan's).
        assert ns.negative_prompt == (prompt or spec.model.negative_prompt or None)


@pytest.mark.parametrize("value", [*NASTY_PROMPTS.values(), 0, -3, 2.5, True, None,
                                   ["a", "b: c", "- d"], {"k: v": "{x}", "#": ["'", ","]}])
def test_a_quoted_value_reads_back_unchanged_in_any_yaml_context(value: Any) -> None:
    literal = yaml_literal(value)

    assert "\n" not in literal
    assert yaml.safe_load(f"key: {literal}") == {"key": value}
    assert yaml.safe_load(f"- {literal}\n- after") == [value, "after"]
    assert yaml.safe_load(f"[{literal}, after]") == [value, "after"]
    assert yaml.safe_load(f"{{k: {literal}, other: 1}}") == {"k": value, "other": 1}
    assert yaml.safe_load(f"key: {literal} # trailing comment") == {"key": value}


def test_a_value_cannot_break_out_of_a_single_quoted_string_in_an_operator_template() -> None:
    literal = yaml_literal("x', injected: 'y")

    assert yaml.safe_load(f"{{k: '{literal}'}}") == {"k": literal}


def test_single_node_models_have_a_master_only() -> None:
    manifest = render_pytorchjob(settings=settings_with(), spec=spec_of(REGISTRY["wan2.2-ti2v-5b"]))

    assert set(replicas_of(manifest)) == {"Master"}


def test_job_carries_the_vidmaas_labels_and_run_policy() -> None:
    settings = settings_with(clean_pod_policy="Running", ttl_seconds_after_finished=600,
                         backoff_limit=0)
    spec = spec_of(REGISTRY["tiny-t2v"], labels={"team": "video"})

    manifest = render_pytorchjob(settings=settings, spec=spec)

    labels = manifest["metadata"]["labels"]
    assert labels[LABEL_MANAGED_BY] == "vidmaas"
    assert labels[LABEL_TASK_ID] == spec.task_id
    assert labels["team"] == "video"
    assert LABEL_KUEUE_QUEUE not in labels
    run_policy = manifest["spec"]["runPolicy"]
    assert run_policy["cleanPodPolicy"] == "Running"
    assert run_policy["ttlSecondsAfterFinished"] == 600
    assert run_policy["backoffLimit"] == 0
    assert run_policy["activeDeadlineSeconds"] >= settings.dispatcher.task_deadline_s
    assert "suspend" not in run_policy
    assert manifest["metadata"]["namespace"] == settings.kube.namespace


def test_a_kueue_queue_labels_the_job_and_creates_it_suspended() -> None:
    manifest = render_pytorchjob(settings=settings_with(kueue_queue="gpu-team-a"),
                                 spec=spec_of(REGISTRY["tiny-t2v"]))

    assert manifest["metadata"]["labels"][LABEL_KUEUE_QUEUE] == "gpu-team-a"
    assert manifest["spec"]["runPolicy"]["suspend"] is True


def test_the_model_directory_comes_from_a_host_path() -> None:
    settings = settings_with(model_volume="hostPath", model_host_path="/mnt/models",
                         model_mount_path="/models")

    manifest = render_pytorchjob(settings=settings, spec=spec_of(REGISTRY["tiny-t2v"]))

    pod = replicas_of(manifest)["Master"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["hostPath"]["path"] == "/mnt/models"
    mounts = {m["name"]: m for m in main_of(replicas_of(manifest)["Master"])["volumeMounts"]}
    assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert env_of(main_of(replicas_of(manifest)["Master"]))["VIDMAAS_MODEL_DIR"]["value"] == \
        "/models/tiny-t2v"


def test_every_replica_gets_the_live_preview_settings_the_runtime_reads() -> None:
    from vidmaas.runtime.job import JobEnv

    settings = settings_with()
    settings.runtime.preview_interval_s = 0.5
    settings.runtime.preview_max = 3
    manifest = render_pytorchjob(settings=settings, spec=spec_of(REGISTRY["wan2.2-t2v-a14b"]))

    for replica in replicas_of(manifest).values():
        env = env_of(main_of(replica))
        values = {name: env[name]["value"] for name in ("VIDMAAS_PREVIEW_INTERVAL_S",
                                                        "VIDMAAS_PREVIEW_MAX")}
        job_env = JobEnv.from_environ(values)
        assert (job_env.preview_interval_s, job_env.preview_max) == (0.5, 3)


def test_the_model_directory_comes_from_a_read_only_pvc() -> None:
    settings = settings_with(model_volume="pvc", model_pvc_name="models-rox")

    manifest = render_pytorchjob(settings=settings, spec=spec_of(REGISTRY["wan2.2-t2v-a14b"]))

    for replica in replicas_of(manifest).values():
        volumes = {v["name"]: v for v in replica["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models-rox",
                                                              "readOnly": True}
        assert env_of(main_of(replica))["VIDMAAS_MODEL_DIR"]["value"] == \
            "/models/Wan2.2-T2V-A14B-Diffusers"


def test_the_model_directory_can_be_baked_into_the_image() -> None:
    manifest = render_pytorchjob(settings=settings_with(model_volume="image"),
                                 spec=spec_of(REGISTRY["tiny-t2v"]))

    master = replicas_of(manifest)["Master"]
    assert "models" not in {v["name"] for v in master["template"]["spec"]["volumes"]}
    assert "models" not in {m["name"] for m in main_of(master)["volumeMounts"]}


def test_an_input_image_is_fetched_by_an_init_container_into_the_work_dir() -> None:
    spec = spec_of(REGISTRY["wan2.2-i2v-a14b"])
    assert spec.input_key is not None

    manifest = render_pytorchjob(settings=settings_with(), spec=spec)

    for replica in replicas_of(manifest).values():
        pod = replica["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["command"] == ["vidmaas-job", "fetch-input", *job_args(spec)]
        assert init["command"][init["command"].index("--image") + 1] == spec.input_key
        assert env_of(init)["VIDMAAS_WORK_DIR"]["value"] == "/work"
        assert {"name": "work", "emptyDir": {}} in pod["volumes"]
        assert env_of(main_of(replica))["VIDMAAS_WORK_DIR"]["value"] == "/work"


def test_without_an_input_image_there_is_no_init_container() -> None:
    manifest = render_pytorchjob(settings=settings_with(), spec=spec_of(REGISTRY["tiny-ti2v"]))

    assert "initContainers" not in replicas_of(manifest)["Master"]["template"]["spec"]


def test_credentials_come_from_secrets_and_never_appear_in_the_manifest() -> None:
    settings = settings_with(s3_secret_name="my-s3", redis_secret_name="my-redis")
    settings.storage.s3_access_key_id = SecretStr("AKIAEXAMPLEKEY")
    settings.storage.s3_secret_access_key = SecretStr("very-secret-key-value")
    settings.redis.url = "redis://:redis-password-123@redis:6379/0"
    spec = spec_of(REGISTRY["wan2.2-i2v-a14b"])

    manifest = render_pytorchjob(settings=settings, spec=spec)

    text = yaml.safe_dump(manifest)
    for secret in ("AKIAEXAMPLEKEY", "very-secret-key-value", "redis-password-123"):
        assert secret not in text
    for replica in replicas_of(manifest).values():
        pod = replica["template"]["spec"]
        for container in [*pod["containers"], *pod["initContainers"]]:
            env = env_of(container)
            assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
                "name": "my-s3", "key": "AWS_ACCESS_KEY_ID"}
            assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
                "name": "my-s3", "key": "AWS_SECRET_ACCESS_KEY"}
            assert env["VIDMAAS_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
                "name": "my-redis", "key": "VIDMAAS_REDIS_URL"}
            assert env["VIDMAAS_TASK_ID"]["value"] == spec.task_id
            assert env["VIDMAAS_STORAGE_URL"]["value"] == "s3://vidmaas-bucket/prod"


def test_both_containers_get_the_store_retry_budget_from_thesettings_with() -> None:
    settings = settings_with()
    settings.storage.retry_attempts, settings.storage.retry_total_s = 5, 42.5
    manifest = render_pytorchjob(settings=settings, spec=spec_of(REGISTRY["wan2.2-i2v-a14b"]))
    for replica in replicas_of(manifest).values():
        pod = replica["template"]["spec"]
        for container in [*pod["containers"], *pod["initContainers"]]:
            env = env_of(container)
            assert (env["VIDMAAS_STORAGE_RETRY_ATTEMPTS"]["value"],
                    env["VIDMAAS_STORAGE_RETRY_TOTAL_S"]["value"]) == ("5", "42.5")


def test_an_operator_template_that_inlines_a_secret_is_rejected(tmp_path: Path) -> None:
    template = operator_template(
        tmp_path,
        "                - name: VIDMAAS_REDIS_URL\n                  valueFrom:\n"
        "                    secretKeyRef: {name: {{ redis_secret_name }}, key: VIDMAAS_REDIS_URL}",
        "                - name: VIDMAAS_REDIS_URL\n                  value: redis://x")

    with pytest.raises(ExecutorError, match="Secret"):
        render_pytorchjob(settings=settings_with(template_path=template),
                          spec=spec_of(REGISTRY["wan2.2-i2v-a14b"]))


def test_an_operator_template_can_use_the_seeds_run_sh(tmp_path: Path) -> None:
    manifest = render_pytorchjob(settings=settings_with(), spec=spec_of(REGISTRY["tiny-t2v"]),
                                 command=["run.sh"])

    assert main_of(replicas_of(manifest)["Master"])["command"] == ["run.sh"]


def test_a_template_that_emits_a_second_document_is_rejected(tmp_path: Path) -> None:
    template = tmp_path / "two.yaml.j2"
    template.write_text(SHIPPED_TEMPLATE.read_text(encoding="utf-8")
                        + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")

    with pytest.raises(ExecutorError, match="2 documents"):
        render_pytorchjob(settings=settings_with(template_path=template),
                          spec=spec_of(REGISTRY["tiny-t2v"]))


def test_a_template_that_alters_the_runtime_arguments_is_rejected(tmp_path: Path) -> None:
    template = operator_template(tmp_path, "                - {{ arg }}",
                                  "                - {{ arg | upper }}")

    with pytest.raises(ExecutorError, match="args differ"):
        render_pytorchjob(settings=settings_with(template_path=template),
                          spec=spec_of(REGISTRY["tiny-t2v"]))


def test_a_template_that_splices_a_value_into_a_string_is_caught(tmp_path: Path) -> None:
    template = operator_template(tmp_path, "  name: {{ job_name }}",
                                  "  name: wan22-job-{{ task_id }}")

    with pytest.raises(ExecutorError, match="named"):
        render_pytorchjob(settings=settings_with(template_path=template),
                          spec=spec_of(REGISTRY["tiny-t2v"]))


def test_a_manifest_that_breaks_the_crd_schema_is_rejected(tmp_path: Path) -> None:
    template = operator_template(tmp_path, "    backoffLimit: {{ backoff_limit }}",
                                  "    backoffLimit: {{ backoff_limit | string }}")

    with pytest.raises(ExecutorError, match="schema validation at spec/runPolicy/backoffLimit"):
        render_pytorchjob(settings=settings_with(template_path=template),
                          spec=spec_of(REGISTRY["tiny-t2v"]))


def test_an_unknown_pod_field_is_rejected_by_the_core_schema(tmp_path: Path) -> None:
    template = operator_template(tmp_path, "          terminationGracePeriodSeconds:",
                                  "          terminationGracePeriod: 5\n"
                                  "          terminationGracePeriodSeconds:")

    with pytest.raises(ExecutorError, match="Master pod template"):
        render_pytorchjob(settings=settings_with(template_path=template),
                          spec=spec_of(REGISTRY["tiny-t2v"]))


def test_a_template_syntax_error_is_an_executor_error(tmp_path: Path) -> None:
    template = tmp_path / "broken.yaml.j2"
    template.write_text("kind: {{ oops\n")

    with pytest.raises(ExecutorError, match="syntax error"):
        render_pytorchjob(settings=settings_with(template_path=template),
                          spec=spec_of(REGISTRY["tiny-t2v"]))


def test_a_template_using_an_unknown_variable_is_an_executor_error(tmp_path: Path) -> None:
    template = operator_template(tmp_path, "  namespace: {{ namespace }}",
                                  "  namespace: {{ namespace_typo }}")

    with pytest.raises(ExecutorError, match="namespace_typo"):
        render_pytorchjob(settings=settings_with(template_path=template),
                          spec=spec_of(REGISTRY["tiny-t2v"]))


def test_a_prompt_with_a_nul_character_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        render_pytorchjob(settings=settings_with(), spec=spec_of(REGISTRY["tiny-t2v"], "a\x00b"))

    assert info.value.field == "prompt"


def test_invalid_labels_are_rejected() -> None:
    with pytest.raises(ExecutorError, match="label"):
        render_pytorchjob(settings=settings_with(),
                          spec=spec_of(REGISTRY["tiny-t2v"], labels={"team": "a b"}))


def test_render_job_for_cli_prints_the_manifest_the_dispatcher_would_submit() -> None:
    task_id = new_task_id()

    text = render_job_for_cli(settings=settings_with(), model_id="wan2.2-i2v-a14b",
                              prompt='say "hi"\n---', size="832*480",
                              image_key=f"inputs/{task_id}/input.png", task_id=task_id, seed=7)

    (manifest,) = list(yaml.safe_load_all(text))
    assert manifest["metadata"]["name"] == job_name(task_id)
    args = main_of(manifest["spec"]["pytorchReplicaSpecs"]["Master"])["args"]
    assert args[:3] == ['--prompt=say "hi"\n---', "--size", "832*480"]
    assert args[args.index("--image") + 1] == f"inputs/{task_id}/input.png"
    assert args[args.index("--seed") + 1] == "7"


def test_render_job_for_cli_rejects_what_the_model_cannot_do() -> None:
    with pytest.raises(InvalidRequest) as info:
        render_job_for_cli(settings=settings_with(), model_id="wan2.2-ti2v-5b", prompt="x",
                           size="640*480")
    assert info.value.field == "size"

    with pytest.raises(InvalidRequest) as info:
        render_job_for_cli(settings=settings_with(), model_id="tiny-t2v", prompt="x", size="64*64",
                           task_id="../../etc")
    assert info.value.field == "task_id"
