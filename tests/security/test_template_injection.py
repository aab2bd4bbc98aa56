"""The template-injection corpus through the whole path: API → stored row → manifest → argv.

Each nasty prompt is created through the real API, read back from the database, turned
into a ``JobSpec`` the way the dispatcher does, rendered into a PyTorchJob, validated
against the real CRD schema and the core pod schema, and dumped to YAML and parsed
again (what ``kubectl`` would send). The container arguments must carry the prompt
exactly as typed, and the manifest must stay one PyTorchJob with nothing added.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from tests.security.live import LiveApi
from vidmaas.config import KubeSettings, Settings
from vidmaas.db import tasks as repo
from vidmaas.db.engine import make_engine, make_sessionmaker
from vidmaas.dispatcher.executors.kubernetes import manifest_yaml, render_pytorchjob
from vidmaas.domain.ids import job_name as job_name_of
from vidmaas.domain.jobs import JobSpec, job_args
from vidmaas.domain.models import ModelRegistry
from vidmaas.runtime.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / ".." / "shared" / "k8s" / "crds" / "kubeflow.org_pytorchjobs.yaml"

CORPUS = [
    'a "quoted" and \'single-quoted\' cat',
    "line one\nline two\r\nline three\ttabbed",
    "{{ settings.storage.s3_secret_access_key }} {{ 7*7 }} {{ ''.__class__.__mro__ }}",
    "{% for x in range(10**9) %}x{% endfor %}{# comment #}",
    "---\napiVersion: v1\nkind: Secret\nmetadata: {name: pwned}\n...\n",
    "key: value\n- item\n? complex\n: mapping\n&anchor *anchor !!python/object:os.system",
    "-- --model evil --size 1*1 --image /etc/passwd",
    "--prompt=override",
    "$(rm -rf /) `id` ${HOME} ; ls | cat && true || false > /tmp/x",
    "\\ backslash \\n not a newline \\\" escaped quote",
    "x" * 10_000,
    "一只在雨中奔跑的猫，霓虹灯下的东京街头",
    "🐱‍👤🚀🔥 zero-width\u200bjoiner\u200d and RTL \u202eevil",
    "#! not a comment: # yaml comment? @ ` % |",
    "null",
    "true",
    "0x1F",
    "  leading and trailing spaces  ",
    "<script>alert(1)</script>&amp;",
    "'; DROP TABLE tasks; --",
]


def _settings(base: Settings) -> Settings:
    return base.model_copy(update={"kube": KubeSettings(crd_schema_path=CRD_PATH)})


async def _stored_tasks(db_url: str, ids: list[str]) -> dict[str, object]:
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            return {i: await repo.get_task(session=s, task_id=i, user_id=None) for i in ids}
    finally:
        await engine.dispose()


def _spec_of(task: object, registry: ModelRegistry) -> JobSpec:
    """The dispatcher's JobSpec for a stored task row."""
    t = task
    return JobSpec(task_id=t.id, job_name=job_name_of(t.id), user_id=t.user_id,  # type: ignore[attr-defined]
                   model=registry.get_or_raise(t.model), prompt=t.prompt,  # type: ignore[attr-defined]
                   params=dict(t.params), attempt=1, input_key=t.input_key,  # type: ignore[attr-defined]
                   negative_prompt=t.negative_prompt,  # type: ignore[attr-defined]
                   labels={"vidmaas.io/task-id": t.id,  # type: ignore[attr-defined]
                           "vidmaas.io/user-id": t.user_id})  # type: ignore[attr-defined]


def _containers(manifest: dict) -> list[dict]:
    out = []
    for replica in manifest["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        out += pod.get("initContainers", []) + pod["containers"]
    return out


def _arg_after(args: list[str], flag: str) -> str:
    """The value of ``flag`` in ``args``, spelled ``--flag value`` or ``--flag=value``."""
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    raise AssertionError(f"{flag} not in the arguments")


def _carries_prompt(container: dict) -> bool:
    argv = [*container.get("command", []), *container.get("args", [])]
    return any(a == "--prompt" or a.startswith("--prompt=") for a in argv)


@pytest.mark.parametrize("model,size", [("tiny-t2v", "64*64"), ("wan2.2-t2v-a14b", "832*480")])
async def test_nasty_prompts_reach_the_container_exactly_as_typed(
        live: LiveApi, model: str, size: str) -> None:
    assert CRD_PATH.is_file(), f"lay shared/ beside the repository: {CRD_PATH} is missing"
    live.settings.api.max_queued_per_user = 1000
    live.settings.gpu_capacity = 8  # A14B takes 8 GPUs a job: on fewer it is refused
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        for prompt in CORPUS:
            r = await c.post("/v1/tasks", headers=live.auth("alice"), json={
                "prompt": prompt, "negative_prompt": prompt[::-1][:2000], "model": model,
                "size": size})
            assert r.status_code == 202, (prompt[:40], r.text)
            assert r.json()["prompt"] == prompt
            ids.append(r.json()["id"])
    stored = await _stored_tasks(live.settings.database.url, ids)
    settings = _settings(live.settings)
    registry = ModelRegistry.load(None)
    for task_id, prompt in zip(ids, CORPUS, strict=True):
        task = stored[task_id]
        assert task is not None and task.prompt == prompt  # type: ignore[attr-defined]
        spec = _spec_of(task, registry)
        manifest = render_pytorchjob(settings=settings, spec=spec)  # CRD + pod schema checked
        # What kubectl would send: dumped and parsed again.
        again = yaml.safe_load(manifest_yaml(manifest))
        assert again == manifest
        assert again["kind"] == "PyTorchJob" and again["metadata"]["name"] == spec.job_name
        replicas = again["spec"]["pytorchReplicaSpecs"]
        assert sum(r["replicas"] for r in replicas.values()) == spec.model.nnodes
        carrying = [c for c in _containers(again) if _carries_prompt(c)]
        assert carrying, "no container carries the prompt"
        for container in carrying:
            argv = [*container.get("command", []), *container.get("args", [])]
            assert _arg_after(argv, "--prompt") == prompt
            assert _arg_after(argv, "--model") == model
            assert _arg_after(argv, "--size") == size
            if container["name"] == "pytorch":
                assert container["args"] == job_args(spec)
                # The runtime's own parser reads the prompt back exactly as typed.
                ns = build_parser().parse_args(["run", *container["args"]])
                assert ns.prompt == prompt
        text = manifest_yaml(manifest)
        assert "pwned" not in yaml.safe_dump(
            {k: v for k, v in again.items() if k != "spec"}), "metadata was injected"
        assert text.count("kind: PyTorchJob") == 1


async def test_a_prompt_no_job_can_carry_is_refused_at_create_not_at_dispatch(
        live: LiveApi) -> None:
    """A NUL character cannot travel in an argv: the API must refuse it (422) rather than
    accept a task that could never start."""
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        r = await c.post("/v1/tasks", headers=live.auth("alice"),
                         json={"prompt": "before\x00after", "model": "tiny-t2v"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "prompt"


async def test_a_nul_in_the_negative_prompt_is_refused_too(live: LiveApi) -> None:
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        r = await c.post("/v1/tasks", headers=live.auth("alice"), json={
            "prompt": "fine", "negative_prompt": "\x00", "model": "tiny-t2v"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "negative_prompt"
        assert (await c.get("/v1/tasks", headers=live.auth("alice"))).json()["data"] == []
